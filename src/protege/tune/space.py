"""The ``tune`` section of a recipe: which fields `protege tune` searches, over what ranges, and how many trials.

A search space maps recipe fields (dotted paths, as ``--set`` takes them: ``train.lr``, ``distill.temperature``,
``distill.features.0.weight``) to a range: ``{low, high}`` (``log: true`` for a log scale, ``step`` for a grid) or
``{choices: [...]}``. Without ``space``, the method's default space is searched (``default_space``)."""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import Field, model_validator

from ..config import _Strict


class Range(_Strict):
    """One field's search range: numbers from ``low`` to ``high`` (integers for an integer field), or ``choices``."""

    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False  # sample on a log scale (low must be above 0)
    step: Optional[float] = Field(None, gt=0)  # a grid: low, low + step, ... up to high
    choices: Optional[list[Union[bool, int, float, str]]] = None

    @model_validator(mode="after")
    def _one_kind(self) -> "Range":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either low/high or choices, not both")
            if not self.choices:
                raise ValueError("choices is empty: list at least one value")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a range needs low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"low {self.low:g} is not below high {self.high:g}: an empty range; make low < high")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low above 0 (got {self.low:g})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined; drop one")
        return self


class TuneConfig(_Strict):
    """`protege tune`: maximise the student's validation accuracy over ``trials`` trials (Optuna's TPE sampler), stopping
    bad trials early (median pruning on per-epoch validation accuracy). The test split is never read while tuning."""

    trials: int = Field(20, ge=1, le=100_000)
    space: Optional[dict[str, Range]] = None  # field -> range; default: the method's space (see default_space)
    prune: bool = True  # stop a trial whose validation accuracy is below the median of earlier trials at the same point
    # of training (checked at each tenth of a trial's epochs, so trials of different lengths compare at the same phase)
    startup_trials: int = Field(5, ge=0, le=10_000)  # trials that always finish before pruning starts
    warmup: float = Field(0.2, ge=0, le=1)  # the share of each trial's epochs before it can be stopped


def default_space(recipe: dict[str, Any], baseline: bool) -> dict[str, Range]:
    """The knobs that matter for the recipe's method (a recipe as a dict, ``model_dump``): learning rate, weight decay
    and epochs always; for a distilled student also temperature, alpha, DKD's alpha and beta, each feature term's
    weight and the EMA decay. ``baseline``: the labels-only student (no distillation knobs)."""
    train, d = recipe["train"], recipe["distill"]
    lr, epochs = train["lr"], train["epochs"]
    space = {"train.lr": Range(low=lr / 4, high=lr * 4, log=True),
             "train.weight_decay": Range(low=1e-6, high=1e-2, log=True)}
    if epochs >= 4:
        space["train.epochs"] = Range(low=max(2, epochs // 2), high=epochs)
    if baseline:
        return space
    response = d.get("response", "kl")
    if response not in ("none",):
        space["distill.alpha"] = Range(low=0.0, high=0.9)
    if response not in ("none", "mse_logits"):
        space["distill.temperature"] = Range(low=1.0, high=10.0)
    if response == "dkd":
        space["distill.dkd_alpha"] = Range(low=0.25, high=4.0, log=True)
        space["distill.dkd_beta"] = Range(low=1.0, high=16.0, log=True)
    for i, term in enumerate(d.get("features") or []):
        w = term["weight"]
        if w > 0:
            space[f"distill.features.{i}.weight"] = Range(low=w / 10, high=w * 10, log=True)
    if recipe["teacher"]["model"] == "ema":
        space["distill.ema_decay"] = Range(low=0.99, high=0.9999)
    return space
