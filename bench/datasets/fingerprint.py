"""Fingerprints of a split's files and the label values they hold, cached.

A record names the evaluated split's fingerprint (``data_fingerprint``) and a
checkpoint the training split's (``train_fingerprint``), so replacing an image or a
label means re-measuring, not "nothing to do". The fingerprint hashes each file's name
(relative to the split's common folder), size and content. Hashing and decoding are
cached by (path, size, mtime) in ``cache_dir()`` (never inside the dataset folder), so
a second look costs one ``stat`` per file. The same cache holds each label file's
distinct values: every label of a split is checked against its class table before the
first training step (``check_labels``), not found bad after the training.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from bench.datasets.files import DataError

CACHE_FILE = "fingerprints.json"
_memory: dict = {}  # this process's view of the cache file (path -> entry)
_loaded: set = set()


def cache_dir() -> Path:
    """``$BENCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/bench``, else ``~/.cache/bench``."""
    if os.environ.get("BENCH_CACHE_DIR"):
        return Path(os.environ["BENCH_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bench"


def split_files(dataset, limit: Optional[int] = None) -> Optional[list[Path]]:
    """The files a split reads, in order (``limit``: of its first N images); None for a
    split held in memory (nothing on disk to fingerprint)."""
    items = getattr(dataset, "items", None)
    if isinstance(items, list) and items and all(isinstance(i, tuple) and len(i) >= 2 for i in items):
        return [Path(p) for item in items[:limit] for p in item[:2]]
    path = getattr(dataset, "path", None)  # synthetic: one cached .npz per split
    if isinstance(path, Path) and path.is_file():
        return [path]
    return None


def _cache() -> dict:
    where = cache_dir() / CACHE_FILE
    if str(where) not in _loaded:
        _loaded.add(str(where))
        try:
            data = json.loads(where.read_text(encoding="utf-8"))
            _memory.update(data if isinstance(data, dict) else {})
        except (OSError, ValueError):
            pass  # no cache yet, or a broken one: it is rebuilt
    return _memory


def _save(new: dict) -> None:
    """Merges ``new`` into the cache file; a cache that cannot be written only costs time."""
    from bench.errors import BenchError
    from bench.fileio import atomic_write

    where = cache_dir() / CACHE_FILE
    try:
        on_disk = json.loads(where.read_text(encoding="utf-8")) if where.is_file() else {}
    except (OSError, ValueError):
        on_disk = {}
    on_disk = (on_disk if isinstance(on_disk, dict) else {}) | new
    try:
        atomic_write(where, lambda f: f.write(json.dumps(on_disk, sort_keys=True).encode()))
    except BenchError:
        pass


def _entry(path: Path, values: bool, new: dict) -> dict:
    """{size, mtime_ns, sha256[, values]} of ``path``, from the cache when it is current."""
    from bench.datasets.files import read_label

    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}); expected the split's file") from None
    key = str(path.resolve())
    entry = _cache().get(key)
    if not (isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns):
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror or e}); expected the split's file") from None
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
    if values and "values" not in entry:
        entry = {**entry, "values": np.unique(read_label(path)).tolist()}
    if _cache().get(key) != entry:
        _cache()[key] = new[key] = entry
    return entry


def fingerprint(dataset, limit: Optional[int] = None) -> Optional[str]:
    """The split's fingerprint (16 hex digits), or None for a split held in memory."""
    files = split_files(dataset, limit)
    if files is None:
        return None
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    h, new = hashlib.sha256(), {}
    for p in files:
        e = _entry(p, False, new)
        h.update(f"{os.path.relpath(p, root)}\0{e['size']}\0{e['sha256']}\n".encode())
    if new:
        _save(new)
    return h.hexdigest()[:16]


def check_labels(dataset, limit: Optional[int] = None) -> None:
    """Every label file of the split (``limit``: of its first N images) holds only
    values its class table maps (classes or ignore); a DataError naming the first file
    that does not, before any work."""
    items = getattr(dataset, "items", None)
    if not isinstance(items, list):
        return  # in memory (synthetic, tests): made with valid labels
    new: dict = {}
    try:
        for item in items[:limit]:
            if len(item) < 3 or not hasattr(item[2], "lut"):
                continue
            label_path, table = Path(item[1]), item[2]
            values = np.asarray(_entry(label_path, True, new)["values"], dtype=np.int64)
            if len(values):
                table(values, label_path)  # raises the table's one-line message
    except DataError as e:
        raise DataError(f"{getattr(dataset, 'name', 'dataset')}: {e}") from None
    finally:
        if new:
            _save(new)
