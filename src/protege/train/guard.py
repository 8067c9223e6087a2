"""The divergence guard: a non-finite loss or weight stops training at once, and a model with non-finite
weights is never exported, evaluated or deployed."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError, ProtegeError


class Diverged(ProtegeError):
    """Training produced a non-finite loss or weights."""


def check_loss(value: float, *, stage: str, epoch: int, epochs: int, step: int, lr_field: str, lr: float, kept: str) -> None:
    """Raise ``Diverged`` when a batch's loss is NaN or infinite."""
    if not math.isfinite(value):
        raise Diverged(f"{stage} epoch {epoch}/{epochs}, step {step}: the loss is {value} (training diverged); lower {lr_field} "
                       f"(now {lr:g}) or distill.temperature and start again; {kept}")


def nonfinite(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers holding NaN or inf."""
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_weights(model: nn.Module, *, stage: str, epoch: int, epochs: int, lr_field: str, lr: float, kept: str) -> None:
    """Raise ``Diverged`` when a step left NaN or inf in the weights (checked before they are saved)."""
    bad = nonfinite(model)
    if bad:
        raise Diverged(f"{stage} epoch {epoch}/{epochs}: {len(bad)} weight tensor(s) hold NaN or inf ({bad[0]}, ...; training "
                       f"diverged); lower {lr_field} (now {lr:g}) or distill.temperature and start again; {kept}")


def require_finite(model: nn.Module, path: Path | str, what: str = "model") -> None:
    """Refuse a loaded model whose weights hold NaN or inf (a diverged run)."""
    bad = nonfinite(model)
    if bad:
        raise ModelError(f"{path}: the {what} holds NaN or inf in {len(bad)} weight tensor(s) ({bad[0]}, ...); it diverged in "
                         f"training and cannot be used; rerun it with a lower learning rate")
