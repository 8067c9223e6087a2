"""Learned adapters that map a student feature to the teacher's shape (FitNets regressors; Romero et al. 2015).

Shapes are per example (no batch dimension):
- (C, H, W) -> (C', H', W'): 1x1 convolution for channels, then average pooling (shrink) or bilinear
  interpolation (grow) for the spatial size;
- (D,) -> (D',): a linear map;
- (N, D) -> (N, D'): a linear map on the last dimension (token features; N must agree).
Anything else cannot be bridged and is an error naming the two shapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RecipeError


class Resize2d(nn.Module):
    """Resize (B, C, H, W) to a fixed (H', W'): average pooling when shrinking, bilinear when growing."""

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        if x.shape[-2] >= self.size[0] and x.shape[-1] >= self.size[1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def make_adapter(s: tuple[int, ...], t: tuple[int, ...], where: str) -> nn.Module:
    """An adapter from per-example student shape ``s`` to teacher shape ``t``."""
    if len(s) == 3 and len(t) == 3:
        layers: list[nn.Module] = []
        if s[0] != t[0]:
            layers.append(nn.Conv2d(s[0], t[0], 1, bias=False))
        if s[1:] != t[1:]:
            layers.append(Resize2d((t[1], t[2])))
        return nn.Sequential(*layers)
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == 2 and len(t) == 2 and s[0] == t[0]:
        return nn.Linear(s[1], t[1])
    raise RecipeError(f"{where}: no adapter can map shape {s} to {t} (a 1x1 conv + resize bridges (C,H,W) maps, a linear "
                      f"layer bridges vectors and token features of equal length); hook layers of matching kind")


def check_term_shapes(loss: str, s: torch.Size, t: torch.Size, where: str) -> None:
    """Fail before training when a term cannot compare these two features."""
    if s[0] != t[0]:
        raise RecipeError(f"{where}: batch sizes differ; hook modules that keep one row per example")
    if loss == "attention_kl" and (len(s) != 4 or len(t) != 4 or s[-2:] != t[-2:]):
        raise RecipeError(f"{where}: attention_kl compares attention maps (heads, L, L) of the same length L; hook "
                          f"the text model's attention.N taps on both sides (see `protege inspect`)")
    if loss == "at" and (len(s) < 3 or len(t) < 3):
        raise RecipeError(f"{where}: attention transfer needs spatial (C,H,W) or token (N,D) features; hook a conv "
                          f"or transformer layer, or use rkd_distance / sp for vectors")
    if loss == "at" and len(s) != len(t):
        raise RecipeError(f"{where}: attention transfer compares features of one kind (both (C,H,W) or both (N,D))")
    if loss == "at" and len(s) == 3 and s[1] != t[1]:
        raise RecipeError(f"{where}: attention transfer over tokens needs the same number of tokens on both sides")
