"""The stages, in the one direction data flows: data -> teacher -> student -> export -> evaluate."""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn

from .data import DataSplits, load_data
from .errors import DataError, ExportError, RecipeError, RunError
from .export.onnx import export_model_onnx, onnx_parity, ort_logits, ort_session
from .evaluate.metrics import classification_metrics
from .evaluate.profile import ort_latency, torch_latency
from .evaluate.report import print_report, write_report
from .knowledge import Teacher, load_or_build_cache, predict_logits
from .knowledge.features import LOGITS, extract, resolve as resolve_path
from .compress.stages import precheck, prune_stage, quantize_stage
from .models import OnnxModule, build_model, load_weights, num_params, save_weights
from .models.loading import resize_to
from .recipe import PruneConfig, QuantizeConfig, Recipe
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
    teachers, classes = [], []
    for i, spec in enumerate([] if recipe.ema_teacher else recipe.teachers):
        torch.manual_seed(recipe.seed)
        teachers.append(build_model(spec, data.input_shape, data.num_classes))
        # a teacher trained here learns this data's labels; a loaded one may score another label set (cross-task)
        classes.append(_check_classes(teachers[-1], data, "teacher" if i == 0 else f"more_teachers[{i - 1}]", spec.train is None))
    check_no_logit_kd_across_label_sets(recipe.distill, classes, data.num_classes)
    torch.manual_seed(recipe.seed)  # same initial student weights for scratch and KD runs of one seed
    student = build_model(recipe.student, data.input_shape, data.num_classes)
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


def prepare_teacher(run: Run, model: nn.Module, data: DataSplits, acc: Accelerator, resume: bool, log: Log) -> nn.Module:
    """Use the teacher as loaded (ONNX, weights), reuse a finished earlier stage, or train it from the recipe."""
    r = run.recipe
    if isinstance(model, OnnxModule) or r.teacher.weights:
        return model
    if resume and run.teacher_weights.is_file():
        load_weights(model, run.teacher_weights)
        log(f"teacher: reusing {run.teacher_weights}")
        return model
    log(f"teacher: training {r.teacher.model} ({num_params(model):,} params) for {r.teacher.train.epochs} epochs")
    result = fit(model, label_loss(r.teacher.train.label_smoothing), data.train, data.val, r.teacher.train, seed=r.seed,
        ckpt_dir=run.path / "teacher" / "checkpoints", metrics_path=run.metrics_path, stage="teacher",
        accelerator=acc, augment=r.teacher.train.augment, resume=resume)
    if acc.is_main_process:
        save_weights(model, run.teacher_weights)
        write_config(run.path / "teacher" / "config.json", r.teacher, data, model, result)
    acc.wait_for_everyone()
    return model


def teacher_file(run: Run, index: int = 0) -> Path:
    t = run.recipe.teachers[index]
    return Path(t.model) if t.model.endswith(".onnx") else Path(t.weights) if t.weights else run.teacher_weights


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
        student = build_model(r.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes)
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
           "class_names": data.class_names, "params": num_params(model)}
    if result is not None:
        cfg.update(epochs_run=result.epochs_run, best_epoch=result.best_epoch, best_val_accuracy=result.best_val_accuracy)
    cfg.update(extra)
    path.write_text(json.dumps(cfg, indent=2))


def distill(recipe: Recipe, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            export: bool = True, evaluate_: bool = True, log: Log = print) -> Run:
    """Run a recipe end to end into the folder ``out``; returns the Run (with its report)."""
    acc = Accelerator(cpu=not torch.cuda.is_available())
    run = Run.create(out, recipe, overwrite=overwrite, resume=resume)
    if not acc.is_main_process:
        log = lambda *_: None  # noqa: E731
    data = load_data(recipe.data, recipe.seed)
    log(f"data: {data.description}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, {data.num_classes} classes")
    teachers, student = build_models(recipe, data)
    precheck(run, data, student)
    acc.wait_for_everyone()  # every process has checked the folder before the first write
    if acc.is_main_process:
        if not resume:
            run.clear_artifacts()
        run.write_recipe()
    acc.wait_for_everyone()
    if teachers:
        teachers[0] = prepare_teacher(run, teachers[0], data, acc, resume, log)
    student = train_student(run, data, teachers, student, acc, resume, log)
    if recipe.ema_teacher:
        teachers = _load_models(run, data)[0]  # from here on the saved running average is a fixed teacher
    if recipe.prune and not (resume and run.pruned_weights.is_file()):
        prune_stage(run, data, student, student_loss(run, data, teachers, acc, log, features=False), acc, log)
    if not acc.is_main_process:  # export and evaluation are the main process's alone; no barrier after
        return run
    if export or recipe.quantize:
        export_onnx(run, data=data, log=log)
    if recipe.quantize:
        quantize_stage(run, data, log, qat=_qat_fn(run, data, teachers, acc, log))
    if evaluate_:
        run.report = evaluate(run, data=data)
    return run


def compress(run: Run | str | Path, *, prune: Optional[PruneConfig] = None, quantize: Optional[QuantizeConfig] = None,
             log: Log = print) -> Run:
    """Prune and/or quantize a finished run's student; the settings are recorded in the run's recipe.yaml.

    With neither given, the run's own recipe sections are used. Quantizing alone keeps an earlier pruning
    (its files and recipe section); a new pruning replaces the earlier pass. If a stage fails, the earlier
    pass, recipe.yaml and the reports are put back as they were. The teacher and student are never touched.
    """
    run = run if isinstance(run, Run) else Run.load(run)
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
            log(f"compress: keeping the earlier pruning ({run.pruned_weights}); quantizing the pruned student")
    run.recipe = run.recipe.model_copy(update={"prune": prune, "quantize": quantize})
    acc = Accelerator(cpu=not torch.cuda.is_available())
    data = load_data(run.recipe.data, run.recipe.seed)
    teachers, student = _load_models(run, data)
    precheck(run, data, student)  # bad settings fail here, before anything is touched
    with run.restored_on_failure():
        run.clear_compressed(keep_pruned=keep_pruned)
        run.write_recipe()
        if prune and not keep_pruned:
            prune_stage(run, data, student, student_loss(run, data, teachers, acc, log, features=False), acc, log)
        export_onnx(run, data=data, log=log)
        if quantize:
            quantize_stage(run, data, log, qat=_qat_fn(run, data, teachers, acc, log))
        run.report = evaluate(run, data=data)
    return run


def _qat_fn(run: Run, data: DataSplits, teachers: list[nn.Module], acc: Accelerator, log: Log):
    """Quantization-aware training of the final student (pruned, if it was) with the recipe's Distiller."""
    def go(dst: Path) -> dict:
        from .compress.qat import qat_to_onnx

        r, q = run.recipe, run.recipe.quantize
        model = _load_pruned(run, data)
        model = _load_models(run, data)[1] if model is None else model
        return qat_to_onnx(model, student_loss(run, data, teachers, acc, log, features=False), data.train, data.val, dst, epochs=q.qat_epochs,
                           lr=q.qat_lr or r.train.lr / 10, batch_size=r.train.batch_size, seed=r.seed, log=log)

    return go


def _load_models(run: Run, data: DataSplits) -> tuple[list[nn.Module], nn.Module]:
    """The finished run's teachers (the first as trained or loaded; an ema teacher from its saved average) and student."""
    if not run.student_weights.is_file():
        raise DataError(f"{run.path} has no finished student ({run.student_weights} missing); finish it with `protege distill ... --resume`")
    r = run.recipe
    teachers = []
    for i, spec in enumerate(r.teachers):
        if r.ema_teacher:
            spec = r.student.model_copy(update={"weights": None})
        t = build_model(spec, data.input_shape, data.num_classes)
        if i == 0 and not isinstance(t, OnnxModule) and not spec.weights:
            load_weights(t, run.teacher_weights)
        teachers.append(t.eval())
    student = build_model(r.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes)
    load_weights(student, run.student_weights)
    return teachers, student.eval()


def _export_checked(model: nn.Module, run: Run, data: DataSplits, dst: Path, log: Log) -> Path:
    """Export to a candidate file, check it against PyTorch, then move it into place (a failed one is kept aside)."""
    candidate = dst.with_suffix(".candidate.onnx")
    export_model_onnx(model, data.test.x[:2], candidate, run.recipe.export.opset)
    try:
        diff = onnx_parity(model, candidate, data.test.x[:512], run.recipe.export.tolerance)
    except ExportError:
        candidate.replace(dst.with_suffix(".rejected.onnx"))  # kept for inspection; the deployed file untouched
        raise
    candidate.replace(dst)
    log(f"export: {dst} ({dst.stat().st_size / 1024:.1f} kB), max |ONNX - PyTorch| = {diff:.2e} on {min(512, len(data.test))} test inputs")
    return dst


def export_onnx(run: Run | str | Path, *, data: Optional[DataSplits] = None, log: Log = print) -> Path:
    """Export the run's student (and its pruned version, if any) to ONNX, each checked against PyTorch."""
    run = run if isinstance(run, Run) else Run.load(run)
    data = data or load_data(run.recipe.data, run.recipe.seed)
    student = _load_models(run, data)[1]
    _export_checked(student, run, data, run.onnx_path, log)
    pruned = _load_pruned(run, data)
    if pruned is not None:
        _export_checked(pruned, run, data, run.pruned_onnx, log)
    return run.onnx_path


def _load_pruned(run: Run, data: DataSplits) -> Optional[nn.Module]:
    if not run.pruned_weights.is_file():
        return None
    model = build_model(run.recipe.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes)
    groups = json.loads((run.path / "pruned" / "config.json").read_text()).get("conv_groups")
    return resize_to(model, run.pruned_weights, groups).eval()


def _latency(run: Run, fn) -> dict[str, float]:
    e = run.recipe.eval
    b1 = fn(1, e.repeats_b1)
    b32 = fn(32, e.repeats_b32)
    return {"latency_ms_b1": b1["p50"], "latency_ms_b1_p95": b1["p95"], "latency_ms_b32": b32["p50"], "latency_ms_b32_p95": b32["p95"]}


def _torch_entry(run: Run, model: nn.Module, data: DataSplits, weights: Path, teacher_logits) -> dict:
    e, shape = run.recipe.eval, data.input_shape
    if isinstance(model, OnnxModule):
        return _onnx_entry(run, model.path, data, teacher_logits)
    logits = predict_logits(model, data.test.x)
    lat = _latency(run, lambda b, n: torch_latency(model, shape, b, e.threads, e.warmup, n))
    return {"runtime": "pytorch", **classification_metrics(logits, data.test.y, teacher_logits),
            "params": num_params(model), "bytes": weights.stat().st_size, **lat}


def _onnx_entry(run: Run, path: Path, data: DataSplits, teacher_logits) -> dict:
    import onnx

    e, shape = run.recipe.eval, data.input_shape
    logits = ort_logits(ort_session(path, e.threads), data.test.x)
    params = int(sum(int(torch.tensor(t.dims).prod()) for t in onnx.load(str(path)).graph.initializer))
    lat = _latency(run, lambda b, n: ort_latency(path, shape, b, e.threads, e.warmup, n))
    return {"runtime": "onnxruntime", **classification_metrics(logits, data.test.y, teacher_logits),
            "params": params, "bytes": path.stat().st_size, **lat}


def evaluate(run: Run | str | Path, *, data: Optional[DataSplits] = None, show: bool = True) -> dict:
    """Measure every stage the run has (teacher, student, its ONNX file, pruned, int8) on the test split;
    write report.json and report.html."""
    import platform

    import onnxruntime

    from .evaluate.html import write_html

    run = run if isinstance(run, Run) else Run.load(run)
    data = data or load_data(run.recipe.data, run.recipe.seed)
    teachers, student = _load_models(run, data)
    teacher_model = teachers[0]
    t_logits = predict_logits(teacher_model, data.test.x)
    t_entry = _torch_entry(run, teacher_model, data, teacher_file(run), None)
    if t_logits.shape[-1] != data.num_classes:  # cross-task: the teacher answers another question
        t_entry.update(accuracy=None, macro_f1=None, note=f"the teacher scores {t_logits.shape[-1]} other classes (cross-task): "
                       "no accuracy or agreement on this data")
        t_logits = None
    stages = [{"name": "teacher", "file": _rel(run, teacher_file(run)), **t_entry},
              {"name": "student", "file": _rel(run, run.student_weights), **_torch_entry(run, student, data, run.student_weights, t_logits)}]
    report: dict = {"name": run.recipe.name, "data": data.description, "test_examples": len(data.test)}
    if run.onnx_path.is_file():
        stages.append({"name": "student_onnx", "file": run.onnx_path.name, **_onnx_entry(run, run.onnx_path, data, t_logits)})
        report["onnx_max_abs_diff"] = onnx_parity(student, run.onnx_path, data.test.x[:512], run.recipe.export.tolerance)
    final_torch = student
    pruned = _load_pruned(run, data)
    if pruned is not None:
        final_torch = pruned
        info = json.loads((run.path / "pruned" / "config.json").read_text())
        report["pruning"] = info
        note = next((st.get("note") for st in info["steps"] if st.get("note")), "")
        stages.append({"name": "pruned", "file": _rel(run, run.pruned_weights), "note": note,
                       **_torch_entry(run, pruned, data, run.pruned_weights, t_logits)})
        if run.pruned_onnx.is_file():
            stages.append({"name": "pruned_onnx", "file": run.pruned_onnx.name, "note": note,
                           **_onnx_entry(run, run.pruned_onnx, data, t_logits)})
    choice_file = run.quant_dir / "choice.json"
    if choice_file.is_file():
        choice = json.loads(choice_file.read_text())
        report["quantization"] = {**choice, "candidates": [{"name": k, **v} for k, v in choice["candidates"].items()]}
        if run.int8_path.is_file():
            stages.append({"name": f"int8 ({choice['chosen']})", "file": run.int8_path.name,
                           **_onnx_entry(run, run.int8_path, data, t_logits)})
    by_name = {st["name"]: st for st in stages}
    report.update({k: by_name[k] for k in ("teacher", "student", "student_onnx") if k in by_name})
    deployed, t = stages[-1], stages[0]
    report.update({
        "stages": stages,
        "deployed": deployed["name"],
        "compression_ratio": t["params"] / num_params(final_torch),
        "bytes_ratio": t["bytes"] / deployed["bytes"],
        "speedup_b1": t["latency_ms_b1"] / deployed["latency_ms_b1"],
        "speedup_b32": t["latency_ms_b32"] / deployed["latency_ms_b32"],
        "speedup_b1_pytorch": t["latency_ms_b1"] / report["student"]["latency_ms_b1"],
        "notes": "compression_ratio = teacher params / final student params (pruned if pruned); bytes_ratio and speedup_* "
                 "compare the deployed file (the last stage) with the teacher as loaded; latency = p50 ms, accuracy on the test split",
        "environment": {"cpu": _cpu_model(), "threads": run.recipe.eval.threads, "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
    })
    write_report(run.report_path, report)
    write_html(run.path / "report.html", report)
    if show:
        print_report(report)
    return report


def _rel(run: Run, path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(run.path.resolve()))
    except ValueError:
        return str(path)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
