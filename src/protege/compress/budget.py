"""Compression to a budget: the most accurate file (on validation) whose latency and size, measured on this machine,
fit the limits the user gives. The search itself (pruning ratios x int8 schemes, each with KD recovery) is
stages/budget.py; here are its settings and the pure choice among measured candidates."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..config import _Strict


class BudgetConfig(_Strict):
    """`protege compress RUN --max-latency-ms X --max-bytes N`: search structured pruning ratios and int8 schemes and keep
    the most accurate candidate within the budget. Each field is also an option of `protege compress`."""

    CLI: ClassVar[dict[str, str]] = {"batch_size": "--budget-batch"}

    max_latency_ms: Optional[float] = Field(None, gt=0, description="budget: p50 latency per batch (ms) at --budget-batch, on this CPU")
    max_bytes: Optional[int] = Field(None, ge=1, description="budget: size of the ONNX file on disk (bytes)")
    batch_size: Literal[1, 32] = Field(1, description="budget: the batch size whose latency counts (1 or 32)")
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75],
                                description="budget: structured pruning ratios to try besides none (repeatable)")

    @field_validator("ratios")
    @classmethod
    def _fractions(cls, ratios: list[float]) -> list[float]:
        bad = [r for r in ratios if not 0 < r < 1]
        if bad:
            raise ValueError(f"ratio {bad[0]:g} is not a fraction between 0 and 1 (exclusive), e.g. 0.5")
        return sorted(set(ratios))

    @model_validator(mode="after")
    def _a_limit(self) -> "BudgetConfig":
        if self.max_latency_ms is None and self.max_bytes is None:
            raise ValueError("a budget needs --max-latency-ms and/or --max-bytes")
        return self

    def fits(self, c: dict) -> bool:
        lat = c.get(f"latency_ms_b{self.batch_size}")
        return (self.max_latency_ms is None or (lat is not None and lat <= self.max_latency_ms)) and \
            (self.max_bytes is None or c["bytes"] <= self.max_bytes)

    def describe(self) -> str:
        parts = ([f"p50 latency <= {self.max_latency_ms:g} ms at batch {self.batch_size}"] if self.max_latency_ms is not None else []) + \
            ([f"file <= {self.max_bytes:,} bytes"] if self.max_bytes is not None else [])
        return " and ".join(parts)


def overshoot(c: dict, budget: BudgetConfig) -> float:
    """How far a candidate is over the budget: the largest ratio of measured to allowed (1 or less: within it)."""
    ratios = [c["bytes"] / budget.max_bytes] if budget.max_bytes is not None else []
    if budget.max_latency_ms is not None:
        ratios.append((c.get(f"latency_ms_b{budget.batch_size}") or float("inf")) / budget.max_latency_ms)
    return max(ratios)


def choose(candidates: dict[str, dict], budget: BudgetConfig) -> tuple[Optional[str], str]:
    """The candidate within the budget with the highest validation accuracy (ties: the faster, then the smaller);
    None and the closest one's name when none fits."""
    key = f"latency_ms_b{budget.batch_size}"
    within = [n for n, c in candidates.items() if budget.fits(c)]
    if not within:
        return None, min(candidates, key=lambda n: overshoot(candidates[n], budget))
    best = max(within, key=lambda n: (candidates[n]["val_accuracy"], -(candidates[n].get(key) or 0.0), -candidates[n]["bytes"]))
    return best, "most accurate on validation within the budget"
