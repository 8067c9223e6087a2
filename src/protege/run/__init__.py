"""The run folder: where every stage writes, how a later command finds (and loads) what an earlier one made,
and who may write to it."""
from .folder import Run, file_digest, read_json, weights_bytes
from .lock import locked, own_files, read_manifest, wait_until_free

__all__ = ["Run", "file_digest", "locked", "own_files", "read_json", "read_manifest", "wait_until_free", "weights_bytes"]
