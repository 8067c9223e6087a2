"""Fixed augmented views of the training images, so a teacher's outputs on augmented inputs can be cached.

Live augmentation makes every epoch's inputs new, so the teacher must run on every batch (for a CNN teacher ten times
the student's size, most of the epoch's time). With ``distill.teacher_views: K`` the augmentation of example i in
view k is fixed (a crop offset after zero padding and a horizontal flip, drawn once from a seeded generator), the
teacher's outputs on all K views are cached once, and epoch e trains on view e mod K: the student sees augmented
images and the teacher's answer for exactly the image the student sees (consistent teaching, Beyer et al. 2022,
"Knowledge distillation: A good teacher is patient and consistent"; stored soft labels of augmented views as in
FKD, Shen & Xing 2022), at about the cost of a cached epoch.

The cache holds K x N rows: row v * N + i is example i in view v (``Views.rows``).
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from .stream import Rows


class Views:
    """``k`` fixed augmented views of ``n`` images: random crop after zero padding by ``pad`` and,
    with ``flip``, a horizontal flip with probability 1/2, the same as ``augment_images`` draws, but fixed per (example,
    view) by ``seed``."""

    def __init__(self, n: int, k: int, seed: int = 0, pad: int = 2, flip: bool = True):
        if k < 1:
            raise ValueError("k must be 1 or more")
        self.n, self.k, self.seed, self.pad, self.flip = n, k, seed, pad, flip
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def describe(self) -> dict:
        """What fixes the views (for a cache's key)."""
        return {"k": self.k, "seed": self.seed, "pad": self.pad, "flip": self.flip, "kind": "crop+flip"}

    def params(self, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row offset, column offset (0 .. 2 * pad) and flip of every example in ``view``."""
        if view not in self._params:
            g = torch.Generator().manual_seed(1_000_003 * self.seed + view)
            dy = torch.randint(0, 2 * self.pad + 1, (self.n,), generator=g)
            dx = torch.randint(0, 2 * self.pad + 1, (self.n,), generator=g)
            fl = torch.rand(self.n, generator=g) < 0.5 if self.flip else torch.zeros(self.n, dtype=torch.bool)
            self._params[view] = (dy, dx, fl)
        return self._params[view]

    def apply(self, x: torch.Tensor, idx: torch.Tensor, view: int) -> torch.Tensor:
        """Examples ``idx`` (their inputs ``x``, (B, C, H, W)) as they look in ``view``."""
        dy, dx, fl = (t[idx.cpu().long()] for t in self.params(view))
        h, w = x.shape[-2:]
        padded = F.pad(x, (self.pad,) * 4)
        out = torch.empty_like(x)
        offsets = dy * (2 * self.pad + 1) + dx
        for o in offsets.unique().tolist():  # at most (2 * pad + 1)^2 crops, each a slice of the examples that share it
            sel = (offsets == o).nonzero().squeeze(1).to(x.device)
            top, left = divmod(o, 2 * self.pad + 1)
            out[sel] = padded[sel, :, top:top + h, left:left + w]
        flipped = fl.nonzero().squeeze(1).to(x.device)
        out[flipped] = out[flipped].flip(-1)
        return out

    def rows(self, idx: torch.Tensor, view: int) -> torch.Tensor:
        """The cache rows of examples ``idx`` in ``view``."""
        return idx + view * self.n

    def inputs(self, x: Union[torch.Tensor, Rows]) -> "ViewedInputs":
        """All K x N augmented inputs, made on demand (what the teacher cache is built from)."""
        return ViewedInputs(self, x)


class ViewedInputs:
    """The K x N augmented training inputs as a sliceable sequence (row v * N + i: example i in view v), made batch by
    batch so the K copies are never in memory at once."""

    def __init__(self, views: Views, x: Union[torch.Tensor, Rows]):
        if len(x) != views.n:
            raise ValueError(f"{len(x)} inputs for views of {views.n} examples")
        self.views, self.x = views, x
        self.shape = (views.k * views.n, *tuple(x.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise IndexError("ViewedInputs takes contiguous slices")
        n, parts = self.views.n, []
        while start < stop:
            view, i = divmod(start, n)
            j = min(stop - view * n, n)
            idx = torch.arange(i, j)
            parts.append(self.views.apply(torch.as_tensor(self.x[i:j]), idx, view))
            start = view * n + j
        return torch.cat(parts) if parts else torch.empty((0, *self.shape[1:]))
