"""`protege evaluate`: measure every model a run has on the test split, side by side; write report.json (and, for
classification, report.html). The task decides what is measured."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..data import DataSplits
from ..evaluate.report import Report
from ..run import Run, locked
from .tasks import load_run_data, task_for


def evaluate(run: Run | str | Path, *, data: Optional[DataSplits] = None, show: bool = True) -> Report:
    """Measure the run's models and write its report; returns the report. The folder is locked."""
    with locked(run.path if isinstance(run, Run) else Path(run), "evaluate"):
        run = run if isinstance(run, Run) else Run.load(run, read_report=False)
        run.report = task_for(run.recipe).evaluate(run, data or load_run_data(run.recipe), show=show)
        return run.report
