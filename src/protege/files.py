"""Small files protege writes (recipe.yaml, metrics.jsonl, report.json, report.html, config.json, choice.json,
manifest.json): written whole to a temporary name and renamed into place, so a full disk or a kill leaves the
previous version intact; a failed write is one StorageError that names the file and the fix."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import StorageError


def write_atomic(path: str | Path, data: str | bytes, then: str = "then run the command again") -> None:
    """Write ``data`` to ``path`` via ``path.tmp`` and a rename; on an OSError remove the temporary file and raise
    StorageError naming ``path``, what went wrong and what to do (``then``: the step after making room)."""
    from .models.loading import write_error, write_fix

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path} ({write_error(e)}; its earlier version, if any, is intact); "
                           f"{write_fix(e, path)}, {then}") from None
