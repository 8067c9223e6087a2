"""A frozen teacher: live forward passes in eval mode, or outputs computed once and cached on disk (cache.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import nn

from ..data.stream import trim
from .features import LOGITS, extract, model_device
from .output import ModelOutput

if TYPE_CHECKING:
    from .cache import TeacherCache


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | str | None = None,
                   pad_id: Optional[int] = None) -> torch.Tensor:
    """Logits of ``model`` (in eval mode, restored afterwards) for all of ``x``, returned on CPU; token ids with a
    ``pad_id`` are cut to each batch's longest text."""
    device = device or model_device(model)
    was_training = model.training
    model.eval()
    outs = [model(trim(x[i:i + batch_size], pad_id).to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


class Teacher:
    """Wraps a teacher model so the student side only ever sees ``ModelOutput`` (logits and hooked features).

    The teacher always runs in eval mode under no_grad, whatever the student's mode
    (as in mdistiller's base distiller). With a cache (outputs for every training example, indexed
    by position), a distillation epoch costs about what a label-only epoch costs. ``cache`` is a
    ``TeacherCache`` or, for logits only, a (N_train, C) tensor.
    """

    def __init__(self, model: nn.Module, cache: Union["TeacherCache", torch.Tensor, None] = None, paths: Sequence[str] = ()):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.cache = cache
        self.paths = list(dict.fromkeys(paths))
        if isinstance(cache, torch.Tensor) and [p for p in self.paths if p != LOGITS]:
            raise ValueError("a logits-only cache cannot serve feature paths; build a TeacherCache with those paths")

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> ModelOutput:
        if isinstance(self.cache, torch.Tensor):
            out = ModelOutput(self.cache[idx.cpu()])
        elif self.cache is not None:
            out = self.cache.get(idx, length=None if x.is_floating_point() else x.shape[-1])  # token ids: cut positions
        else:
            self.model.eval()
            with torch.no_grad():
                out = extract(self.model, x.to(model_device(self.model)), [p for p in self.paths if p != LOGITS], "teacher")
        feats = {p: (out.logits if p == LOGITS else out.features[p]).float().to(x.device) for p in self.paths}
        return ModelOutput(out.logits.float().to(x.device), feats)
