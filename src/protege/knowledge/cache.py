"""The teacher-output cache: logits and hooked features for every training example, on disk, memory-mapped.

Layout of a cache folder: ``meta.json`` (what it was made from, and a sha256 of each file) and one ``.npy``
file per output (``logits.npy`` in float32; features in float16 to halve the disk and page-cache cost; the
loss sees float32). The files are written with ordinary writes (a full disk is an error that names the file,
not a SIGBUS from a memory map) and read with ``np.load(mmap_mode="r")``, never unpickled. The cache is reused
only when the teacher file, the data, the hooked paths and the input transform all match and every file still
has the checksum it was written with; anything else rebuilds it with a message that says why.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data.stream import trim
from ..errors import RecipeError, StorageError
from ..files import write_error, write_fix
from ..logs import progress
from .features import extract, model_device
from .output import ModelOutput

log = logging.getLogger(__name__)

FORMAT = 3  # 3: sequence axes recorded (text batches are cut to their longest text); 2: files written with plain
# writes, a sha256 per file in meta.json; 1: memory-mapped writes, no checksums
CHUNK = 1 << 20


class TeacherCache:
    """Read side: ``cache.get(idx)`` gives the teacher's ModelOutput for training examples ``idx``."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder, self.meta = folder, meta
        self.arrays = {name: np.load(folder / e["file"], mmap_mode="r", allow_pickle=False) for name, e in meta["entries"].items()}
        for name, e in meta["entries"].items():
            a = self.arrays[name]
            if list(a.shape) != list(e["shape"]) or a.dtype != np.dtype(e["dtype"]):
                raise ValueError(f"{folder / e['file']} holds {a.dtype}{list(a.shape)}, meta.json says {e['dtype']}{e['shape']}")

    @property
    def paths(self) -> list[str]:
        return [k for k in self.arrays if k != "logits"]

    def get(self, idx: torch.Tensor, length: Optional[int] = None) -> ModelOutput:
        """The outputs for examples ``idx``; with ``length`` (the positions of a batch of token ids cut to its longest
        text), every sequence axis cut to that length."""
        i = np.asarray(idx.cpu().numpy())

        def read(name: str) -> torch.Tensor:
            a = self.arrays[name][i]
            if length is not None:
                a = a[tuple(slice(0, length) if d in self.meta["entries"][name].get("seq_dims", ()) else slice(None)
                            for d in range(a.ndim))]
            return torch.from_numpy(np.ascontiguousarray(a))

        return ModelOutput(read("logits"), {p: read(p).float() for p in self.paths})

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (about 0.13 s per 100 MiB on a CPU with SHA extensions)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _NpyWriter:
    """A ``.npy`` file written front to back with plain writes: the header for the final shape, then each batch."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), tuple(shape)
        self.rows = 0
        self.hash = hashlib.sha256()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": self.shape})
        self.f: Optional[BinaryIO] = open(path, "wb")
        self._write(header.getvalue())

    def _write(self, data) -> None:
        self.f.write(data)
        self.hash.update(data)

    def append(self, values: np.ndarray) -> None:
        a = np.ascontiguousarray(values, dtype=self.dtype)
        if a.shape[1:] != self.shape[1:] or self.rows + len(a) > self.shape[0]:
            raise ValueError(f"{self.path}: a batch of shape {a.shape} does not fit the array {self.shape}")
        self._write(memoryview(a).cast("B"))
        self.rows += len(a)

    def close(self) -> str:
        """Close the file (flushing it); its sha256. Every row must have been written."""
        f, self.f = self.f, None
        f.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
        return self.hash.hexdigest()

    def abandon(self) -> None:
        if self.f is not None:
            f, self.f = self.f, None
            try:
                f.close()
            except OSError:  # the flush of a file being thrown away failed too (full disk): nothing to keep
                pass


def _differs(old: dict, new: dict) -> str:
    names = {"teacher": "the teacher weights", "data": "the data", "paths": "the hooked feature paths", "transform": "the input transform"}
    changed = [names[k] for k in names if old.get(k) != new.get(k)]
    return ", ".join(changed) or "its format"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{max(n, 1) / 2**10:.0f} kB"


@dataclass
class Share:
    """This process's part of a cache that several processes write together: process ``rank`` of ``world``, and
    ``barrier`` (returns when every process has reached it). One process: the whole cache."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None
    agree: Callable[[Any], Any] = lambda value: value  # every process gets the first process's value

    def rows(self, n: int) -> range:
        per = math.ceil(n / self.world)
        return range(min(n, self.rank * per), min(n, (self.rank + 1) * per))


@torch.no_grad()
def build_cache(folder: Path, key: dict, model: nn.Module, x: torch.Tensor, paths: Sequence[str], batch_size: int = 256,
                share: Share = Share(), pad_id: Optional[int] = None) -> TeacherCache:
    """Run the teacher once over ``x`` and write the cache folder atomically (a temporary folder, then a rename).

    Token ids with a ``pad_id`` go to the teacher cut to each batch's longest text, as the student sees them; the
    axes of each output that follow the text's length are found by running the teacher on one example at two
    lengths, recorded in meta.json as ``seq_dims``, and padded with zeros to the full length on disk.
    With several processes (``share``), each runs the teacher on its own block of rows and writes it into the same
    files at its offset, in parallel; the first process then checks the files and puts the folder in place.
    A failed write (full disk, no permission) raises StorageError naming the file; the temporary folder is
    removed and an earlier cache in ``folder`` is left as it was.
    """
    tmp = folder.with_name(folder.name + ".tmp")
    was_training = model.training
    main = share.rank == 0
    current, need = tmp, 0
    try:
        model.eval()
        rows = share.rows(len(x))
        starts = list(range(rows.start, rows.stop, batch_size))

        def outputs(start: int) -> dict[str, torch.Tensor]:
            xb = trim(x[start:min(start + batch_size, rows.stop)], pad_id)
            out = extract(model, xb.to(model_device(model)), paths, "teacher")
            return {name: _pad_to(t, seq.get(name, ()), x.shape[1]) for name, t in {"logits": out.logits, **out.features}.items()}

        seq = _sequence_axes(model, x, paths) if pad_id is not None else {}

        first = outputs(starts[0]) if starts else {}  # its shapes size the files (the first process always has rows)
        entries = {}
        for name, t in first.items():
            dtype = np.dtype(np.float32 if name == "logits" else np.float16)
            entries[name] = {"file": f"{len(entries)}.npy", "shape": [len(x), *t.shape[1:]], "dtype": dtype.name,
                             "seq_dims": list(seq.get(name, ()))}
            need += math.prod(entries[name]["shape"]) * dtype.itemsize
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for e in entries.values():
                current = tmp / e["file"]
                _allocate(current, np.dtype(e["dtype"]), tuple(e["shape"]))
        share.barrier()
        offsets = {name: _header_size(tmp / e["file"]) for name, e in entries.items()}
        files = {name: open(tmp / e["file"], "r+b") for name, e in entries.items()}
        try:
            for start in progress(starts, "teacher cache", logger=log, enabled=main):
                for name, t in (first if start == rows.start else outputs(start)).items():
                    e, f = entries[name], files[name]
                    a = np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype=np.dtype(e["dtype"]))
                    if list(a.shape[1:]) != e["shape"][1:] or start + len(a) > rows.stop:
                        raise ValueError(f"teacher output {name}: a batch of shape {list(a.shape)} at row {start} does not "
                                         f"fit the cache's {e['shape']} (rows {rows.start}-{rows.stop})")
                    current = tmp / e["file"]
                    f.seek(offsets[name] + start * a[0].nbytes)
                    f.write(memoryview(a).cast("B"))
        finally:
            for f in files.values():
                f.close()
        share.barrier()
        if main:
            for e in entries.values():
                current = tmp / e["file"]
                e["sha256"] = file_sha256(current)
            current = tmp / "meta.json"
            current.write_text(json.dumps({**key, "format": FORMAT, "entries": entries}, indent=1))
            current = folder
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        share.barrier()
    except OSError as e:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        size = f"; the cache needs about {_size(need)}" if need else ""
        raise StorageError(f"cannot write the teacher cache file {e.filename or current} ({write_error(e)}{size}); "
                           f"{write_fix(e, folder)} (or set distill.cache_teacher: false), then run the command again "
                           f"(with --resume for `protege distill`)") from None
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        model.train(was_training)
    return TeacherCache(folder)


def _sequence_axes(model: nn.Module, x: torch.Tensor, paths: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """For each output, the axes whose size follows the number of positions: those that differ between one example
    run at its full length and at half of it."""
    length = x.shape[1]
    if length < 2:
        return {}
    device = model_device(model)
    full, half = (extract(model, x[:1, :n].to(device), paths, "teacher") for n in (length, length // 2))
    shapes = lambda out: {"logits": out.logits.shape, **{p: t.shape for p, t in out.features.items()}}  # noqa: E731
    a, b = shapes(full), shapes(half)
    axes = {name: tuple(d for d in range(1, len(a[name])) if a[name][d] != b[name][d]) for name in a}
    for name, found in axes.items():
        odd = [d for d in found if (a[name][d], b[name][d]) != (length, length // 2)]
        if odd:
            raise RecipeError(f"teacher output '{name}' has an axis of {a[name][odd[0]]} positions for {length} tokens "
                              f"({b[name][odd[0]]} for {length // 2}): protege cuts cached outputs per batch only along "
                              f"axes of one position per token; set distill.cache_teacher: false (live teacher passes)")
    return axes


def _pad_to(t: torch.Tensor, axes: Sequence[int], length: int) -> torch.Tensor:
    """``t`` padded with zeros at the end of each of ``axes`` to ``length``."""
    for d in axes:
        if t.shape[d] < length:
            shape = list(t.shape)
            shape[d] = length - t.shape[d]
            t = torch.cat([t, t.new_zeros(shape)], dim=d)
    return t


def _allocate(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """A .npy file of ``shape``: its header, then room for the data (written later by plain writes at each block's
    offset, so a full disk is an error that names the file, never a SIGBUS from a memory map)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                  "shape": shape})
    with open(path, "wb") as f:
        f.write(header.getvalue())
        f.truncate(len(header.getvalue()) + math.prod(shape) * dtype.itemsize)


def _header_size(path: Path) -> int:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def _damage(folder: Path, meta: dict) -> Optional[str]:
    """Why the cache's files are not the ones meta.json describes (a checksum that no longer matches), or None."""
    for e in meta["entries"].values():
        if not re.fullmatch(r"\d+\.npy", str(e["file"])):
            return f"meta.json names a file {e['file']!r} protege does not write"
        file = folder / e["file"]
        if not file.is_file():
            return f"{file} is missing"
        if file_sha256(file) != e["sha256"]:
            return f"{file} does not match its checksum (damaged on disk)"
    return None


def _reusable(folder: Path, key: dict) -> bool:
    """Whether ``folder`` holds a cache made from ``key`` whose files still match their checksums (else says why)."""
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return False
    try:
        old = json.loads(meta_file.read_text())
        if not all(old.get(k) == v for k, v in key.items()):
            log.info(f"teacher cache {folder} was made for other inputs ({_differs(old, key)} changed); rebuilding it")
        elif old.get("format") != FORMAT or not all("sha256" in e for e in old["entries"].values()):
            log.info(f"teacher cache {folder} was written by an older protege (another format); rebuilding it")
        elif (why := _damage(folder, old)) is not None:
            log.info(f"teacher cache {folder}: {why}; rebuilding it")
        else:
            TeacherCache(folder)  # readable, with the shapes meta.json gives
            return True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        log.info(f"teacher cache {folder} is unreadable; rebuilding it")
    return False


def load_or_build_cache(folder: Path, key: dict, model: nn.Module, x: torch.Tensor, paths: Sequence[str] = (),
                        share: Share = Share(), pad_id: Optional[int] = None) -> TeacherCache:
    """Reuse ``folder`` if it was made from the same teacher, data, paths and transform (``key``) and its files
    still match their checksums; else rebuild it (every process of ``share`` calls this, and they write it together)."""
    key = {**key, "paths": sorted(set(paths)), "transform": key.get("transform", "none")}
    if share.agree(_reusable(folder, key) if share.rank == 0 else None):  # the first process decides for all
        return TeacherCache(folder)
    cache = build_cache(folder, key, model, x, key["paths"], share=share, pad_id=pad_id)
    log.info(f"teacher cache: {len(x)} examples, logits{' and ' + str(len(cache.paths)) + ' feature map(s)' if cache.paths else ''}, "
        f"{cache.nbytes() / 2**20:.1f} MiB in {folder}")
    return cache
