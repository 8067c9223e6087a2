"""protege's log messages, captured for a test (the library logs through ``logging``; see protege/logs.py)."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator


class _Into(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextlib.contextmanager
def logged(into: list[str]) -> Iterator[list[str]]:
    """Append every message protege logs (INFO and up) while the block runs to ``into``."""
    logger = logging.getLogger("protege")
    handler, level = _Into(into), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield into
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
