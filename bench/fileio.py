"""Atomic file writes (what is stored is either the old file or the whole new one) and
an inter-process lock (``locked``)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from bench.errors import BenchError


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Calls ``write(f)`` on a temporary file next to ``path``, fsyncs it and renames it
    over ``path``. A kill at any point leaves the previous file intact; the temporary
    name is unique, so two processes writing the same path cannot interleave their bytes
    (the last complete one wins). A failed write (a full disk, a folder that cannot be
    written) is a BenchError naming ``path``, and leaves no partial file."""
    path = Path(path)
    try:
        _write(path, write)
    except OSError as e:
        error = e
    except RuntimeError as e:  # torch.save wraps the OSError of a failed write
        if not isinstance(e.__context__, OSError):
            raise
        error = e.__context__
    else:
        return
    raise BenchError(f"cannot write {path}: {error.strerror or error}") from None


def _write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; ours are not
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # make the rename itself durable; not every platform lets us fsync a folder
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@contextlib.contextmanager
def locked(path: os.PathLike | str, timeout: float = -1) -> Iterator[None]:
    """Holds an exclusive inter-process lock on the file ``path`` (created if absent)
    for the ``with`` block, through ``filelock`` (portable: flock on POSIX, msvcrt on
    Windows). ``timeout`` seconds to wait (-1: forever); a lock not got in time is a
    BenchError naming ``path``. Not re-entrant across processes, re-entrant in one."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(path), timeout=timeout):
            yield
    except Timeout:
        raise BenchError(f"could not lock {path} within {timeout} s (another bench process holds it)") from None
