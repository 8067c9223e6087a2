"""`protege export`: the run's student to ONNX (the task decides which files: a classifier's student and pruned
student, a causal LM's student and its int8 version), each checked against PyTorch."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..data import DataSplits
from ..run import Run, locked
from .tasks import load_run_data, task_for


def export_onnx(run: Run | str | Path, *, data: Optional[DataSplits] = None) -> Path:
    """Export the run's student to ONNX, checked against PyTorch; returns the deployed file. The folder is locked."""
    with locked(run.path if isinstance(run, Run) else Path(run), "export"):
        run = run if isinstance(run, Run) else Run.load(run, read_report=False)
        return task_for(run.recipe).export(run, data or load_run_data(run.recipe))
