"""The run folder: where every stage writes, how a later command finds (and loads) what an earlier one made,
and who may write to it."""
from .folder import Run, file_digest, read_json, weights_bytes
from .layout import JOIN
from .lock import joined, locked, own_files, read_manifest, wait_until_free

__all__ = ["JOIN", "Run", "file_digest", "joined", "locked", "own_files", "read_json", "read_manifest", "wait_until_free", "weights_bytes"]
