"""Intermediate features without editing the model: forward hooks addressed by module path.

A path is what ``model.named_modules()`` prints (``features.1.0``, ``layer2.1.conv2``). Wrappers are
seen through: Accelerate/DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` may be on the model,
on the path, on both or on neither. The special path ``logits`` is the model's output itself, so relation
terms also work on teachers that have no modules to hook (ONNX files).
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import RecipeError
from .output import ModelOutput

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
LOGITS = "logits"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / Accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = inner
            continue
        return model


def normalize_path(path: str) -> str:
    """Drop wrapper prefixes anywhere in front of a path: ``module._orig_mod.layer1`` -> ``layer1``."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if path.startswith(p):
                path, changed = path[len(p):], True
    return path


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in unwrap(model).named_modules() if name]


def resolve(model: nn.Module, path: str, who: str = "model") -> nn.Module:
    """The module at ``path``; an unknown path raises an error listing the nearest valid ones."""
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    for key in (path, normalize_path(path)):  # a real submodule called `module` wins over the wrapper prefix
        if key and key in modules:
            return modules[key]
    key = normalize_path(path)
    names = module_paths(inner)
    near = difflib.get_close_matches(key, names, n=4, cutoff=0.4) or names[:4]
    raise RecipeError(f"{who} has no module '{path}'; nearest valid paths: {', '.join(near) or '(none)'} "
                      f"(or '{LOGITS}'); list them all with `protege inspect`")


@contextmanager
def hooked(model: nn.Module, paths: Sequence[str], who: str = "model") -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the modules at ``paths`` during forward passes inside the block."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        if path == LOGITS:
            continue
        module = resolve(model, path, who)

        def hook(_m, _inp, out, path=path):
            store[path] = out[0] if isinstance(out, (tuple, list)) else out

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def extract(model: nn.Module, x: torch.Tensor, paths: Sequence[str], who: str = "model") -> ModelOutput:
    """One forward pass returning the logits and the features at ``paths`` (hooks removed afterwards)."""
    with hooked(model, paths, who) as store:
        logits = model(x)
    for p in paths:
        if p != LOGITS and not isinstance(store.get(p), torch.Tensor):
            raise RecipeError(f"{who} module '{p}' gave no tensor in the forward pass (a container such as a ModuleDict or "
                              f"ModuleList that is never called, or a module whose output is not a tensor); hook one of "
                              f"its children instead (`protege inspect` lists them with their output shapes)")
    feats = {p: (logits if p == LOGITS else store[p]) for p in paths}
    return ModelOutput(logits, feats)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
