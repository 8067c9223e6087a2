"""Examples read on demand: data larger than memory.

``Rows`` stands where an in-memory split holds a float32 tensor. It keeps a memory-mapped array (a .npy of arrays,
or the uint8 file images are decoded into once) and the row numbers of its split, and turns only the rows asked for
into float32 with the same arithmetic as the in-memory path, so a streamed run and an in-memory one see the same
numbers. The fit loop reads a streamed training split through a torch DataLoader with worker processes; each
process of a multi-process run reads only the batches of its own shard.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

CHUNK = 4096  # rows per read when a whole split is walked (fingerprint, scaling)


def affine(a: np.ndarray, divide: float, shift: float, divisor: float, shape: Sequence[int]) -> np.ndarray:
    """float32 ``(a / divide - shift) / divisor`` with each row reshaped to ``shape``: the one formula of both paths."""
    return ((np.asarray(a, dtype=np.float32) / divide - shift) / divisor).reshape(len(a), *shape)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """``a`` as a tensor; one-channel images (N, 1, H, W) get the strides of channels-last, the same bytes, for which
    CPU convolutions take a faster path (measured: a CNN epoch on Fashion-MNIST about 1.4x faster than with the
    strides of channels-first; the built-in sources' arrays always had them)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dim() == 4 and t.shape[1] == 1:
        t = t.as_strided(t.shape, (t.shape[2] * t.shape[3], 1, t.shape[3], 1))
    return t


class Rows:
    """Rows ``index`` of the memory-mapped ``source``, as float32 tensors of shape ``(len(rows), *shape)`` after
    ``affine``. Indexing (an int, a slice, or a tensor / array / list of positions) reads those rows only.
    ``digest``: a hash of ``source``'s bytes when one is known (the image cache writes one), else the rows are hashed."""

    def __init__(self, source: np.ndarray, index: np.ndarray, shape: Sequence[int], divide: float = 1.0,
                 shift: float = 0.0, divisor: float = 1.0, digest: Optional[str] = None, workers: int = 0):
        self.source, self.index, self.example_shape = source, np.asarray(index, dtype=np.int64), tuple(shape)
        self.divide, self.shift, self.divisor, self.digest, self.workers = divide, shift, divisor, digest, workers

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.example_shape))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if isinstance(key, (int, np.integer)) or (isinstance(key, np.ndarray) and key.ndim == 0):
            return self[[int(key)]][0]
        rows = self.index[key]
        order = np.argsort(rows, kind="stable")  # ascending reads of the file, then back in the order asked
        a = np.empty((len(rows), *self.source.shape[1:]), dtype=self.source.dtype)
        a[order] = self.source[rows[order]]
        return as_tensor(affine(a, self.divide, self.shift, self.divisor, self.example_shape))

    def __getstate__(self) -> dict:
        """A worker started by spawn reopens the file instead of receiving a copy of its bytes."""
        state = dict(self.__dict__)
        s = self.source
        if isinstance(s, np.memmap) and s.filename:
            state["source"] = (s.filename, s.dtype.str, s.shape, s.offset)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state["source"], tuple):
            name, dtype, shape, offset = state["source"]
            state["source"] = np.memmap(name, dtype=np.dtype(dtype), mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)

    def chunks(self) -> Iterator[np.ndarray]:
        """The raw rows of this split in order, ``CHUNK`` at a time."""
        for i in range(0, len(self), CHUNK):
            rows = self.index[i:i + CHUNK]
            yield np.asarray(self.source[rows])

    def hash_into(self, h) -> None:
        """Feed what determines these examples into the hash ``h`` (for caches keyed by the data)."""
        h.update(repr((self.source.dtype.str, self.source.shape, self.example_shape, self.divide, self.shift,
                       self.divisor)).encode())
        h.update(self.index.tobytes())
        if self.digest is not None:
            h.update(self.digest.encode())
            return
        for c in self.chunks():
            h.update(np.ascontiguousarray(c).tobytes())


class _Batches(torch.utils.data.Dataset):
    """A dataset whose items are whole batches: item ``idx`` (a tensor of positions) is (x, y, idx)."""

    def __init__(self, x: Rows, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx: torch.Tensor):
        return self.x[idx], self.y[idx], idx


def batches(x, y: torch.Tensor, order: Sequence[torch.Tensor],
            pad_id: Optional[int] = None) -> Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(inputs, labels, positions) of each batch of positions in ``order``. In-memory inputs are indexed directly
    (token ids cut to the batch's longest text, see ``trim``); streamed ones (``Rows``) are read by a DataLoader with
    ``x.workers`` worker processes, which read ahead while the model trains. Only the rows in ``order`` are read."""
    if not isinstance(x, Rows):
        return _Direct(x, y, order, pad_id)
    workers = x.workers
    return torch.utils.data.DataLoader(_Batches(x, y), sampler=list(order), batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)


class _Direct:
    """Batches of in-memory tensors, indexed as they are asked for."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, order: Sequence[torch.Tensor], pad_id: Optional[int]):
        self.x, self.y, self.order, self.pad_id = x, y, order, pad_id

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for idx in self.order:
            yield trim(self.x[idx], self.pad_id), self.y[idx], idx


def trim(x: torch.Tensor, pad_id: Optional[int]) -> torch.Tensor:
    """Token ids (B, L) padded on the right, cut to the batch's longest text (at least one position): a batch is
    padded to its own longest example, not the data set's. Other inputs (``pad_id`` None) are returned as they are."""
    if pad_id is None:
        return x
    used = (x != pad_id).any(0).nonzero()
    return x[:, : int(used[-1]) + 1 if len(used) else 1]


# DataLoader workers for streamed data when the recipe sets none. Measured on 2 cores (Fashion-MNIST as 70k PNGs,
# benchmarks/stream_images.py): a batch from the memory-mapped uint8 cache costs microseconds, and one worker process
# made an epoch slower by taking a core from the training threads. Set data.workers where the files sit on slow
# storage and there are cores to spare.
DEFAULT_WORKERS = 0


def fingerprint(x, y: torch.Tensor) -> str:
    """A short hash of inputs (in memory or streamed) and labels."""
    h = hashlib.sha256(str((tuple(x.shape), str(x.dtype))).encode())  # same bytes, other blocks
    if isinstance(x, Rows):
        x.hash_into(h)
    else:
        h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:16]
