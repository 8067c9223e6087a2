"""`protege compress`: prune and/or quantize a finished run's student, evaluate every stage; the settings are
recorded in the run's recipe.yaml, and a failure puts the run back as it was."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from ..errors import RecipeError, RunError
from ..recipe import PruneConfig, QuantizeConfig
from ..run import Run, locked
from .prune import precheck, prune_stage
from .quantize import qat_fn, quantize_stage
from .tasks import load_run_data, task_for
from .teacher import student_loss

log = logging.getLogger(__name__)


def compress(run: Run | str | Path, *, prune: Optional[PruneConfig] = None, quantize: Optional[QuantizeConfig] = None) -> Run:
    """Prune and/or quantize a finished run's student; the settings are recorded in the run's recipe.yaml.

    With neither given, the run's own recipe sections are used. Quantizing alone keeps an earlier pruning
    (its files and recipe section); a new pruning replaces the earlier pass. If a stage fails, the earlier
    pass, recipe.yaml and the reports are put back as they were. The teacher and student are never touched.
    """
    with locked(run.path if isinstance(run, Run) else Path(run), "compress"):
        return _compress(run if isinstance(run, Run) else Run.load(run, read_report=False), prune, quantize)


def _compress(run: Run, prune: Optional[PruneConfig], quantize: Optional[QuantizeConfig]) -> Run:
    if not task_for(run.recipe).compressible:
        raise RecipeError(f"`protege compress` is for classification runs; {run.path} is a {run.recipe.task} run "
                          f"(its student is {run.student_weights}; `protege export` writes its ONNX and int8 files, "
                          f"`protege evaluate` measures its perplexity and speed)")
    if not run.student_weights.is_file():
        raise RunError(f"{run.path} has no finished student ({run.student_weights} missing); finish it with "
                       f"`protege distill RECIPE --out {run.path} --resume` before compressing")
    if prune is None and quantize is None:
        prune, quantize = run.recipe.prune, run.recipe.quantize
        if prune is None and quantize is None:
            raise RecipeError(f"nothing to do: give --prune and/or --quantize, or add prune:/quantize: sections to {run.path / 'recipe.yaml'}")
        keep_pruned = False
    else:
        keep_pruned = prune is None and run.recipe.prune is not None and run.pruned_weights.is_file()
        if keep_pruned:
            prune = run.recipe.prune
            log.info(f"compress: keeping the earlier pruning ({run.pruned_weights}); quantizing the pruned student")
    run.recipe = run.recipe.model_copy(update={"prune": prune, "quantize": quantize})
    acc = Accelerator(cpu=not torch.cuda.is_available())
    data = load_run_data(run.recipe)
    teachers, student = run.load_models(data)
    precheck(run, data, student)  # bad settings fail here, before anything is touched
    with run.restored_on_failure():
        run.clear_compressed(keep_pruned=keep_pruned)
        run.write_recipe()
        if prune and not keep_pruned:
            prune_stage(run, data, student, student_loss(run, data, teachers, acc, features=False), acc)
        task_for(run.recipe).export(run, data)
        if quantize:
            quantize_stage(run, data, qat=qat_fn(run, data, teachers, acc))
        run.report = task_for(run.recipe).evaluate(run, data)
    return run
