"""`protege distill`: a recipe end to end, in the one direction data flows: data -> teacher -> student ->
[prune -> export -> int8] -> evaluate. What differs between tasks (models, losses, metrics) is the Task's."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch
from accelerate import Accelerator

from ..data import Split
from ..errors import RecipeError
from ..logs import quiet
from ..recipe import Recipe
from ..run import Run, locked
from .student import train_student
from .tasks import load_run_data, task_for

log = logging.getLogger(__name__)


def distill(recipe: Recipe, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            export: bool = True, evaluate_: bool = True, test: bool = True, teacher_only: bool = False,
            shared_cache: Optional[Path] = None) -> Run:
    """Run a recipe end to end into the folder ``out``; returns the Run (with its report). The folder is locked
    for the duration: a second protege writing to it is refused. ``test=False`` (tuning): the test split is
    dropped as soon as the data is read, so nothing in the run can score it (no export or evaluation either).
    ``teacher_only``: stop once the teacher is trained (the teacher that a tune's trials or a --seeds run share).
    ``shared_cache``: keep the teacher's cached outputs in this folder, where other runs of the same teacher and
    training data find them (a tune's trials), instead of in the run folder."""
    if recipe.seeds > 1 or recipe.baseline:
        raise RecipeError(f"recipe {recipe.name} asks for seeds: {recipe.seeds} / baseline: {str(recipe.baseline).lower()}, "
                          f"several runs: call distill_seeds(recipe, out) (the CLI does), or set seeds: 1 and baseline: false")
    acc = accelerator(recipe, out)
    with locked(out, "distill", enabled=acc.is_main_process, create=True):
        run = Run.create(out, recipe, overwrite=overwrite, resume=resume)
        run.shared_cache = shared_cache
        data = load_run_data(recipe)
        if not test:
            data, export, evaluate_ = dataclasses.replace(data, test=Split(data.val.x[:0], data.val.y[:0], data.val.pad_id)), False, False
        task = task_for(recipe)
        log.info(task.data_line(data))
        models = task.build(run, data)  # every check that can fail does, before anything is written
        acc.wait_for_everyone()  # every process has checked the folder before the first write
        if acc.is_main_process:
            if not resume:
                run.clear_artifacts()
            run.write_recipe()
        acc.wait_for_everyone()
        with tracking(acc, recipe, out):
            models = task.teach(run, data, models, acc, resume)
            if teacher_only:
                return run
            student = train_student(run, data, task, models, acc, resume)
            run = task.finish(run, data, models, student, acc, resume, export, evaluate_)
            if acc.trackers and run.report is not None:  # the run's test figures, once, at the end (step 0: they belong
                # to no epoch, and a tracker left to count would put them at its own next step)
                acc.log({f"test/{st.name}/{k}": float(v) for st in run.report.rows() for k in ("accuracy", "macro_f1", "test_ppl")
                         if isinstance(v := getattr(st, k, None), (int, float))}, step=0)
            return run

def accelerator(recipe: Recipe, out: str | Path) -> Accelerator:
    """The run's Accelerator, with the trackers the recipe names (``train.log_with``) writing under ``out/tracking``."""
    if not recipe.train.log_with:
        return Accelerator(cpu=not torch.cuda.is_available())
    from accelerate.utils import ProjectConfiguration

    config = ProjectConfiguration(project_dir=str(out), logging_dir=str(Path(out) / "tracking"))
    with quiet():  # (Accelerate warns and drops a tracker whose package is missing: that is an error here)
        acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=list(recipe.train.log_with), project_config=config)
    found = {str(getattr(t, "value", t)) for t in acc.log_with}
    missing = [t for t in recipe.train.log_with if t not in found]
    if missing:
        package = {"comet_ml": "comet-ml"}.get(missing[0], missing[0])
        raise RecipeError(f"train.log_with: {missing[0]} needs its package, which is not installed: pip install {package} "
                          f"(or remove it from train.log_with)")
    return acc


@contextlib.contextmanager
def tracking(acc: Accelerator, recipe: Recipe, out: str | Path) -> Iterator[None]:
    """Start the run's trackers (the recipe's scalar fields as its configuration, for comparing runs) and close them
    (flushing their files) however the run ends."""
    if not recipe.train.log_with:
        yield
        return
    try:
        acc.init_trackers(recipe.name, config=_flat(recipe.model_dump(mode="json")),
                          init_kwargs={"mlflow": {"run_name": str(out)}, "wandb": {"name": str(out)},
                                       "trackio": {"name": str(out)}})
    except ImportError as e:
        raise RecipeError(f"train.log_with {recipe.train.log_with}: {str(e).splitlines()[0][:160]}; install the tracker's "
                          f"package or remove train.log_with") from None
    try:
        yield
    finally:
        for tracker in acc.trackers:  # (not acc.end_training(): that also ends a multi-process run's process group)
            tracker.finish()


def _flat(d: dict, prefix: str = "") -> dict:
    """A recipe as ``section.field: value`` pairs of scalars (what trackers take as a run's hyperparameters)."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return out
