"""The stages, in the one direction data flows: data -> teacher -> student (teaching.py) -> compress -> export -> evaluate."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn

from .data import DataSplits, load_data
from .errors import DataError, ExportError, RecipeError, RunError
from .compress.verify import int8_note
from .export.metadata import describe, stamp
from .machine import environment
from .export.onnx import export_model_onnx, onnx_parity, ort_logits, ort_session
from .evaluate.metrics import classification_metrics
from .evaluate.profile import Measurement, Timer, latency_section, measure, ort_timer, stage_fields, timing_inputs, torch_timer
from .evaluate.report import print_report, write_report
from .knowledge import predict_logits
from .compress.stages import precheck, prune_stage, quantize_stage
from .models import OnnxModule, build_model, load_weights, num_params
from .models.loading import resize_to
from .recipe import PruneConfig, QuantizeConfig, Recipe
from .run import Run, locked, read_json
from .train.guard import require_finite
from .teaching import build_models, prepare_teacher, student_loss, teacher_file, train_student

Log = Callable[[str], None]


def distill(recipe: Recipe, out: str | Path, *, resume: bool = False, overwrite: bool = False,
            export: bool = True, evaluate_: bool = True, log: Log = print) -> Run:
    """Run a recipe end to end into the folder ``out``; returns the Run (with its report). The folder is locked
    for the duration: a second protege writing to it is refused."""
    acc = Accelerator(cpu=not torch.cuda.is_available())
    with locked(out, "distill", enabled=acc.is_main_process, create=True):
        return _distill(acc, recipe, out, resume=resume, overwrite=overwrite, export=export, evaluate_=evaluate_, log=log)


def _distill(acc: Accelerator, recipe: Recipe, out: str | Path, *, resume: bool, overwrite: bool, export: bool,
             evaluate_: bool, log: Log) -> Run:
    run = Run.create(out, recipe, overwrite=overwrite, resume=resume)
    if not acc.is_main_process:
        log = lambda *_: None  # noqa: E731
    data = load_data(recipe.data, recipe.seed)
    if recipe.task == "causal_lm":
        from .lm import distill_lm

        log(f"data: {data.description}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test blocks")
        return distill_lm(run, recipe, data, acc, resume, log, evaluate_)
    log(f"data: {data.description}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, {data.num_classes} classes")
    teachers, student = build_models(recipe, data)
    _warn_if_not_smaller(recipe, teachers, student, log)
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
    with locked(_folder(run), "compress"):
        return _compress(run if isinstance(run, Run) else Run.load(run, read_report=False), prune, quantize, log)


def _compress(run: Run, prune: Optional[PruneConfig], quantize: Optional[QuantizeConfig], log: Log) -> Run:
    _classify_only(run, "compress")
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


def _warn_if_not_smaller(recipe: Recipe, teachers: list[nn.Module], student: nn.Module, log: Log) -> None:
    """A student as large as its teacher is usually a slip in student.kwargs (born-again generations are meant to be)."""
    if not teachers or recipe.distill.generations > 1:
        return
    s, t = num_params(student), num_params(teachers[0])
    if s >= t:
        log(f"warning: the student ({s:,} params) is not smaller than the teacher ({t:,}): the compression ratio will be "
            f"{t / s:.2f}x; make the student smaller in student.kwargs if you meant to compress")


def _folder(run: Run | str | Path) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def _classify_only(run: Run, what: str) -> None:
    if run.recipe.task != "classify":
        raise RecipeError(f"`protege {what}` is for classification runs; {run.path} is a {run.recipe.task} run "
                          f"(its student is {run.student_weights}; `protege export` writes its ONNX and int8 files, "
                          f"`protege evaluate` measures its perplexity and speed)")


def _qat_fn(run: Run, data: DataSplits, teachers: list[nn.Module], acc: Accelerator, log: Log):
    """Quantization-aware training of the final student (pruned, if it was) with the recipe's Distiller."""
    def go(dst: Path) -> dict:
        from .compress.qat import qat_to_onnx

        r, q = run.recipe, run.recipe.quantize
        model = _load_pruned(run, data)
        model = _load_models(run, data)[1] if model is None else model
        return qat_to_onnx(model, student_loss(run, data, teachers, acc, log, features=False), data.train, data.val, dst, epochs=q.qat_epochs,
                           lr=q.qat_lr or r.train.lr / 10, batch_size=r.train.batch_size, seed=r.seed,
                           portable=q.target == "portable", log=log)

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
        t = build_model(spec, data.input_shape, data.num_classes, data.model_args)
        if i == 0 and not isinstance(t, OnnxModule) and not spec.weights and (r.ema_teacher or spec.train is not None):
            load_weights(t, run.teacher_weights)
        require_finite(t, run.teacher_weights if i == 0 and (r.ema_teacher or spec.train is not None) else spec.weights or spec.model,
                       "teacher")
        teachers.append(t.eval())
    student = build_model(r.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes, data.model_args)
    load_weights(student, run.student_weights)
    require_finite(student, run.student_weights, "student")
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
    stamp(candidate, describe(data, run.recipe.task))  # class names, input shape and preprocessing travel with the file
    candidate.replace(dst)
    log(f"export: {dst} ({dst.stat().st_size / 1024:.1f} kB), max |ONNX - PyTorch| = {diff:.2e} on {min(512, len(data.test))} test inputs")
    return dst


def export_onnx(run: Run | str | Path, *, data: Optional[DataSplits] = None, log: Log = print) -> Path:
    """Export the run's student (and its pruned version, if any) to ONNX, each checked against PyTorch."""
    with locked(_folder(run), "export"):
        return _export_onnx(run if isinstance(run, Run) else Run.load(run, read_report=False), data, log)


def _export_onnx(run: Run, data: Optional[DataSplits], log: Log) -> Path:
    data = data or load_data(run.recipe.data, run.recipe.seed)
    if run.recipe.task == "causal_lm":
        from .lm import export_lm

        return export_lm(run, data, log)
    student = _load_models(run, data)[1]
    _export_checked(student, run, data, run.onnx_path, log)
    pruned = _load_pruned(run, data)
    if pruned is not None:
        _export_checked(pruned, run, data, run.pruned_onnx, log)
    return run.onnx_path


def _load_pruned(run: Run, data: DataSplits) -> Optional[nn.Module]:
    if not run.pruned_weights.is_file():
        return None
    model = build_model(run.recipe.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes, data.model_args)
    groups = _pruned_info(run).get("conv_groups")
    model = resize_to(model, run.pruned_weights, groups).eval()
    require_finite(model, run.pruned_weights, "pruned student")
    return model


def _pruned_info(run: Run) -> dict:
    info = read_json(run.path / "pruned" / "config.json", f"redo the pruning with `protege compress {run.path} --prune RATIO`")
    if not isinstance(info, dict):
        raise RunError(f"{run.path / 'pruned' / 'config.json'} is damaged (not a mapping); redo the pruning with "
                       f"`protege compress {run.path} --prune RATIO`")
    return info


def _latency(run: Run, timers: dict[str, Timer]) -> dict[str, Measurement]:
    """One interleaved measurement of every stage per batch size: label ("b1", "b32") -> Measurement."""
    e = run.recipe.eval
    return {f"b{b}": measure({name: t(b) for name, t in timers.items()}, e.rounds, n, e.warmup, e.threads)
            for b, n in ((1, e.repeats_b1), (32, e.repeats_b32))}


def _torch_entry(run: Run, model: nn.Module, data: DataSplits, weights: Path, teacher_logits) -> tuple[dict, Timer]:
    """A PyTorch stage's metrics, params and bytes, and its timer (an ONNX teacher is an ONNX stage)."""
    if isinstance(model, OnnxModule):
        return _onnx_entry(run, model.path, data, teacher_logits)
    logits = predict_logits(model, data.test.x)
    return ({"runtime": "pytorch", **classification_metrics(logits, data.test.y, teacher_logits),
             "params": num_params(model), "bytes": weights.stat().st_size}, torch_timer(model, timing_inputs(data)))


def _onnx_entry(run: Run, path: Path, data: DataSplits, teacher_logits) -> tuple[dict, Timer]:
    """An ONNX file's metrics, params and bytes, and its timer (the same ONNX Runtime session)."""
    import onnx

    session = ort_session(path, run.recipe.eval.threads)
    logits = ort_logits(session, data.test.x)
    params = int(sum(int(torch.tensor(t.dims).prod()) for t in onnx.load(str(path)).graph.initializer))
    return ({"runtime": "onnxruntime", **classification_metrics(logits, data.test.y, teacher_logits),
             "params": params, "bytes": path.stat().st_size}, ort_timer(session, timing_inputs(data)))


def _stages(run: Run, data: DataSplits) -> tuple[list[dict], dict[str, Timer], dict]:
    """Every stage the run has (teacher, student, its ONNX file, pruned, int8) scored on the test split, each
    stage's timer, and the report's other facts (ONNX parity, pruning, quantization)."""
    teachers, student = _load_models(run, data)
    t_logits = predict_logits(teachers[0], data.test.x)
    stages, timers, report = [], {}, {}

    def add(name: str, file: str, entry: tuple[dict, Timer], **extra) -> None:
        stages.append({"name": name, "file": file, **extra, **entry[0]})
        timers[name] = entry[1]

    add("teacher", _rel(run, teacher_file(run)), _torch_entry(run, teachers[0], data, teacher_file(run), None))
    if t_logits.shape[-1] != data.num_classes:  # cross-task: the teacher answers another question
        stages[0].update(accuracy=None, macro_f1=None, note=f"the teacher scores {t_logits.shape[-1]} other classes "
                         "(cross-task): no accuracy or agreement on this data")
        t_logits = None
    add("student", _rel(run, run.student_weights), _torch_entry(run, student, data, run.student_weights, t_logits))
    if run.onnx_path.is_file():
        add("student_onnx", run.onnx_path.name, _onnx_entry(run, run.onnx_path, data, t_logits))
        report["onnx_max_abs_diff"] = onnx_parity(student, run.onnx_path, data.test.x[:512], run.recipe.export.tolerance)
    pruned = _load_pruned(run, data)
    if pruned is not None:
        report["pruning"] = info = _pruned_info(run)
        note = next((st.get("note") for st in info["steps"] if st.get("note")), "")
        add("pruned", _rel(run, run.pruned_weights), _torch_entry(run, pruned, data, run.pruned_weights, t_logits), note=note)
        if run.pruned_onnx.is_file():
            add("pruned_onnx", run.pruned_onnx.name, _onnx_entry(run, run.pruned_onnx, data, t_logits), note=note)
    choice_file = run.quant_dir / "choice.json"
    if choice_file.is_file():
        choice = read_json(choice_file, f"redo the quantization with `protege compress {run.path} --quantize MODE`")
        report["quantization"] = {**choice, "candidates": [{"name": k, **v} for k, v in choice["candidates"].items()]}
        if run.int8_path.is_file():
            add(f"int8 ({choice['chosen']})", run.int8_path.name, _onnx_entry(run, run.int8_path, data, t_logits),
                note=int8_note(choice.get("scheme"), choice.get("verification")))
    return stages, timers, report


def _speedups(measured: dict[str, Measurement], deployed: str) -> dict:
    """speedup_b1 / _b32 (deployed vs teacher) and speedup_b1_pytorch (student vs teacher), paired by round, each
    with a _reliable flag."""
    out: dict = {}
    for key, label, fast in (("speedup_b1", "b1", deployed), ("speedup_b32", "b32", deployed),
                             ("speedup_b1_pytorch", "b1", "student")):
        out[key], out[f"{key}_reliable"] = measured[label].ratio("teacher", fast)
    return out


def evaluate(run: Run | str | Path, *, data: Optional[DataSplits] = None, show: bool = True) -> dict:
    """Measure every stage the run has (teacher, student, its ONNX file, pruned, int8) on the test split, time them
    all in interleaved rounds; write report.json and report.html."""
    with locked(_folder(run), "evaluate"):
        return _evaluate(run if isinstance(run, Run) else Run.load(run, read_report=False), data, show)


def _evaluate(run: Run, data: Optional[DataSplits], show: bool) -> dict:
    from .evaluate.html import write_html

    data = data or load_data(run.recipe.data, run.recipe.seed)
    if run.recipe.task == "causal_lm":
        from .lm import reevaluate_lm

        return reevaluate_lm(run, data)
    stages, timers, facts = _stages(run, data)
    measured = _latency(run, timers)
    for st in stages:
        st.update(stage_fields(measured, st["name"]))
    by_name = {st["name"]: st for st in stages}
    report: dict = {"name": run.recipe.name, "data": data.description, "test_examples": len(data.test), **facts}
    report.update({k: by_name[k] for k in ("teacher", "student", "student_onnx") if k in by_name})
    deployed, t, e = stages[-1], stages[0], run.recipe.eval
    report.update({
        "stages": stages,
        "deployed": deployed["name"],
        "compression_ratio": t["params"] / by_name.get("pruned", by_name["student"])["params"],
        "bytes_ratio": t["bytes"] / deployed["bytes"],
        **_speedups(measured, deployed["name"]),
        "latency": latency_section(measured, rounds=e.rounds, warmup=e.warmup, threads=e.threads),
        "notes": "compression_ratio = teacher params / final student params (pruned if pruned); bytes_ratio and speedup_* "
                 "compare the deployed file (the last stage) with the teacher as loaded; latency = p50 ms over interleaved "
                 "rounds, speedups = median of per-round ratios; accuracy on the test split",
        "environment": environment(e.threads),
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
