"""The teacher and student stages of a run: build and check the models, train or load the teacher, assemble
the Distiller (teacher caches, several teachers, EMA self-teacher) and distil the student (born-again generations).
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn

from .data import DataSplits
from .errors import DataError, RecipeError
from .files import write_atomic
from .knowledge import Teacher, load_or_build_cache
from .knowledge.features import LOGITS, extract, resolve as resolve_path
from .models import OnnxModule, build_model, load_weights, num_params, save_weights
from .recipe import Recipe
from .run import Run, file_digest
from .train import Distiller, FitResult, fit, label_loss
from .train.distiller import check_no_logit_kd_across_label_sets, feature_adapters

Log = Callable[[str], None]


def _check_classes(model: nn.Module, data: DataSplits, who: str, any_label_set: bool = False) -> int:
    """Run two validation examples through ``model``; return its number of output classes."""
    try:
        with torch.no_grad():
            out = model.eval()(data.val.x[:2])
    except (RuntimeError, ValueError, TypeError) as e:
        raise DataError(f"the {who} cannot run on this data (input shape {tuple(data.input_shape)}): "
                        f"{str(e).splitlines()[0][:160]}; choose a {who} model that fits the data") from None
    if out.ndim != 2 or (out.shape[-1] != data.num_classes and not any_label_set):
        raise DataError(f"{who} outputs shape {tuple(out.shape[1:])} per example but the data has {data.num_classes} classes; "
                        f"set the {who}'s num_classes (kwargs) or fix data.target")
    return int(out.shape[-1])


def build_models(recipe: Recipe, data: DataSplits) -> tuple[list[nn.Module], nn.Module]:
    """Instantiate the teachers and the student and check them against the data, before anything is written.

    With ``teacher: {model: ema}`` the teacher list is empty: the student's running average is made when training starts.
    """
    wants_augment = recipe.train.augment or (recipe.teacher.train is not None and recipe.teacher.train.augment)
    if wants_augment and not data.is_image:
        raise DataError(f"augment is for images, but {data.description} is a table; set train.augment / teacher.train.augment to false")
    if data.is_text:
        check_tokenizers(recipe, data)
    teachers, classes = [], []
    for i, spec in enumerate([] if recipe.ema_teacher else recipe.teachers):
        torch.manual_seed(recipe.seed)
        teachers.append(build_model(spec, data.input_shape, data.num_classes, data.model_args))
        # a teacher trained here learns this data's labels; a loaded one may score another label set (cross-task)
        classes.append(_check_classes(teachers[-1], data, "teacher" if i == 0 else f"more_teachers[{i - 1}]", spec.train is None))
    check_no_logit_kd_across_label_sets(recipe.distill, classes, data.num_classes)
    torch.manual_seed(recipe.seed)  # same initial student weights for scratch and KD runs of one seed
    student = build_model(recipe.student, data.input_shape, data.num_classes, data.model_args)
    _check_classes(student, data, "student")
    terms = recipe.distill.features
    for i, term in enumerate(terms):  # unknown module paths fail here, with the nearest valid ones
        resolve_path(student, term.student, f"distill.features[{i}].student: the student") if term.student != LOGITS else None
        if term.teacher != LOGITS:
            t = teachers[term.teacher_index] if teachers else student  # an ema teacher has the student's modules
            if isinstance(t, OnnxModule):
                raise RecipeError(f"distill.features[{i}].teacher: an ONNX teacher gives its output only; use teacher: logits "
                                  f"(relation terms) or a PyTorch teacher for hooked features")
            resolve_path(t, term.teacher, f"distill.features[{i}].teacher: the teacher")
    if recipe.student.init:  # an impossible initialisation fails here, on copies, before anything is written
        from .train.init import init_from_teacher_

        init_from_teacher_(copy.deepcopy(student), copy.deepcopy(teachers[0]), recipe.student.init, recipe.student.init_every)
    if terms:  # shapes no adapter can bridge fail here too, before anything is written
        x = data.val.x[:4]
        paths = [[f.teacher for f in terms if f.teacher_index == i] for i in range(max(len(teachers), 1))]
        with torch.no_grad():  # (not a Teacher: that would freeze a teacher the recipe is about to train)
            touts = [extract(t.eval(), x, p, "teacher") for t, p in zip(teachers or [copy.deepcopy(student)], paths)]
        feature_adapters(terms, student, touts, x)
    return teachers, student


def foreign_tokenizer(recipe: Recipe, model: str) -> bool:
    """Whether the Hugging Face folder ``model`` holds a tokenizer other than data.tokenizer."""
    from .data.text import tokenizer_digest
    from .models.text import is_hf_folder

    if not is_hf_folder(model):
        return False
    folder = Path(model)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model"))
    return has_tokenizer and tokenizer_digest(str(folder)) != tokenizer_digest(recipe.data.tokenizer)


def teacher_reads_other_text(recipe: Recipe) -> bool:
    """Whether a causal-LM run's teacher has another tokenizer, which is allowed in two cases (never with student.init):
    a run that learns from text alone (next-token CE, e.g. on a corpus the teacher wrote with `protege generate`),
    where the teacher is only measured (size, speed); and ULD, where it reads each block re-tokenised with its own
    tokenizer. Either way it is never fed the student's ids."""
    d = recipe.distill
    return (recipe.task == "causal_lm" and (d.alpha == 1.0 or d.response in ("none", "uld")) and not recipe.student.init
            and foreign_tokenizer(recipe, recipe.teacher.model))


def check_tokenizers(recipe: Recipe, data: DataSplits) -> None:
    """One tokenizer feeds every model of a text run: a Hugging Face folder holding another tokenizer would read
    the ids as other tokens (the teacher silently scoring the wrong text), so that is an error, not a warning.
    The one exception is a teacher that is never fed ids (``teacher_reads_other_text``)."""
    from .models.text import is_hf_folder

    specs = [("student", recipe.student)] + [("teacher" if i == 0 else f"more_teachers[{i - 1}]", s)
                                             for i, s in enumerate(recipe.teachers) if not recipe.ema_teacher]
    for who, spec in specs:
        if not is_hf_folder(spec.model) or (who == "teacher" and teacher_reads_other_text(recipe)):
            continue
        folder = Path(spec.model)
        if foreign_tokenizer(recipe, spec.model):
            init = who == "teacher" and recipe.task == "causal_lm" and recipe.student.init
            fix = ("student.init copies the teacher's embeddings and layers, which needs one tokenizer: remove student.init, "
                   "or use the teacher's tokenizer") if init else \
                ("every model of a text run reads the same token ids, so use one tokenizer (models that share a vocabulary), "
                 "or distil through text the teacher writes (protege generate, then a next-token CE run: distill.alpha 1), "
                 "or use distill.response uld")
            raise RecipeError(f"the {who} ({folder}) has its own tokenizer, which differs from data.tokenizer "
                              f"({recipe.data.tokenizer}); {fix}")
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        vocab, positions = config.get("vocab_size"), {**config, **spec.kwargs}.get("max_position_embeddings")
        if positions is not None and data.input_shape[0] > positions:
            what = "data.block_size" if data.is_lm else "data.max_length"
            raise RecipeError(f"the {who} ({folder}) reads at most {positions} tokens but {what} gives {data.input_shape[0]}; "
                              f"lower {what} to {positions} or less")
        if vocab is not None and vocab < data.vocab_size:
            raise RecipeError(f"the {who} ({folder}) has a vocabulary of {vocab} tokens but data.tokenizer has {data.vocab_size}; "
                              f"use the tokenizer the model was trained with")


def prepare_teacher(run: Run, model: nn.Module, data: DataSplits, acc: Accelerator, resume: bool, log: Log) -> nn.Module:
    """Use the teacher as loaded (ONNX, weights, model folder), reuse a finished earlier stage, or train it from the recipe."""
    r = run.recipe
    if isinstance(model, OnnxModule) or r.teacher.weights or r.teacher.train is None:
        return model
    if resume and run.teacher_weights.is_file():
        load_weights(model, run.teacher_weights)
        log(f"teacher: reusing {run.teacher_weights}")
        return model
    log(f"teacher: training {r.teacher.model} ({num_params(model):,} params) for {r.teacher.train.epochs} epochs")
    result = fit(model, label_loss(r.teacher.train.label_smoothing), data.train, data.val, r.teacher.train, seed=r.seed,
        ckpt_dir=run.path / "teacher" / "checkpoints", metrics_path=run.metrics_path, stage="teacher",
        accelerator=acc, augment=r.teacher.train.augment, resume=resume, lr_field="teacher.train.lr")
    if acc.is_main_process:
        save_weights(model, run.teacher_weights)
        write_config(run.path / "teacher" / "config.json", r.teacher, data, model, result)
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
        from .models.text import HF_PICKLE_WEIGHTS, HF_WEIGHTS

        return next((folder / w for w in HF_WEIGHTS + HF_PICKLE_WEIGHTS if (folder / w).is_file()), folder / "config.json")
    return run.teacher_weights


def _teacher(run: Run, data: DataSplits, model: nn.Module, index: int, paths: list[str], file: Path, acc: Accelerator,
             log: Log, prefix: str = "") -> Teacher:
    """A Teacher over ``model``: outputs cached once on disk when the inputs never change, else live passes."""
    r = run.recipe
    if not (r.distill.cache_teacher and not r.train.augment):
        return Teacher(model, None, paths)
    key = {"teacher": file_digest(file), "data": data.fingerprint()}
    cache_paths = [p for p in paths if p != LOGITS]
    tag = f"_{hashlib.sha1(','.join(sorted(set(cache_paths))).encode()).hexdigest()[:8]}" if cache_paths else ""
    folder = run.path / "teacher_cache" / f"{prefix}t{index}{tag}"  # logits-only and hooked caches live side by side
    if acc.is_main_process:  # one process writes the cache, the others then read it
        cache = load_or_build_cache(folder, key, model, data.train.x, cache_paths, log)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        cache = load_or_build_cache(folder, key, model, data.train.x, cache_paths, log)
    return Teacher(model, cache, paths)


def student_loss(run: Run, data: DataSplits, teachers: list[nn.Module], acc: Accelerator, log: Log, *,
                 features: bool = True, student: Optional[nn.Module] = None, files: Optional[list[Path]] = None,
                 cache_prefix: str = ""):
    """The student's training loss from the recipe: labels only (alpha = 1, no feature terms) or the Distiller.

    ``features=False`` keeps the response term only (pruning recovery and QAT change the student's shapes).
    ``files`` names the weights each teacher came from (default: the recipe's), which keys its cache.
    """
    r = run.recipe
    cfg = r.distill if features else r.distill.model_copy(update={"features": []})
    if (cfg.alpha == 1.0 or cfg.response == "none") and not cfg.features:  # the teachers are not consulted at all
        return label_loss(r.train.label_smoothing)
    paths = [[f.teacher for f in cfg.features if f.teacher_index == i] for i in range(max(len(teachers), 1))]
    if r.ema_teacher and not teachers:  # while training: the student's own running average
        from .train.distiller import EmaTeacher

        distiller = Distiller([], cfg, r.train.label_smoothing)
        distiller.ema = EmaTeacher(student, r.distill.ema_decay or 0.999, paths[0])
        distiller.teachers = [distiller.ema]
        log(f"teacher: running average of the student's own weights (decay {distiller.ema.decay}), live")
        return distiller
    files = files or [teacher_file(run, i) for i in range(len(teachers))]
    ts = [_teacher(run, data, m, i, paths[i], files[i], acc, log, cache_prefix) for i, m in enumerate(teachers)]
    if ts[0].cache is not None:
        log("teacher outputs: cached once for the training set (inputs do not change between epochs)")
    elif r.train.augment:
        log("teacher outputs: live teacher passes (augmentation changes the inputs every epoch; nothing is cached)")
    return Distiller(ts, cfg, r.train.label_smoothing, weights=[t.weight for t in r.teachers][:len(ts)])


def _fit_student(run: Run, data: DataSplits, student: nn.Module, loss_fn, acc: Accelerator, resume: bool, stage: str,
                 ckpt_dir: Path, seed: int) -> FitResult:
    r = run.recipe
    module = student
    if isinstance(loss_fn, Distiller):
        idx = torch.arange(min(r.train.batch_size, len(data.train)))
        module = loss_fn.training_module(student, data.train.x[idx], idx, seed=seed)
    return fit(module, loss_fn, data.train, data.val, r.train, seed=seed, ckpt_dir=ckpt_dir, metrics_path=run.metrics_path,
               stage=stage, accelerator=acc, augment=r.train.augment, resume=resume)


def train_student(run: Run, data: DataSplits, teachers: list[nn.Module], student: nn.Module, acc: Accelerator, resume: bool,
                  log: Log) -> nn.Module:
    """Distil the student; with ``distill.generations`` > 1, each further generation is taught by the previous one."""
    r = run.recipe
    if r.student.init and not (resume and (run.path / "student" / "checkpoints" / "last.safetensors").is_file()):
        from .train.init import init_from_teacher_, recalibrate_bn_

        rep = init_from_teacher_(student, teachers[0], r.student.init, r.student.init_every)
        n_bn = recalibrate_bn_(student, data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(r.seed))])
        log(f"student: initialised from the teacher ({rep.method}, {rep.layers_copied} layers copied"
            f"{f', {n_bn} BatchNorm layers re-estimated on training inputs' if n_bn else ''})")
    d = r.distill
    how = "labels only (distill.alpha = 1)" if d.alpha == 1.0 and not d.features else \
        f"{d.response} T={d.temperature} alpha={d.alpha}" + (f" + {len(d.features)} feature term(s)" if d.features else "")
    log(f"student: {r.student.model} ({num_params(student):,} params), {how}")
    loss_fn = student_loss(run, data, teachers, acc, log, student=student)
    result = _fit_student(run, data, student, loss_fn, acc, resume, "student", run.path / "student" / "checkpoints", r.seed)
    for g in range(2, d.generations + 1):  # born-again networks (Furlanello et al. 2018)
        previous = run.path / "student" / f"gen{g - 1}.safetensors"
        if acc.is_main_process:
            save_weights(student, previous)
        acc.wait_for_everyone()
        teacher = copy.deepcopy(student).eval()
        torch.manual_seed(r.seed + g)
        student = build_model(r.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes, data.model_args)
        log(f"born-again generation {g}/{d.generations}: a new {r.student.model} taught by generation {g - 1}")
        same = [f.model_copy(update={"teacher": f.student, "teacher_index": 0}) for f in d.features]  # same architecture
        run_g = Run(run.path, r.model_copy(update={"teacher": r.teacher.model_copy(update={"weight": 1.0}), "more_teachers": [],
                                                   "distill": d.model_copy(update={"features": same})}))
        loss_fn = student_loss(run_g, data, [teacher], acc, log, student=student, files=[previous], cache_prefix=f"gen{g}_")
        result = _fit_student(run_g, data, student, loss_fn, acc, resume, f"student_gen{g}",
                              run.path / "student" / f"gen{g}_checkpoints", r.seed + g)
    if acc.is_main_process:
        save_weights(student, run.student_weights)
        write_config(run.path / "student" / "config.json", r.student, data, student, result)
        if r.ema_teacher:  # the running average is the run's teacher: evaluated and reported like any other
            save_weights(loss_fn.ema.model, run.teacher_weights)
    acc.wait_for_everyone()
    return student


def write_config(path: Path, spec, data: DataSplits, model: nn.Module, result: Optional[FitResult], **extra) -> None:
    """What rebuilds the weights beside it (model reference, kwargs, input shape, classes) and which epoch they are."""

    cfg = {"model": spec.model, "kwargs": spec.kwargs, "in_shape": list(data.input_shape), "num_classes": data.num_classes,
           "class_names": data.class_names, "params": num_params(model), "model_args": data.model_args}
    if result is not None:
        cfg.update(epochs_run=result.epochs_run, best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy)
    cfg.update(extra)
    write_atomic(path, json.dumps(cfg, indent=2), "then continue with --resume")
