"""A user module for tests: an MLP that a test can stop at a chosen epoch, so a run is interrupted exactly there.

Without ``PROTEGE_TEST_HOLD`` in the environment it is a plain MLP. With it, it holds JSON such as
``{"metrics": "<run>/metrics.jsonl", "checkpoint": "<run>/student/checkpoints/last.safetensors",
"stage": "student", "at": 3, "hidden": [32], "marker": "<path>"}``: the instance built with those hidden
sizes, once ``metrics`` has ``at`` rows of ``stage`` and ``checkpoint`` holds epoch ``at``, writes ``marker``
at its next training-mode forward (the first batch of epoch ``at + 1``) and then sleeps there, in
short steps so that Ctrl-C's KeyboardInterrupt is raised at once. The test waits for the marker and sends
its signal: no race with the run, however loaded the machine. A held process whose test went away (its
parent changed) or that waited 15 minutes exits with code 3.
"""
import json
import os
import time
from pathlib import Path

from safetensors import safe_open

from protege.models.zoo import MLP

HOLD = "PROTEGE_TEST_HOLD"


def _reached(hold: dict) -> bool:
    try:
        rows = [json.loads(x) for x in Path(hold["metrics"]).read_text().splitlines()]
    except (OSError, ValueError):
        return False
    if sum(r.get("stage") == hold["stage"] for r in rows) < hold["at"]:
        return False
    try:  # fit writes the metrics row before the checkpoint: hold only once both are in place
        with safe_open(hold["checkpoint"], framework="pt") as f:
            return json.loads(f.metadata()["loop"])["epoch"] >= hold["at"]
    except (OSError, ValueError, KeyError):
        return False


class HoldingMLP(MLP):
    def __init__(self, in_shape, num_classes, hidden=(32,), dropout=0.0):
        super().__init__(in_shape, num_classes, hidden, dropout)
        hold = json.loads(os.environ.get(HOLD) or "null")
        self._hold = hold if hold and list(hold["hidden"]) == list(hidden) else None

    def forward(self, x):
        if self.training and self._hold is not None and _reached(self._hold):
            Path(self._hold["marker"]).write_text("held\n")
            parent, give_up = os.getppid(), time.monotonic() + 900
            while os.getppid() == parent and time.monotonic() < give_up:  # never outlive a killed test for long
                time.sleep(0.01)
            os._exit(3)
        return super().forward(x)


def build(in_shape, num_classes, hidden=(32,), dropout=0.0):
    return HoldingMLP(in_shape, num_classes, hidden, dropout)


def not_a_module(in_shape, num_classes):
    return "nope"
