"""The teacher stage: train it from the recipe, reuse the one trained earlier, or use it as loaded; and what the
student learns from it: the loss (labels only, or the Distiller over cached or live teacher outputs, several
teachers, or the student's own running average)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from ..data import DataSplits
from ..data.views import Views
from ..files import exclusive, write_atomic
from ..knowledge import Teacher, load_or_build_cache
from ..knowledge.cache import Share
from ..knowledge.features import LOGITS
from ..models import OnnxModule, load_weights, num_params, save_weights
from ..models.text import HF_PICKLE_WEIGHTS, HF_WEIGHTS
from ..run import Run, file_digest
from ..train import Distiller, FitResult, fit, label_loss
from ..train.distiller import EmaTeacher

log = logging.getLogger(__name__)


def prepare_teacher(run: Run, model: nn.Module, data: DataSplits, acc: Accelerator, resume: bool) -> nn.Module:
    """Use the teacher as loaded (ONNX, weights, model folder), reuse a finished earlier stage, or train it from the recipe."""
    r = run.recipe
    if isinstance(model, OnnxModule) or r.teacher.weights or r.teacher.train is None:
        return model
    if resume and run.teacher_weights.is_file():
        load_weights(model, run.teacher_weights)
        log.info(f"teacher: reusing {run.teacher_weights}")
        return model
    log.info(f"teacher: training {r.teacher.model} ({num_params(model):,} params) for {r.teacher.train.epochs} epochs")
    result = fit(model, label_loss(r.teacher.train.label_smoothing), data.train, data.val, r.teacher.train, seed=r.seed,
        ckpt_dir=run.path / "teacher" / "checkpoints", metrics_path=run.metrics_path, stage="teacher",
        accelerator=acc, augment=r.teacher.train.augment, resume=resume, lr_field="teacher.train.lr")
    if acc.is_main_process:
        save_weights(model, run.teacher_weights)
        write_config(run.path / "teacher" / "config.json", model_config(r.teacher, data, model, result))
    acc.wait_for_everyone()
    return model


def teacher_file(run: Run, index: int = 0) -> Path:
    """The file a teacher's outputs come from (what keys its caches): ONNX file, weights, a model folder's weights,
    or the weights this run trained."""
    t = run.recipe.teachers[index]
    if t.model.endswith(".onnx"):
        return Path(t.model)
    if t.weights:
        return Path(t.weights)
    folder = Path(t.model)
    if t.train is None and folder.is_dir():
        return next((folder / w for w in HF_WEIGHTS + HF_PICKLE_WEIGHTS if (folder / w).is_file()), folder / "config.json")
    return run.teacher_weights


def _teacher(run: Run, data: DataSplits, model: nn.Module, index: int, paths: list[str], file: Path, acc: Accelerator,
             prefix: str = "", views: Optional[Views] = None) -> Teacher:
    """A Teacher over ``model``: outputs cached once on disk when the inputs never change (or, with ``views``, for each
    fixed augmented view of every training image), else live passes."""
    r = run.recipe
    if not r.distill.cache_teacher or (r.train.augment and views is None):
        return Teacher(model, None, paths)
    key = {"teacher": file_digest(file), "data": data.fingerprint(), "trim": data.train.pad_id is not None}  # (trim:
    # text batches cut to their longest text, so the cache records each output's length axes)
    inputs = data.train.x
    if views is not None:  # rows v * N + i: example i as it looks in view v
        key["views"], inputs = views.describe(), views.inputs(data.train.x)
    cache_paths = [p for p in paths if p != LOGITS]
    tag = f"_{hashlib.sha1(','.join(sorted(set(cache_paths))).encode()).hexdigest()[:8]}" if cache_paths else ""
    folder = run.path / "teacher_cache" / f"{prefix}t{index}{tag}"  # logits-only and hooked caches live side by side
    if run.shared_cache is not None and acc.num_processes == 1:  # one cache for the runs of a tune (its trials)
        digest = hashlib.sha1(json.dumps({**key, "paths": sorted(set(cache_paths))}, sort_keys=True).encode()).hexdigest()[:12]
        folder = run.shared_cache / f"{prefix}t{index}{tag}_{digest}"  # another teacher or data: another folder
        waiting = f"teacher cache: another run is computing {folder}; waiting for it"
        with exclusive(folder.with_suffix(".lock"), waiting):  # one run builds it, the others wait, then read it
            cache = load_or_build_cache(folder, key, model, inputs, cache_paths, pad_id=data.train.pad_id)
        log.info(f"teacher cache: shared by the runs of {run.shared_cache.parent} ({folder.name})")
        return Teacher(model, cache, paths)
    agree = (lambda v: broadcast_object_list([v])[0]) if acc.num_processes > 1 else (lambda v: v)
    share = Share(acc.process_index, acc.num_processes, acc.wait_for_everyone, agree)  # each process writes its block
    cache = load_or_build_cache(folder, key, model, inputs, cache_paths, share, data.train.pad_id)
    return Teacher(model, cache, paths)


def student_loss(run: Run, data: DataSplits, teachers: list[nn.Module], acc: Accelerator, *,
                 features: bool = True, student: Optional[nn.Module] = None, files: Optional[list[Path]] = None,
                 cache_prefix: str = "", views: bool = True):
    """The student's training loss from the recipe: labels only (alpha = 1, no feature terms) or the Distiller.

    ``features=False`` keeps the response term only (pruning recovery and QAT change the student's shapes).
    ``files`` names the weights each teacher came from (default: the recipe's), which keys its cache.
    ``views=False``: no cache of augmented views (``distill.teacher_views``) for a fit loop that does not augment
    (QAT); the Distiller's ``views`` are what the fit loop must apply (``augmentation``).
    """
    r = run.recipe
    cfg = r.distill if features else r.distill.model_copy(update={"features": []})
    paths = [[f.teacher for f in cfg.features if f.teacher_index == i] for i in range(max(len(teachers), 1))]
    if r.ema_teacher and not teachers:  # while training: the student's own running average (kept and reported as the
        # run's teacher even when it teaches nothing, alpha 1: the labels-only baseline of a self-distillation recipe)
        distiller = Distiller([], cfg, r.train.label_smoothing)
        distiller.ema = EmaTeacher(student, r.distill.ema_decay or 0.999, paths[0])
        distiller.teachers = [distiller.ema]
        log.info(f"teacher: running average of the student's own weights (decay {distiller.ema.decay}), live")
        return distiller
    if (cfg.alpha == 1.0 or cfg.response == "none") and not cfg.features:  # the teachers are not consulted at all
        return label_loss(r.train.label_smoothing)
    files = files or [teacher_file(run, i) for i in range(len(teachers))]
    fixed = Views(len(data.train), r.distill.teacher_views) if views and r.distill.teacher_views else None  # (the recipe
    # allows teacher_views only with train.augment and a cached teacher)
    ts = [_teacher(run, data, m, i, paths[i], files[i], acc, cache_prefix, fixed) for i, m in enumerate(teachers)]
    if fixed is not None:
        log.info(f"teacher outputs: cached once for {fixed.k} fixed augmented views of every training image; epoch e "
                 f"trains on view e mod {fixed.k}")
    elif ts[0].cache is not None:
        log.info("teacher outputs: cached once for the training set (inputs do not change between epochs)")
    elif r.train.augment:
        log.info("teacher outputs: live teacher passes (augmentation changes the inputs every epoch; nothing is cached)")
    return Distiller(ts, cfg, r.train.label_smoothing, weights=[t.weight for t in r.teachers][:len(ts)], views=fixed)


def augmentation(run: Run, loss_fn) -> "bool | Views":
    """What the fit loop applies to training images: the loss's fixed views when its teacher was cached on them (so the
    student sees the image the cached answer is for), else live augmentation if the recipe asks for it."""
    views = getattr(loss_fn, "views", None)
    return views if views is not None else run.recipe.train.augment


def model_config(spec, data: DataSplits, model: nn.Module, result: Optional[FitResult]) -> dict:
    """What rebuilds a classifier's weights (model reference, kwargs, input shape, classes) and which epoch they are."""
    cfg = {"model": spec.model, "kwargs": spec.kwargs, "in_shape": list(data.input_shape), "num_classes": data.num_classes,
           "class_names": data.class_names, "params": num_params(model), "model_args": data.model_args}
    if result is not None:
        cfg.update(epochs_run=result.epochs_run, best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy)
    return cfg


def write_config(path: Path, cfg: dict) -> None:
    """The config.json beside a model's weights."""
    write_atomic(path, json.dumps(cfg, indent=2), "then continue with --resume")
