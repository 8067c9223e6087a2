"""Offline teacher logits for large vocabularies: the top-k per token position, on disk, memory-mapped.

A causal LM's full logits are V floats per token (49,152 for SmolLM2: 192 kB per token in fp32), far
too many to keep for a corpus. Like DistillKit, we keep the k most likely tokens per position: their ids and
their log-probabilities at T, plus the exact log of the remaining mass (computed in fp32 from the full
logits), which becomes one explicit tail bucket (losses/token.py ``token_kd_topk``).

This is biased: the student never sees how the tail mass is shared, and which k tokens are kept depends
on the teacher (Sparse Logit Sampling, Anshumann et al. 2025, shows the bias and proposes sampling
instead). Keep k large enough that the tail is small (``tail_mass`` reports it).

Folder layout: ``ids.npy`` (N, L, k) int32, ``logp.npy`` (N, L, k) float16 log-probabilities, ``tail.npy``
(N, L) float32 log tail mass, ``meta.json`` with the key (teacher digest, corpus fingerprint, k, T, vocabulary
size, shape). The k + 1 buckets are renormalised on reading, so fp16 rounding cannot make them sum past 1.
Arrays are read with ``np.load(mmap_mode="r")``, never unpickled.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import DataError, StorageError
from ..files import write_error, write_fix
from ..logs import progress
from ..losses.token import TAIL_FLOOR
from .cache import _NpyWriter

log = logging.getLogger(__name__)
FILES = ("ids.npy", "logp.npy", "tail.npy")


class TopKCache:
    """Read side: ``get(idx)`` -> (ids (B, L, k) int64, teacher log-probabilities (B, L, k + 1) float32: the k, then the tail)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.ids, self.logp, self.tail = (np.load(self.folder / f, mmap_mode="r", allow_pickle=False) for f in FILES)

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        want = np.asarray(idx.cpu().numpy())
        i = np.sort(want)  # sorted reads are faster on a memory map
        order = np.argsort(np.argsort(want))  # back to the caller's order
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[i][order])).long()
        logp = torch.from_numpy(np.ascontiguousarray(self.logp[i][order])).float()
        tail = torch.from_numpy(np.ascontiguousarray(self.tail[i][order])).unsqueeze(-1)
        buckets = torch.cat([logp, tail], -1)
        return ids, buckets - torch.logsumexp(buckets, -1, keepdim=True)

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in FILES)

    def full_bytes(self, bytes_per_logit: int = 2) -> int:
        """What the full logits of the same positions would take (fp16 by default, as a cache would store them)."""
        n, length = self.tail.shape
        return n * length * int(self.meta["vocab_size"]) * bytes_per_logit

    def tail_mass(self) -> float:
        """Mean probability (at T) that falls outside the kept k tokens, over all positions."""
        return float(np.mean(np.exp(np.asarray(self.tail, dtype=np.float64))))


@torch.no_grad()
def build_topk_cache(folder: Path, key: dict, model: nn.Module, blocks: torch.Tensor, k: int, temperature: float,
                     batch_size: int = 8) -> TopKCache:
    """Run the teacher LM once over ``blocks`` (N, L) token ids; write the top-k folder atomically."""

    tmp = folder.with_name(folder.name + ".tmp")
    n, length = blocks.shape
    was_training = model.training
    device = next(model.parameters()).device
    vocab = None
    writers: list[_NpyWriter] = []
    try:  # plain writes, not a writable memory map: a full disk is an error naming the file, never a SIGBUS
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.eval()
        writers = [_NpyWriter(tmp / "ids.npy", np.int32, (n, length, k)), _NpyWriter(tmp / "logp.npy", np.float16, (n, length, k)),
                   _NpyWriter(tmp / "tail.npy", np.float32, (n, length))]
        ids, logp, tail = writers
        for start in progress(range(0, n, batch_size), f"teacher top-{k} cache", logger=log):
            z = model(blocks[start:start + batch_size].to(device)).float()  # (B, L, V)
            vocab = z.shape[-1]
            if k > vocab:
                raise DataError(f"distill.topk is {k} but the teacher's vocabulary has {vocab} tokens; lower distill.topk")
            log_p = torch.log_softmax(z / temperature, dim=-1)
            top = log_p.topk(k, dim=-1)
            covered = torch.logsumexp(top.values, dim=-1).clamp(max=0.0)
            ids.append(top.indices.cpu().numpy())
            logp.append(top.values.cpu().numpy())
            tail.append((-torch.expm1(covered)).clamp_min(TAIL_FLOOR).log().cpu().numpy())
        for w in writers:
            w.close()
        (tmp / "meta.json").write_text(json.dumps({**key, "k": k, "temperature": temperature, "vocab_size": vocab,
                                                   "shape": [n, length]}, indent=1))
    except BaseException as e:
        for w in writers:
            w.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise StorageError(f"cannot write the top-k cache {tmp} ({write_error(e)}); {write_fix(e, folder)}, then run "
                               f"the command again (with --resume)") from None
        raise
    finally:
        model.train(was_training)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return TopKCache(folder)


def _mismatch(meta: dict, key: dict, k: int, temperature: float, shape: list[int]) -> Optional[str]:
    for name, what in (("teacher", "another teacher"), ("data", "another corpus or tokenisation")):
        if meta.get(name) != key.get(name):
            return what
    if meta.get("shape") != shape:
        return f"blocks of shape {meta.get('shape')} (this run: {shape})"
    if meta.get("k") != k or meta.get("temperature") != temperature:
        return f"k={meta.get('k')}, T={meta.get('temperature')} (this run: k={k}, T={temperature})"
    return None


def load_or_build_topk(folder: Path, key: dict, model: nn.Module, blocks: torch.Tensor, k: int, temperature: float,
                       strict: bool = False) -> TopKCache:
    """Reuse ``folder`` if it was made from this teacher, corpus, k and T. Otherwise: with ``strict`` (a cache the
    user pointed to) refuse with an error, else rebuild it and say why."""
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        try:
            why = _mismatch(json.loads(meta_file.read_text()), key, k, temperature, list(blocks.shape))
        except (OSError, ValueError):
            why = "an unreadable meta.json"
        if why is None:
            return TopKCache(folder)
        if strict:
            raise DataError(f"top-k cache {folder} was made for {why}; delete it or point distill.topk_cache at another "
                            f"folder (it is rebuilt there)")
        log.info(f"top-k cache {folder} was made for {why}; rebuilding it")
    cache = build_topk_cache(folder, key, model, blocks, k, temperature)
    log.info(f"teacher top-{k} cache: {blocks.shape[0]} x {blocks.shape[1]} positions, {cache.nbytes() / 2**20:.1f} MiB "
        f"({cache.full_bytes() / max(cache.nbytes(), 1):.0f}x smaller than full fp16 logits), tail mass {cache.tail_mass():.4f}")
    return cache
