"""A frozen teacher: live forward passes in eval mode, or logits computed once and cached on disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .output import ModelOutput


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None) -> torch.Tensor:
    """Logits of ``model`` (in eval mode, restored afterwards) for all of ``x``, returned on CPU."""
    device = device or model_device(model)
    was_training = model.training
    model.eval()
    outs = [model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


class Teacher:
    """Wraps a teacher model so the student side only ever sees ``ModelOutput``.

    The teacher always runs in eval mode under no_grad, whatever the student's mode
    (as in mdistiller's base distiller). With a cache (logits for every training example, indexed
    by position), a distillation epoch costs about what a label-only epoch costs.
    """

    def __init__(self, model: nn.Module, cache: Optional[torch.Tensor] = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache = cache  # (N_train, C) or None

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> ModelOutput:
        if self.cache is not None:
            return ModelOutput(self.cache[idx.cpu()].to(x.device))
        self.model.eval()
        with torch.no_grad():
            return ModelOutput(self.model(x.to(model_device(self.model))).float().to(x.device))


def load_or_build_cache(path: Path, fingerprint: str, model: nn.Module, x: torch.Tensor, log=print) -> torch.Tensor:
    """Teacher logits for ``x``, reused from ``path`` only if its fingerprint matches; else rebuilt."""
    if path.is_file():
        try:
            meta = json.loads(_metadata(path).get("protege", "{}"))
            if meta.get("fingerprint") == fingerprint:
                return load_file(str(path))["logits"]
            log(f"teacher cache {path} was made for another teacher or data (fingerprint differs); rebuilding it")
        except (SafetensorError, OSError, ValueError, KeyError):
            log(f"teacher cache {path} is unreadable; rebuilding it")
    logits = predict_logits(model, x)
    tmp = path.with_suffix(".tmp")
    save_file({"logits": logits.contiguous()}, str(tmp), metadata={"protege": json.dumps({"fingerprint": fingerprint})})
    tmp.replace(path)
    return logits


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
