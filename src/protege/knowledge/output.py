from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """A model's answer for one batch: logits (B, C) and named intermediate features by module path."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)
