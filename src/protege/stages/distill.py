"""`protege distill`: a recipe end to end, in the one direction data flows: data -> teacher -> student ->
[prune -> export -> int8] -> evaluate. What differs between tasks (models, losses, metrics) is the Task's."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from ..recipe import Recipe
from ..run import Run, locked
from .student import train_student
from .tasks import load_run_data, task_for

log = logging.getLogger(__name__)


def distill(recipe: Recipe, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            export: bool = True, evaluate_: bool = True) -> Run:
    """Run a recipe end to end into the folder ``out``; returns the Run (with its report). The folder is locked
    for the duration: a second protege writing to it is refused."""
    acc = Accelerator(cpu=not torch.cuda.is_available())
    with locked(out, "distill", enabled=acc.is_main_process, create=True):
        run = Run.create(out, recipe, overwrite=overwrite, resume=resume)
        data = load_run_data(recipe)
        task = task_for(recipe)
        log.info(task.data_line(data))
        models = task.build(run, data)  # every check that can fail does, before anything is written
        acc.wait_for_everyone()  # every process has checked the folder before the first write
        if acc.is_main_process:
            if not resume:
                run.clear_artifacts()
            run.write_recipe()
        acc.wait_for_everyone()
        models = task.teach(run, data, models, acc, resume)
        student = train_student(run, data, task, models, acc, resume)
        return task.finish(run, data, models, student, acc, resume, export, evaluate_)
