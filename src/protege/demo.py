"""The bundled demo: digits, a CNN teacher, a student with under a tenth of its parameters, int8 ONNX."""
from __future__ import annotations

import copy
from typing import Optional

from .recipe import Recipe, apply_overrides, parse_recipe

DEMO = {
    "name": "demo-digits",
    "seed": 0,
    "data": {"source": "digits"},
    "teacher": {"model": "cnn", "kwargs": {"channels": [32, 64, 128], "depth": 2},
                "train": {"epochs": 30, "batch_size": 64, "lr": 3e-3}},
    "student": {"model": "cnn", "kwargs": {"channels": [8, 16, 32], "depth": 1}},
    "distill": {"response": "kl", "temperature": 4.0, "alpha": 0.3},
    "train": {"epochs": 40, "batch_size": 64, "lr": 1e-2},
    "quantize": {"mode": "static"},  # ends with an int8 ONNX student (student.int8.onnx) and report.html
}


def demo_recipe(overrides: Optional[list[str]] = None) -> Recipe:
    """The demo's recipe, with ``--set`` overrides (a shorter demo: ``train.epochs=5``)."""
    return parse_recipe(apply_overrides(copy.deepcopy(DEMO), overrides or []), "<demo>", overrides)
