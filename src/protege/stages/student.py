"""The student stage, for every task: start from the teacher's layers (if asked), distil with the task's loss
through the one fit loop, born-again generations, then save the weights and what rebuilds them."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..data import DataSplits
from ..models import build_model, save_weights
from ..run import Run
from ..train import Distiller, FitResult, fit
from .task import Models, Task
from .teacher import augmentation, student_loss, write_config

log = logging.getLogger(__name__)


def _fit_student(run: Run, data: DataSplits, student: nn.Module, loss_fn, acc: Accelerator, resume: bool, stage: str,
                 ckpt_dir: Path, seed: int, validate=None) -> FitResult:
    r = run.recipe
    module = student
    if isinstance(loss_fn, Distiller):
        idx = torch.arange(min(r.train.batch_size, len(data.train)))
        module = loss_fn.training_module(student, data.train.x[idx], idx, seed=seed)
    return fit(module, loss_fn, data.train, data.val, r.train, seed=seed, ckpt_dir=ckpt_dir, metrics_path=run.metrics_path,
               stage=stage, accelerator=acc, augment=augmentation(run, loss_fn), resume=resume, validate=validate)


def train_student(run: Run, data: DataSplits, task: Task, models: Models, acc: Accelerator, resume: bool) -> nn.Module:
    """Distil the student with the task's loss; with ``distill.generations`` > 1, each further generation is taught by
    the previous one (born-again networks, Furlanello et al. 2018). Saves the weights and student/config.json."""
    r, student = run.recipe, models.student
    if r.student.init and not (resume and (run.path / "student" / "checkpoints" / "last.safetensors").is_file()):
        task.init_student(run, data, student, models.teachers[0])
    log.info(task.describe_training(run, data, student, models))
    loss_fn = task.loss(run, data, models, acc, student)
    result = _fit_student(run, data, student, loss_fn, acc, resume, "student", run.path / "student" / "checkpoints", r.seed,
                          validate=task.validate(data))
    d = r.distill
    for g in range(2, task.generations(run) + 1):
        previous = run.path / "student" / f"gen{g - 1}.safetensors"
        if acc.is_main_process:
            save_weights(student, previous)
        acc.wait_for_everyone()
        teacher = copy.deepcopy(student).eval()
        torch.manual_seed(r.seed + g)
        student = build_model(r.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes, data.model_args)
        log.info(f"born-again generation {g}/{task.generations(run)}: a new {r.student.model} taught by generation {g - 1}")
        same = [f.model_copy(update={"teacher": f.student, "teacher_index": 0}) for f in d.features]  # same architecture
        run_g = Run(run.path, r.model_copy(update={"teacher": r.teacher.model_copy(update={"weight": 1.0}), "more_teachers": [],
                                                   "distill": d.model_copy(update={"features": same})}))
        loss_fn = student_loss(run_g, data, [teacher], acc, student=student, files=[previous], cache_prefix=f"gen{g}_")
        result = _fit_student(run_g, data, student, loss_fn, acc, resume, f"student_gen{g}",
                              run.path / "student" / f"gen{g}_checkpoints", r.seed + g)
    if acc.is_main_process:
        save_weights(student, run.student_weights)
        write_config(run.path / "student" / "config.json", task.student_config(run, data, student, result))
        if r.ema_teacher:  # the running average is the run's teacher: evaluated and reported like any other
            save_weights(loss_fn.ema.model, run.teacher_weights)
    acc.wait_for_everyone()
    return student
