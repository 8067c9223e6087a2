"""The classification task: build and check the teachers and student against the data, distil, prune and
quantize, and score every stage (accuracy, macro-F1, agreement with the teacher, size, latency)."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import onnx
import torch
from accelerate import Accelerator
from torch import nn

from ..compress.verify import int8_note
from ..data import DataSplits
from ..errors import DataError, RecipeError
from ..evaluate.html import write_html
from ..evaluate.metrics import classification_metrics
from ..evaluate.profile import (
    Measurement,
    Timer,
    latency_section,
    measure,
    ort_timer,
    stage_fields,
    timing_inputs,
    torch_timer,
)
from ..evaluate.report import Report, Stage, print_report, write_report
from ..export.onnx import onnx_parity, ort_logits, ort_session
from ..knowledge import predict_logits
from ..knowledge.features import LOGITS, extract
from ..knowledge.features import resolve as resolve_path
from ..machine import environment
from ..models import OnnxModule, build_model, num_params
from ..recipe import Recipe
from ..run import Run, read_json
from ..train import FitResult
from ..train.distiller import check_no_logit_kd_across_label_sets, feature_adapters
from ..train.init import init_from_teacher_, recalibrate_bn_
from .onnx import export_checked
from .prune import precheck, prune_stage
from .quantize import qat_fn, quantize_stage
from .task import Models, Task
from .teacher import model_config, prepare_teacher, student_loss, teacher_file
from .tokenizers import check_tokenizers

log = logging.getLogger(__name__)


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
    names = ["teacher", *(f"more_teachers[{i}]" for i in range(len(teachers) - 1))]
    _check_normalisation(recipe, [*zip(names, teachers), ("student", student)])
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
        init_from_teacher_(copy.deepcopy(student), copy.deepcopy(teachers[0]), recipe.student.init, recipe.student.init_every)
    if terms:  # shapes no adapter can bridge fail here too, before anything is written
        x = data.val.x[:4]
        paths = [[f.teacher for f in terms if f.teacher_index == i] for i in range(max(len(teachers), 1))]
        with torch.no_grad():  # (not a Teacher: that would freeze a teacher the recipe is about to train)
            touts = [extract(t.eval(), x, p, "teacher") for t, p in zip(teachers or [copy.deepcopy(student)], paths)]
        feature_adapters(terms, student, touts, x)
    return teachers, student


def _check_normalisation(recipe: Recipe, models: list[tuple[str, nn.Module]]) -> None:
    """A model that normalises its own input (``normalize``, or a Hugging Face folder's preprocessor_config.json) must
    get the data unscaled; scaled by protege as well, it would see its input normalised twice."""
    if recipe.data.scaling == "none":
        return
    for who, model in models:
        norm = getattr(model, "input_normalization", None)
        if norm is not None and recipe.data.source in ("digits", "fashion_mnist"):  # these are always standardised
            log.warning(f"warning: the {who} normalises its own input (from {norm['source']}) but {recipe.data.source} "
                        f"arrives standardised already: it sees its input normalised twice")
        elif norm is not None:
            raise RecipeError(f"the {who} normalises its own input (mean {norm['mean']}, std {norm['std']}, from "
                              f"{norm['source']}) but data.scaling is {recipe.data.scaling}: its input would be normalised "
                              f"twice; set data.scaling: none (images then arrive in [0, 1]), or {who}.normalize: none")


def _warn_if_not_smaller(recipe: Recipe, teachers: list[nn.Module], student: nn.Module) -> None:
    """A student as large as its teacher is usually a slip in student.kwargs (born-again generations are meant to be)."""
    if not teachers or recipe.distill.generations > 1:
        return
    s, t = num_params(student), num_params(teachers[0])
    if s >= t:
        log.warning(f"warning: the student ({s:,} params) is not smaller than the teacher ({t:,}): the compression ratio will be "
            f"{t / s:.2f}x; make the student smaller in student.kwargs if you meant to compress")


def _latency(run: Run, timers: dict[str, Timer]) -> dict[str, Measurement]:
    """One interleaved measurement of every stage per batch size: label ("b1", "b32") -> Measurement."""
    e = run.recipe.eval
    return {f"b{b}": measure({name: t(b) for name, t in timers.items()}, e.rounds, n, e.warmup, e.threads)
            for b, n in ((1, e.repeats_b1), (32, e.repeats_b32))}


def _torch_entry(run: Run, model: nn.Module, data: DataSplits, weights: Path, teacher_logits) -> tuple[dict, Timer]:
    """A PyTorch stage's metrics, params and bytes, and its timer (an ONNX teacher is an ONNX stage)."""
    if isinstance(model, OnnxModule):  # its chosen output, as logits (log-probabilities when it gives probabilities)
        logits = predict_logits(model, data.test.x, pad_id=data.test.pad_id)
        return ({"runtime": "onnxruntime", **classification_metrics(logits, data.test.y, teacher_logits),
                 "params": model.n_params, "bytes": model.path.stat().st_size}, torch_timer(model, timing_inputs(data)))
    logits = predict_logits(model, data.test.x, pad_id=data.test.pad_id)
    return ({"runtime": "pytorch", **classification_metrics(logits, data.test.y, teacher_logits),
             "params": num_params(model), "bytes": weights.stat().st_size}, torch_timer(model, timing_inputs(data)))


def _onnx_entry(run: Run, path: Path, data: DataSplits, teacher_logits) -> tuple[dict, Timer]:
    """An ONNX file's metrics, params and bytes, and its timer (the same ONNX Runtime session)."""
    session = ort_session(path, run.recipe.eval.threads)
    logits = ort_logits(session, data.test.x)
    params = int(sum(int(torch.tensor(t.dims).prod()) for t in onnx.load(str(path)).graph.initializer))
    return ({"runtime": "onnxruntime", **classification_metrics(logits, data.test.y, teacher_logits),
             "params": params, "bytes": path.stat().st_size}, ort_timer(session, timing_inputs(data)))


def _stages(run: Run, data: DataSplits) -> tuple[list[dict], dict[str, Timer], dict]:
    """Every stage the run has (teacher, student, its ONNX file, pruned, int8) scored on the test split, each
    stage's timer, and the report's other facts (ONNX parity, pruning, quantization)."""
    teachers, student = run.load_models(data)
    t_logits = predict_logits(teachers[0], data.test.x, pad_id=data.test.pad_id)
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
    pruned = run.load_pruned(data)
    if pruned is not None:
        report["pruning"] = info = run.pruned_info()
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


def _rel(run: Run, path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(run.path.resolve()))
    except ValueError:
        return str(path)


class ClassifyTask(Task):
    """Classification (``task: classify``): tables, images and text; every distillation method; pruning and int8."""

    name = "classify"
    compressible = True

    def data_line(self, data: DataSplits) -> str:
        return (f"data: {data.description}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
                f"{data.num_classes} classes")

    def build(self, run: Run, data: DataSplits) -> Models:
        teachers, student = build_models(run.recipe, data)
        _warn_if_not_smaller(run.recipe, teachers, student)
        precheck(run, data, student)  # pruning and quantization settings
        return Models(teachers, student)

    def teach(self, run: Run, data: DataSplits, models: Models, acc: Accelerator, resume: bool) -> Models:
        if models.teachers:
            models.teachers[0] = prepare_teacher(run, models.teachers[0], data, acc, resume)
        return models

    def init_student(self, run: Run, data: DataSplits, student: nn.Module, teacher: nn.Module) -> None:
        r = run.recipe
        rep = init_from_teacher_(student, teacher, r.student.init, r.student.init_every)
        order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(r.seed))
        n_bn = recalibrate_bn_(student, data.train.x[order[:4096]])  # all it reads
        log.info(f"student: initialised from the teacher ({rep.method}, {rep.layers_copied} layers copied"
                 f"{f', {n_bn} BatchNorm layers re-estimated on training inputs' if n_bn else ''})")

    def describe_training(self, run: Run, data: DataSplits, student: nn.Module, models: Models) -> str:
        r, d = run.recipe, run.recipe.distill
        how = "labels only (distill.alpha = 1)" if d.alpha == 1.0 and not d.features else \
            f"{d.response} T={d.temperature} alpha={d.alpha}" + (f" + {len(d.features)} feature term(s)" if d.features else "")
        return f"student: {r.student.model} ({num_params(student):,} params), {how}"

    def loss(self, run: Run, data: DataSplits, models: Models, acc: Accelerator, student: nn.Module):
        return student_loss(run, data, models.teachers, acc, student=student)

    def generations(self, run: Run) -> int:
        return run.recipe.distill.generations

    def student_config(self, run: Run, data: DataSplits, student: nn.Module, result: FitResult) -> dict:
        return model_config(run.recipe.student, data, student, result)

    def finish(self, run: Run, data: DataSplits, models: Models, student: nn.Module, acc: Accelerator, resume: bool,
               export: bool, evaluate_: bool) -> Run:
        """Prune (recovering by distillation), export, int8, evaluate."""
        r, teachers = run.recipe, models.teachers
        if r.ema_teacher:
            teachers = run.load_models(data)[0]  # from here on the saved running average is a fixed teacher
        if r.prune and not (resume and run.pruned_weights.is_file()):
            prune_stage(run, data, student, student_loss(run, data, teachers, acc, features=False), acc)
        if not acc.is_main_process:  # export and evaluation are the main process's alone; no barrier after
            return run
        if export or r.quantize:
            self.export(run, data)
        if r.quantize:
            quantize_stage(run, data, qat=qat_fn(run, data, teachers, acc))
        if evaluate_:
            run.report = self.evaluate(run, data)
        return run

    def export(self, run: Run, data: DataSplits) -> Path:
        """The student (and the pruned student, if any), each checked against PyTorch."""
        export_checked(run.load_student(data), run, data, run.onnx_path)
        pruned = run.load_pruned(data)
        if pruned is not None:
            export_checked(pruned, run, data, run.pruned_onnx)
        return run.onnx_path

    def evaluate(self, run: Run, data: DataSplits, show: bool = True) -> Report:
        """Every stage scored on the test split and timed in interleaved rounds; report.json, report.html."""
        stages, timers, facts = _stages(run, data)
        measured = _latency(run, timers)
        rows = [Stage(**st, **stage_fields(measured, st["name"])) for st in stages]
        by_name = {st.name: st for st in rows}
        deployed, t, e = rows[-1], rows[0], run.recipe.eval
        report = Report(
            name=run.recipe.name, data=data.description, test_examples=len(data.test), **facts,
            **{k: by_name[k] for k in ("teacher", "student", "student_onnx") if k in by_name},
            stages=rows, deployed=deployed.name,
            compression_ratio=t.params / by_name.get("pruned", by_name["student"]).params,
            bytes_ratio=t.bytes / deployed.bytes,
            **_speedups(measured, deployed.name),
            latency=latency_section(measured, rounds=e.rounds, warmup=e.warmup, threads=e.threads),
            notes="compression_ratio = teacher params / final student params (pruned if pruned); bytes_ratio and speedup_* "
                  "compare the deployed file (the last stage) with the teacher as loaded; latency = p50 ms over interleaved "
                  "rounds, speedups = median of per-round ratios; accuracy on the test split",
            environment=environment(e.threads))
        write_report(run.report_path, report)
        write_html(run.path / "report.html", report)
        if show:
            print_report(report)
        return report
