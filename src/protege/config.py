"""What every typed config shares: strict pydantic models (unknown fields and non-finite floats are errors), path
strings the system can look up, and the limits that keep hostile values out. Each config lives beside the code that
uses it (DataConfig in data/, TrainConfig with the fit loop, PruneConfig with prune_, ...); recipe/schema.py
composes them into a Recipe."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

MAX_DEPTH = 50  # nesting levels a recipe (or a --set value) may have; real recipes use four or five
MAX_VALUES = 100_000  # values a recipe may hold once YAML aliases are expanded
MAX_BYTES = 1 << 20  # size of a recipe file


def _usable_path(value: str) -> str:
    """A string that names a file or folder must be one the system can look up (else Path checks raise OSError)."""
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        raise ValueError(f"'{_show(value)}' holds characters no file name can have; fix the name") from None
    if b"\0" in raw:
        raise ValueError(f"'{_show(value)}' holds a NUL character, which no file name can have; fix the name")
    if len(raw) > 4095 or any(len(part) > 255 for part in raw.split(b"/")):
        raise ValueError(f"'{_show(value)}' is too long for a file name (at most 255 bytes per name, 4095 in all); "
                         f"shorten it")
    return value


PathStr = Annotated[str, AfterValidator(_usable_path)]  # a file, folder or model name that may be a path


def _is_dir(path: str) -> bool:
    """Whether ``path`` is a folder; False for a name the system cannot even look up."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def _show(text: Any, limit: int = 80) -> str:
    """``text`` fit for a one-line message: control characters escaped, the middle of a long text cut out."""
    s = repr(str(text))[1:-1]
    return s if len(s) <= limit else f"{s[:limit // 2]}...{s[-(limit // 2):]}"


def _value(value: Any, limit: int = 80) -> str:
    """A value from a recipe as it would be written in Python, on one line and shortened."""
    try:
        s = repr(value)
    except ValueError:  # an integer beyond Python's 4300-digit string limit
        return "a number too long to show"
    return s if len(s) <= limit else f"{s[:limit // 2]}...{s[-(limit // 2):]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # every float is finite
