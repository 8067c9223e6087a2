"""Pruning: unstructured magnitude masks, or structured removal of whole channels and neurons.

Structured pruning uses Torch-Pruning's dependency graph (Fang et al., DepGraph, CVPR 2023), so that
the layers coupled to a removed channel (the next conv's input, BatchNorm, residual additions,
concatenations) shrink with it; the model afterwards is a smaller dense model that really runs faster.
Unstructured pruning zeroes the smallest weights (Han et al. 2015): the tensors keep their shape, so
it gives no dense speedup by itself.
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils import prune as tprune

from ..config import _Strict
from ..errors import CompressError

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
MAX_GLOBAL = 0.9  # global scope: no layer loses more than this share of its channels
UNSTRUCTURED_NOTE = ("unstructured pruning zeroes weights but keeps every tensor dense: no speedup and no smaller "
                     "file by itself (it needs a sparse kernel or compression to pay)")


class PruneConfig(_Strict):
    """Pruning of the distilled student, then recovery by distillation from the same teacher. Each field is also an
    option of `protege compress` (``CLI``: the option names that differ from --field-name)."""

    CLI: ClassVar[dict[str, str]] = {"ratio": "--prune", "method": "--structured/--unstructured"}

    method: Literal["structured", "unstructured"] = Field(
        "structured", description="structured removes whole channels/neurons (really faster); unstructured masks weights")
    ratio: Optional[float] = Field(None, gt=0, lt=1, description="fraction to remove, in (0, 1): channels (structured) or weights")
    target_params: Optional[int] = Field(None, ge=1, description="structured: prune to at most this many parameters")
    scope: Literal["layer", "global"] = Field("layer", description="layer (the same ratio in every layer) or global (one threshold)")
    keep: list[str] = Field(default_factory=list, description="module path to leave unpruned (repeatable; the output layer always is)")
    steps: int = Field(1, ge=1, le=100, description="iterative pruning: rounds of prune + distil")
    finetune_epochs: int = Field(0, ge=0, le=100_000, description="KD recovery epochs after each pruning step (0: no recovery)")
    finetune_lr: Optional[float] = Field(None, gt=0, le=100, description="recovery learning rate (default: train.lr / 5)")

    @model_validator(mode="after")
    def _one_amount(self) -> "PruneConfig":
        if (self.ratio is None) == (self.target_params is None):
            raise ValueError("give exactly one of `ratio` (fraction removed, between 0 and 1) or `target_params`")
        if self.target_params is not None and self.method != "structured":
            raise ValueError("`target_params` needs method: structured (unstructured pruning keeps every parameter)")
        if self.target_params is not None and self.steps > 1:
            raise ValueError("`target_params` is reached in one step; use `ratio` for iterative pruning (steps > 1)")
        return self


@dataclass
class PruneResult:
    method: str
    params_before: int
    params_after: int
    sparsity: float  # share of prunable weights that are zero (unstructured) or removed (structured)
    ratio: float  # the per-step amount actually applied, after resolving target_params
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (out channels before, after)
    note: str = ""

    def as_dict(self) -> dict:
        return {"method": self.method, "params_before": self.params_before, "params_after": self.params_after,
                "sparsity": self.sparsity, "ratio": self.ratio, "note": self.note,
                "layers": {k: list(v) for k, v in self.layers.items()}}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _output_layer(model: nn.Module) -> str:
    """The last prunable layer in definition order: its outputs are the classes and are never pruned."""
    names = [n for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    if not names:
        raise CompressError("the model has no Conv or Linear layer to prune; pruning needs one")
    return names[-1]


def _kept_modules(model: nn.Module, keep: list[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    out = []
    for path in keep:
        if path not in modules:
            near = difflib.get_close_matches(path, [n for n in modules if n], n=3, cutoff=0.4)
            raise CompressError(f"prune.keep: no module '{path}' in the model; nearest paths: {', '.join(near) or 'none'} "
                             f"(`protege inspect` lists them all)")
        out.append(modules[path])
    return out


def _out_channels_of(m: nn.Module) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    return m.out_features if isinstance(m, nn.Linear) else 0


def _out_channels(model: nn.Module) -> dict[str, int]:
    return {n: _out_channels_of(m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def structured_step(model: nn.Module, example: torch.Tensor, ratio: float, cfg: PruneConfig) -> None:
    """Remove ``ratio`` of the channels of every prunable group (or globally) from ``model``, in place."""
    import torch_pruning as tp

    ignored = _kept_modules(model, cfg.keep) + [dict(model.named_modules())[_output_layer(model)]]
    if cfg.scope == "layer":
        skip = set(map(id, ignored))
        for name, m in model.named_modules():
            c = _out_channels_of(m)
            if c and id(m) not in skip and c * (1.0 - ratio) < 1.0:
                raise CompressError(f"structured pruning at ratio {ratio:.3g} would remove every channel of '{name}' ({c} channels); "
                                 f"lower prune.ratio or list '{name}' in prune.keep")
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=cfg.scope == "global", max_pruning_ratio=MAX_GLOBAL,
                                  ignored_layers=ignored)
    with torch.no_grad():
        out_shape = model(example).shape
    pruner.step()
    with torch.no_grad():
        if model(example).shape != out_shape:
            raise CompressError(f"pruning changed the model's output shape {tuple(out_shape)}; list the output layer in prune.keep")


def _ratio_for_target(model: nn.Module, example: torch.Tensor, cfg: PruneConfig) -> float:
    """Smallest one-shot structured ratio whose pruned copy has at most ``target_params`` parameters (bisection)."""
    target = int(cfg.target_params)
    if _count(model) <= target:
        raise CompressError(f"prune.target_params {target:,} is not below the model's {_count(model):,} parameters; lower it")
    lo, hi, best = 0.0, MAX_GLOBAL, None
    for _ in range(20):  # bisection; a ratio that would empty a small layer counts as too high
        mid = (lo + hi) / 2
        probe = copy.deepcopy(model)
        try:
            structured_step(probe, example, mid, cfg)
        except CompressError:
            hi = mid
            continue
        if _count(probe) <= target:
            hi, best = mid, mid
        else:
            lo = mid
    if best is None:
        raise CompressError(f"prune.target_params {target:,} cannot be reached without emptying a layer; "
                            f"raise target_params or shrink prune.keep")
    return best


def plan(model: nn.Module, example: torch.Tensor, cfg: PruneConfig) -> list[float]:
    """Per-step ratios (each a share of what is left) so that ``steps`` rounds together remove the requested amount."""
    total = float(cfg.ratio) if cfg.ratio is not None else _ratio_for_target(model, example, cfg)
    if cfg.steps == 1 or cfg.method == "unstructured" or cfg.ratio is not None:
        return [1.0 - (1.0 - total) ** (1.0 / cfg.steps)] * cfg.steps
    return [total]  # a parameter target with several steps: found by bisection for one shot, applied once


def unstructured_step(model: nn.Module, ratio: float, cfg: PruneConfig) -> None:
    """Mask the smallest-magnitude weights so that ``ratio`` of the prunable weights are zero (masks stay on)."""
    kept = set(map(id, _kept_modules(model, cfg.keep)))
    out_name = _output_layer(model)
    targets = [(m, "weight") for n, m in model.named_modules()
               if isinstance(m, PRUNABLE) and id(m) not in kept and n != out_name]
    if not targets:
        raise CompressError("prune.keep leaves no layer to prune; remove some paths from it")
    if cfg.scope == "global":
        tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=ratio)
    else:
        for m, name in targets:
            tprune.l1_unstructured(m, name, amount=ratio)


def make_permanent(model: nn.Module) -> None:
    """Fold unstructured masks into the weights (weight_orig * mask -> weight) so the state dict is plain."""
    for m in model.modules():
        if tprune.is_pruned(m) and hasattr(m, "weight_mask"):
            tprune.remove(m, "weight")


def conv_groups(model: nn.Module) -> dict[str, int]:
    """Each conv's ``groups`` (structured pruning of a depthwise conv changes it); saved beside pruned weights."""
    return {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}


def zero_share(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    total = sum(w.numel() for w in ws)
    return float(sum(int((w == 0).sum()) for w in ws)) / max(total, 1)


def prune_(model: nn.Module, cfg: PruneConfig, example: torch.Tensor, ratio: float | None = None) -> PruneResult:
    """Prune ``model`` in place by ``ratio`` (default: the whole amount the config asks for, in one step).

    Unstructured masks stay attached (so fine-tuning keeps pruned weights at zero); call
    ``make_permanent`` before saving. Returns what changed.
    """
    if ratio is None:
        ratios = plan(model, example, cfg)
        ratio = 1.0 - float(torch.tensor([1.0 - r for r in ratios]).prod())
    example = example.to(next(model.parameters()).device)
    before_params, before_ch = _count(model), _out_channels(model)
    was_training = model.training
    model.eval()  # tracing must not move BatchNorm statistics
    try:
        return _prune_step(model, cfg, example, ratio, before_params, before_ch)
    finally:
        model.train(was_training)


def _prune_step(model, cfg, example, ratio, before_params, before_ch) -> PruneResult:
    if cfg.method == "structured":
        structured_step(model, example, ratio, cfg)
        after = _out_channels(model)
        result = PruneResult("structured", before_params, _count(model), 1.0 - _count(model) / before_params, ratio,
                             {n: (before_ch[n], after[n]) for n in after if after[n] != before_ch[n]})
    else:
        unstructured_step(model, ratio, cfg)
        result = PruneResult("unstructured", before_params, _count(model), zero_share(model), ratio, note=UNSTRUCTURED_NOTE)
    return result
