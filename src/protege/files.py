"""Small files protege writes (recipe.yaml, metrics.jsonl, report.json, report.html, config.json, choice.json,
manifest.json): written whole to a temporary name and renamed into place, so a full disk or a kill leaves the
previous version intact; a failed write is one StorageError that names the file and the fix."""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import StorageError


def write_atomic(path: str | Path, data: str | bytes, then: str = "then run the command again") -> None:
    """Write ``data`` to ``path`` via a temporary file of its own (``path.<pid>-<random>.tmp``: writers of one file at
    once, on one machine or several, never share it) and a rename; on an OSError remove the temporary file and raise
    StorageError naming ``path``, what went wrong and what to do (``then``: the step after making room)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path} ({write_error(e)}; its earlier version, if any, is intact); "
                           f"{write_fix(e, path)}, {then}") from None


@contextlib.contextmanager
def exclusive(lock: Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` (made with its folder if missing) for the block; a second
    process waits (logging ``waiting`` first, if given). For work that one process does and the others then read
    (a decoded image file, a shared teacher cache)."""
    import fcntl  # POSIX only: imported where it is used

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if waiting:
                logging.getLogger(__name__).info(waiting)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _errno(e: BaseException) -> Optional[int]:
    if isinstance(e, OSError):
        return e.errno
    code = re.search(r"os error (\d+)", str(e))  # safetensors: 'I/O error: No space left on device (os error 28)'
    return int(code.group(1)) if code else None


def write_error(e: BaseException) -> str:
    """A failed write in a few words: the system's text for it, else the first line of the error."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = _errno(e)
    if code is not None:
        return os.strerror(code)
    return (str(e).splitlines() or [""])[0][:160] or type(e).__name__


def write_fix(e: BaseException, path: Path) -> str:
    """What to do about a failed write of ``path``."""
    code = _errno(e)
    if code == errno.EFBIG:
        return "raise the file-size limit (ulimit -f) or write to another disk"
    if code in (errno.EACCES, errno.EPERM):
        return f"make {Path(path).parent} writable or write elsewhere"
    if code == errno.EROFS:
        return "the disk is read-only: write elsewhere"
    if code in (errno.ENOENT, errno.ENOTDIR):
        return f"the folder {Path(path).parent} does not exist (or is not a folder): create it or write elsewhere"
    return f"free space on the disk that holds {Path(path).parent}"


def finite_json(value: Any) -> Any:
    """``value`` with NaN and inf floats replaced by None, so it is valid JSON (``null``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
