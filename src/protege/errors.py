"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``ProtegeError`` messages without a traceback and exits with code 2.
"""
from __future__ import annotations


class ProtegeError(Exception):
    """A problem with the user's input or files, with the fix in the message."""


class RecipeError(ProtegeError):
    """A recipe that does not validate."""


class DataError(ProtegeError):
    """Data that cannot be read or does not fit the recipe."""


class ModelError(ProtegeError):
    """A model, factory or weights file that cannot be used."""


class RunError(ProtegeError):
    """A run folder in the wrong state (exists, unfinished, missing files)."""


class FolderInUse(RunError):
    """Another protege process holds the run folder's lock."""


class ExportError(ProtegeError):
    """An export that failed or did not match PyTorch within tolerance."""


class CompressError(ProtegeError):
    """Pruning or quantization that cannot be done as asked."""


class StorageError(ProtegeError):
    """A file that cannot be written (full disk, no permission) or read back (truncated, corrupted)."""
