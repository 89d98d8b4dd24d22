"""Results store: one JSON record per line, one file per dataset (``results/<dataset>.jsonl``).

A record is a dict with ``schema_version`` (``SCHEMA_VERSION``) and an identity: the
fields in ``IDENTITY_FIELDS`` (required) and the settings in ``SETTING_FIELDS`` that
change the measured numbers (evaluation images, device kind, precision, batch sizes,
evaluation settings; a record made before one of them was stored has none there, and
its identity is built from what it has). Everything else (mIoU, GFLOPs, throughput,
...) is free. Two records with the same identity are the same measurement: storing it
twice needs ``replace=True``.

Writes never corrupt what is stored: the whole new file is written to a temp file in the
same folder, fsynced, then ``os.replace``d over the old one (atomic on POSIX), under an
exclusive lock on ``<root>/.lock``
(``bench.fileio.locked``, through ``filelock``) so concurrent appenders don't lose records.
Lines that cannot be parsed are reported by file and line, and kept verbatim on rewrite.
Per-class IoU may hold NaN (a class absent from labels and predictions): it is written
as JSON ``null``, which every JSON reader accepts, and read back as NaN; files written
before that, with the bare ``NaN`` token, still read.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from bench.errors import BenchError
from bench.fileio import atomic_write, locked

SCHEMA_VERSION = 1
IDENTITY_FIELDS = ("method", "knobs", "dataset", "split", "checkpoint")
# What else moves the numbers; records older than a field lack it (absent from their identity)
SETTING_FIELDS = ("images", "device", "precision", "batch_sizes", "eval", "compile", "compile_mode",
                  "data_fingerprint")
# Settings a stored record may lack and still match any value: records made before the
# evaluated split was fingerprinted stay valid (they are not re-measured)
MATCH_ANY_FIELDS = ("data_fingerprint",)
REQUIRED_FIELDS = ("schema_version",) + IDENTITY_FIELDS
LOCK_NAME = ".lock"


# torch dtype names (older records, ``dtype``) -> the ``--precision`` names records store now
PRECISION_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def record_precision(rec: dict):
    """The precision a record was measured at, as ``--precision`` names it: records
    before ``precision`` said ``dtype``, and before ``--precision`` "float32" (= fp32)."""
    value = rec.get("precision", rec.get("dtype"))
    return PRECISION_NAMES.get(value, value)


def _missing(rec: dict) -> list[str]:
    return [k for k in REQUIRED_FIELDS if k not in rec]


def op_label(knobs: dict) -> str:
    """An operating point's knobs as text, e.g. "tau=0.2" ("-" for none), keys sorted."""
    return " ".join(f"{k}={v}" for k, v in sorted(knobs.items())) or "-"


def _setting(rec: dict, key: str):
    """A setting's identity value, or None where the record does not say."""
    if key == "device":  # the kind: cuda:0 and cuda:1 measure alike
        return str(rec["device"]).split(":")[0] if rec.get("device") else None
    if key == "compile":  # only a compiled run says so: uncompiled identities stay as they were
        return True if rec.get("compile") else None
    if key == "compile_mode":  # likewise: only a compiled run in a mode other than the default
        mode = rec.get("compile_mode")
        return mode if rec.get("compile") and mode not in (None, "default") else None
    if key == "precision":  # an old "float32" record and a new fp32 one: the same measurement
        return record_precision(rec)
    return rec.get(key)


def identity_fields(rec: dict, ignore: tuple = ()) -> dict:
    """The identity of a record (or of a record-to-be) as a dict, ``ignore`` left out."""
    missing = [k for k in IDENTITY_FIELDS if k not in rec]
    if missing:
        raise BenchError(f"result record lacks identity field(s): {', '.join(missing)}")
    out = {k: rec[k] for k in IDENTITY_FIELDS}
    for key in SETTING_FIELDS:
        value = _setting(rec, key)
        if value is not None:
            out[key] = value
    return {k: v for k, v in out.items() if k not in ignore}


def record_identity(rec: dict, ignore: tuple = ()) -> str:
    """Canonical JSON string of the identity (sorted keys, no spaces)."""
    return json.dumps(identity_fields(rec, ignore), sort_keys=True, separators=(",", ":"))


def same_identity(stored: dict, wanted: dict) -> bool:
    """Whether a stored record's identity (``identity_fields``) is the wanted one; a field of
    ``MATCH_ANY_FIELDS`` the stored record lacks matches any value."""
    wanted = {k: v for k, v in wanted.items() if k in stored or k not in MATCH_ANY_FIELDS}
    return stored == wanted


def _nan_to_null(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_null(v) for v in value]
    return value


def dump_record(record: dict) -> bytes:
    """One line of strict JSON: NaN as null (a bare NaN token is not JSON; infinities fail)."""
    try:
        return json.dumps(_nan_to_null(record), allow_nan=False).encode("utf-8")
    except ValueError as e:
        raise BenchError(f"result record for {record.get('method')!r} holds a value JSON cannot store: {e}") from None


def _null_to_nan(per_class):
    # null is how NaN is stored: an IoU that is not defined for that class
    if isinstance(per_class, dict):
        return {k: math.nan if v is None else v for k, v in per_class.items()}
    if isinstance(per_class, list):
        return [math.nan if v is None else v for v in per_class]
    return per_class


def _lines(data: bytes) -> list[bytes]:
    # Split on "\n" only, so a line is kept byte for byte (stray "\r" included).
    lines = data.split(b"\n")
    return lines[:-1] if lines and not lines[-1] else lines


def _parse(line: bytes) -> tuple[dict | None, str | None]:
    """(record, None) for a good line, (None, why) for a bad one."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(rec, dict):
        return None, f"not a JSON object (got {type(rec).__name__})"
    if _missing(rec):
        return None, f"missing required field(s): {', '.join(_missing(rec))}"
    if rec["schema_version"] != SCHEMA_VERSION:
        return None, (f"schema_version {rec['schema_version']!r} is not supported "
                      f"(expected {SCHEMA_VERSION})")
    if "per_class_iou" in rec:
        rec["per_class_iou"] = _null_to_nan(rec["per_class_iou"])
    return rec, None


class ResultsStore:
    def __init__(self, root: str | os.PathLike = "results"):
        self.root = Path(root)

    def path_for(self, dataset: str) -> Path:
        if (not isinstance(dataset, str) or not dataset or "/" in dataset
                or "\\" in dataset or dataset.startswith(".")):
            raise BenchError(f"dataset name {dataset!r} cannot name a results file; "
                             "expected a plain name like 'cityscapes'")
        return self.root / f"{dataset}.jsonl"

    # ---- reading -------------------------------------------------------------------

    def _files(self, dataset: str | None) -> list[Path]:
        if dataset is not None:
            p = self.path_for(dataset)
            return [p] if p.exists() else []
        return sorted(self.root.glob("*.jsonl")) if self.root.is_dir() else []

    @staticmethod
    def _read(path: Path) -> tuple[bytes | None, str | None]:
        """(bytes, None), or (None, why) for a results "file" that cannot be read (a folder)."""
        try:
            return path.read_bytes(), None
        except OSError as e:
            return None, f"{path}: cannot be read ({e.strerror or e}); expected a results file"

    def load_with_errors(self, dataset: str | None = None) -> tuple[list[dict], list[str]]:
        """All good records, and one line "<file>:<line>: <why>" per bad line."""
        records, problems = [], []
        for path in self._files(dataset):
            data, why = self._read(path)
            if why:
                problems.append(why)
                continue
            for n, line in enumerate(_lines(data), start=1):
                if not line.strip():
                    continue
                rec, why = _parse(line)
                if why:
                    problems.append(f"{path}:{n}: {why}")
                else:
                    records.append(rec)
        return records, problems

    def load_located(self, dataset: str | None = None) -> tuple[list[tuple[str, dict]], list[str]]:
        """Like ``load_with_errors``, each good record paired with its "<file>:<line>",
        for readers that check more than the store does and must say where."""
        located, problems = [], []
        for path in self._files(dataset):
            data, why = self._read(path)
            if why:
                problems.append(why)
                continue
            for n, line in enumerate(_lines(data), start=1):
                if line.strip():
                    rec, why = _parse(line)
                    if why:
                        problems.append(f"{path}:{n}: {why}")
                    else:
                        located.append((f"{path}:{n}", rec))
        return located, problems

    def load(self, dataset: str | None = None) -> list[dict]:
        """All records; any bad line is a BenchError naming its file and line."""
        records, problems = self.load_with_errors(dataset)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BenchError(problems[0] + more)
        return records

    def exists(self, identity: str | dict) -> bool:
        """Whether a record with this identity (string or record) is stored."""
        wanted = identity_fields(identity) if isinstance(identity, dict) else json.loads(identity)
        records, _ = self.load_with_errors(wanted.get("dataset"))
        return any(same_identity(identity_fields(r), wanted) for r in records)

    # ---- writing -------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail early (before hours of training) when results could not be stored."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock():
                pass
        except OSError as e:
            raise BenchError(f"cannot write results to folder {self.root}: {e.strerror or e}") from e

    def append(self, record: dict, replace: bool = False) -> Path:
        """Stores ``record`` in its dataset's file; returns that file's path."""
        if _missing(record):
            raise BenchError(f"result record lacks required field(s): "
                             f"{', '.join(_missing(record))}")
        if record["schema_version"] != SCHEMA_VERSION:
            raise BenchError(f"result record has schema_version "
                             f"{record['schema_version']!r}; expected {SCHEMA_VERSION}")
        identity, wanted = record_identity(record), identity_fields(record)
        path = self.path_for(record["dataset"])
        new_line = dump_record(record)  # fails before anything is touched
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock():
                old = path.read_bytes() if path.exists() else b""
                kept = []
                for line in _lines(old):
                    rec, _ = _parse(line) if line.strip() else (None, None)
                    if rec is not None and same_identity(identity_fields(rec), wanted):
                        if not replace:
                            raise BenchError(
                                f"{path} already holds a result for {identity}; "
                                "pass --replace to overwrite it")
                        continue
                    kept.append(line)  # bad lines too, verbatim: never lose stored data
                self._write_atomic(path, b"".join(l + b"\n" for l in kept + [new_line]))
        except OSError as e:
            raise BenchError(f"cannot write results to folder {self.root}: "
                             f"{e.strerror or e}") from e
        return path

    def rewrite(self, dataset: str, records: list[dict]) -> Path:
        """Replaces a dataset's whole file with ``records`` in one atomic step (for a
        reference that is regenerated as a set, e.g. ``bench check --update``)."""
        for record in records:
            if _missing(record) or record["dataset"] != dataset:
                raise BenchError(f"cannot store a record for {record.get('dataset')!r} in {dataset!r}'s file")
        path = self.path_for(dataset)
        data = b"".join(dump_record(r) + b"\n" for r in records)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock():
                self._write_atomic(path, data)
        except OSError as e:
            raise BenchError(f"cannot write results to folder {self.root}: {e.strerror or e}") from e
        return path

    def _lock(self):
        return locked(self.root / LOCK_NAME)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        # through a symlink: its target is rewritten, the link stays a link
        atomic_write(path.resolve() if path.is_symlink() else path, lambda f: f.write(data))
