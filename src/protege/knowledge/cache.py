"""The teacher-output cache: logits and hooked features for every training example, on disk, memory-mapped.

Layout of a cache folder: ``meta.json`` (what it was made from) and one ``.npy`` file per output
(``logits.npy`` in float32; features in float16 to halve the disk and page-cache cost; the loss
sees float32). Arrays are read with ``np.load(mmap_mode="r")``, never unpickled. The cache is reused
only when the teacher file, the data, the hooked paths and the input transform all match; anything
else rebuilds it with a message that says what changed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .features import extract
from .output import ModelOutput
from .teacher import model_device

Log = Callable[[str], None]


class TeacherCache:
    """Read side: ``cache.get(idx)`` gives the teacher's ModelOutput for training examples ``idx``."""

    def __init__(self, folder: Path):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder, self.meta = folder, meta
        self.arrays = {name: np.load(folder / e["file"], mmap_mode="r", allow_pickle=False) for name, e in meta["entries"].items()}

    @property
    def paths(self) -> list[str]:
        return [k for k in self.arrays if k != "logits"]

    def get(self, idx: torch.Tensor) -> ModelOutput:
        i = np.asarray(idx.cpu().numpy())
        logits = torch.from_numpy(np.ascontiguousarray(self.arrays["logits"][i]))
        feats = {p: torch.from_numpy(np.ascontiguousarray(self.arrays[p][i])).float() for p in self.paths}
        return ModelOutput(logits, feats)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def _differs(old: dict, new: dict) -> str:
    names = {"teacher": "the teacher weights", "data": "the data", "paths": "the hooked feature paths", "transform": "the input transform"}
    changed = [names[k] for k in names if old.get(k) != new.get(k)]
    return ", ".join(changed) or "its format"


@torch.no_grad()
def build_cache(folder: Path, key: dict, model: nn.Module, x: torch.Tensor, paths: Sequence[str], batch_size: int = 256) -> TeacherCache:
    """Run the teacher once over ``x`` and write the cache folder atomically (a temporary folder, then a rename)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    was_training = model.training
    model.eval()
    arrays: dict[str, np.ndarray] = {}
    entries: dict[str, dict] = {}
    try:
        for start in tqdm(range(0, len(x), batch_size), desc="teacher cache", leave=False, disable=None):
            out = extract(model, x[start:start + batch_size].to(model_device(model)), paths, "teacher")
            for name, t in {"logits": out.logits, **out.features}.items():
                if name not in arrays:
                    dtype = np.float32 if name == "logits" else np.float16
                    entries[name] = {"file": f"{len(entries)}.npy", "shape": [len(x), *t.shape[1:]], "dtype": np.dtype(dtype).name}
                    arrays[name] = np.lib.format.open_memmap(tmp / entries[name]["file"], mode="w+", dtype=dtype,
                                                             shape=(len(x), *t.shape[1:]))
                arrays[name][start:start + len(t)] = t.detach().float().cpu().numpy()
    finally:
        model.train(was_training)
    for a in arrays.values():
        a.flush()
    del arrays
    (tmp / "meta.json").write_text(json.dumps({**key, "entries": entries}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return TeacherCache(folder)


def load_or_build_cache(folder: Path, key: dict, model: nn.Module, x: torch.Tensor, paths: Sequence[str] = (),
                        log: Log = print) -> TeacherCache:
    """Reuse ``folder`` if it was made from the same teacher, data, paths and transform (``key``); else rebuild it."""
    key = {**key, "paths": sorted(set(paths)), "transform": key.get("transform", "none")}
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        try:
            old = json.loads(meta_file.read_text())
            if all(old.get(k) == v for k, v in key.items()):
                return TeacherCache(folder)
            log(f"teacher cache {folder} was made for other inputs ({_differs(old, key)} changed); rebuilding it")
        except (OSError, ValueError, KeyError):
            log(f"teacher cache {folder} is unreadable; rebuilding it")
    cache = build_cache(folder, key, model, x, key["paths"])
    log(f"teacher cache: {len(x)} examples, logits{' and ' + str(len(cache.paths)) + ' feature map(s)' if cache.paths else ''}, "
        f"{cache.nbytes() / 2**20:.1f} MiB in {folder}")
    return cache
