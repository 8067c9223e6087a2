"""Task metrics from logits: accuracy, macro-F1, top-1 agreement with the teacher."""
from __future__ import annotations

from typing import Optional

import torch
from sklearn.metrics import f1_score


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None) -> dict[str, float]:
    pred = logits.argmax(-1)
    out = {
        "accuracy": float((pred == target).float().mean()),
        "macro_f1": float(f1_score(target.numpy(), pred.numpy(), average="macro", zero_division=0)),
    }
    if teacher_logits is not None:
        out["agreement"] = float((pred == teacher_logits.argmax(-1)).float().mean())
    return out
