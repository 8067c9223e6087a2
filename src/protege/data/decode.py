"""Reading a user's text file (CSV, JSONL, a corpus) in the encoding the recipe states, with an error that says where
the bytes stop being that encoding."""
from __future__ import annotations

import codecs
from pathlib import Path

from ..errors import DataError


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The file's text; UTF-8 may start with a byte-order mark (Excel writes one). Bytes that are not ``encoding``
    are a one-line DataError naming the file, the line, the byte and the fix."""
    raw = Path(path).read_bytes()
    utf8 = codecs.lookup(encoding).name == "utf-8"
    codec = "utf-8-sig" if utf8 else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}: line {line}, byte {column} (0x{raw[e.start]:02x}) is not {'UTF-8' if utf8 else encoding} text; set "
                        f"data.encoding to the file's encoding (for example latin-1 or cp1252), or save the file as UTF-8") from None


def known_encoding(name: str) -> str:
    """``name`` if Python can decode it, else ValueError naming a few that it can."""
    try:
        codecs.lookup(name)
    except LookupError:
        raise ValueError(f"encoding {name!r} is not one Python knows; use for example utf-8, latin-1, cp1252 or utf-16") from None
    return name
