"""`protege inspect`: every module path of a model with its output shape and parameters, from one dry forward pass.

The paths printed are exactly what ``distill.features[*].student`` / ``.teacher`` accept.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..knowledge.features import unwrap
from .text import example_input


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


def load_for_inspect(ref: str, in_shape: Optional[Sequence[int]], classes: int, which: str = "student",
                     allow_pickle: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """A model from a zoo name, ``file.py:factory`` or a run folder (its student or teacher) and its input shape."""
    from ..recipe import ModelSpec
    from .loading import build_model, load_weights

    path = Path(ref)
    if path.is_dir() and not (path / "recipe.yaml").is_file() and (path / "config.json").is_file():  # a Hugging Face folder
        in_shape = tuple(in_shape or (16,))
        return build_model(ModelSpec(model=ref, allow_pickle=allow_pickle), in_shape, classes), in_shape
    if path.is_dir():
        from ..run import Run

        run = Run.load(path)
        spec = run.recipe.student if which == "student" or run.recipe.ema_teacher else run.recipe.teacher
        if spec.model.endswith(".onnx"):
            raise ModelError("the run's teacher is an ONNX file: no module paths to hook; its output is the path 'logits'")
        own, student_cfg = path / which / "config.json", path / "student" / "config.json"
        cfg_file = own if own.is_file() else student_cfg  # a loaded teacher has no config.json: the student's has the shapes
        if not cfg_file.is_file():
            raise ModelError(f"{cfg_file} is missing: the run is not finished; inspect a zoo name or file.py:factory instead")
        cfg = json.loads(cfg_file.read_text())
        model = build_model(spec.model_copy(update={"weights": None}), cfg["in_shape"], cfg["num_classes"], cfg.get("model_args"))
        weights = Path(spec.weights) if which == "teacher" and spec.weights else path / which / "model.safetensors"
        if weights.is_file():
            load_weights(model, weights)
        return model, tuple(cfg["in_shape"])
    if in_shape is None:
        raise ModelError(f"give the shape of one input example for '{ref}' with --input-shape, e.g. 1,28,28 (images) or 64 (tables)")
    if ref.endswith(".onnx"):
        raise ModelError("an ONNX file has no module paths to hook; its output is available as the path 'logits'")
    return build_model(ModelSpec(model=ref, allow_pickle=allow_pickle), in_shape, classes), tuple(in_shape)
