"""The Distiller: a weighted sum of named loss terms, each a pure function from losses.functional."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..knowledge import ModelOutput, Teacher
from ..losses import functional as LF
from ..recipe import DistillConfig

Losses = dict[str, torch.Tensor]
ResponseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DistillConfig], torch.Tensor]

# The one registry: recipe name -> response-based term (student logits, teacher logits, target, config).
RESPONSE: dict[str, ResponseFn] = {
    "kl": lambda s, t, y, c: LF.kd_kl(s, t, c.temperature),
    "mse_prob": lambda s, t, y, c: LF.mse_prob(s, t, c.temperature),
    "mse_logits": lambda s, t, y, c: LF.mse_logits(s, t),
    "dkd": lambda s, t, y, c: LF.dkd(s, t, y, c.dkd_alpha, c.dkd_beta, c.temperature),
}


def label_loss(label_smoothing: float = 0.0) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], Losses]:
    """Plain supervised training (teachers, and students from scratch)."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Losses:
        ce = LF.cross_entropy(model(x), y, label_smoothing)
        return {"loss": ce, "ce": ce}

    return loss_fn


class Distiller:
    """loss = alpha * CE(student, labels) + (1 - alpha) * response(student, teacher).

    Returns a dict of named losses ('loss' is the total that is optimised) so every term is logged.
    """

    def __init__(self, teacher: Teacher, cfg: DistillConfig, label_smoothing: float = 0.0):
        self.teacher, self.cfg, self.label_smoothing = teacher, cfg, label_smoothing
        self.response = RESPONSE[cfg.response]

    def __call__(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Losses:
        s = ModelOutput(student(x))
        t: Optional[ModelOutput] = self.teacher(x, idx)
        a = self.cfg.alpha
        ce = LF.cross_entropy(s.logits, y, self.label_smoothing)
        kd = self.response(s.logits, t.logits, y, self.cfg)
        return {"loss": a * ce + (1 - a) * kd, "ce": ce, "kd": kd}
