"""`protege inspect`: every module path of a model with its output shape and parameters, from one dry forward pass.

The paths printed are exactly what ``distill.features[*].student`` / ``.teacher`` accept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..models.text import example_input
from .features import unwrap


@dataclass
class ModuleRow:
    path: str
    kind: str
    shape: Optional[tuple[int, ...]]  # output shape for one example (batch dimension dropped); None: not called
    params: int  # parameters of this module alone (not its children)


def inspect_model(model: nn.Module, in_shape: Sequence[int]) -> list[ModuleRow]:
    """One forward pass on two zero examples of ``in_shape``; a row per named module, in definition order."""
    model = unwrap(model).eval()
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, m in model.named_modules():
        if name:
            def hook(_m, _i, out, name=name):
                t = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(t, torch.Tensor):
                    shapes[name] = tuple(t.shape[1:])
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = model(example_input(model, in_shape))
    except (RuntimeError, ValueError, TypeError) as e:
        raise ModelError(f"the model cannot run on input shape {tuple(in_shape)} ({str(e).splitlines()[0][:120]}); "
                         f"pass the shape of one example with --input-shape, e.g. 1,28,28") from None
    finally:
        for h in handles:
            h.remove()
    rows = [ModuleRow(n, type(m).__name__, shapes.get(n), sum(p.numel() for p in m.parameters(recurse=False)))
            for n, m in model.named_modules() if n]
    rows.append(ModuleRow("logits", "output", tuple(out.shape[1:]), 0))
    return rows


def format_rows(rows: list[ModuleRow]) -> str:
    width = max(len(r.path) + 2 * r.path.count(".") for r in rows)
    lines = [f"{'module path':<{width}}  {'type':<20} {'output (per example)':<22} {'params':>10}"]
    for r in rows:
        shape = "x".join(map(str, r.shape)) if r.shape is not None else "(not called)"
        lines.append(f"{'  ' * r.path.count('.') + r.path:<{width}}  {r.kind:<20} {shape:<22} {r.params:>10,}")
    total = sum(r.params for r in rows)
    lines.append(f"{'total':<{width}}  {'':<20} {'':<22} {total:>10,}")
    return "\n".join(lines)
