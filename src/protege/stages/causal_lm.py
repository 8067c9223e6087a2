"""The causal-LM task: teacher (a model folder) -> student (smaller, optionally built from teacher layers) ->
token-level distillation (teacher top-k cache or live logits; optionally on student-generated text) ->
perplexity, size and generation speed; export writes a checked ONNX file and its int8 version.

loss = alpha * next-token CE + (1 - alpha) * T^2 * divergence(student, teacher) over token positions,
with the divergence from losses/token.py (forward / reverse KL, generalized JSD, skew KLs).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from torch import nn

from ..compress.quantize import quantize_dynamic
from ..compress.verify import scheme, verify
from ..data import DataSplits
from ..data.lm import retokenize
from ..data.text import load_tokenizer
from ..errors import CompressError, RecipeError
from ..evaluate.lm import perplexity
from ..evaluate.profile import Measurement, latency_section, measure, torch_timer
from ..evaluate.report import Report, Stage, print_report, write_report
from ..export.metadata import read as read_metadata
from ..export.metadata import stamp
from ..export.onnx import ort_logits, ort_session
from ..knowledge.features import unwrap
from ..knowledge.topk import TopKCache, load_or_build_topk
from ..machine import environment
from ..models import build_model, num_params
from ..recipe import QuantizeConfig, Recipe
from ..run import Run, file_digest, weights_bytes
from ..train import FitResult
from ..train.init import init_from_teacher_
from ..train.lm_distiller import LMDistiller
from .onnx import export_checked
from .task import Models, Task
from .teacher import teacher_file
from .tokenizers import check_tokenizers, teacher_reads_other_text

log = logging.getLogger(__name__)


def _topk(run: Run, data: DataSplits, teacher: nn.Module, teacher_file: Path, acc: Accelerator) -> Optional[TopKCache]:
    d = run.recipe.distill
    if not d.topk or d.alpha == 1.0:
        return None
    folder = Path(d.topk_cache) if d.topk_cache else run.path / "teacher_cache" / f"top{d.topk}"
    key = {"teacher": file_digest(teacher_file), "data": data.fingerprint()}

    def get() -> TopKCache:
        return load_or_build_topk(folder, key, teacher, data.train.x, d.topk, d.temperature, strict=bool(d.topk_cache))

    cache = get() if acc.is_main_process else None  # one process writes the cache, the others then read it
    acc.wait_for_everyone()
    return cache if cache is not None else get()


def evaluate_lm(run: Run, data: DataSplits, teacher: nn.Module, teacher_file: Path, student: nn.Module,
                gen_tokens: int = 32, teacher_ppl: bool = True, show: bool = False) -> Report:
    """Test perplexity, parameters, bytes and batch-1 generation speed of teacher and student (and, after export,
    perplexity, size and scoring time of the ONNX files); report.json. ``teacher_ppl=False``: a teacher with another
    tokenizer, whose per-token perplexity would not be comparable (and which cannot read the student's ids), is
    measured for size and speed only."""
    e = run.recipe.eval
    entries, prompts = {}, {}
    for name, model, file in (("teacher", teacher, teacher_file), ("student", student, run.student_weights)):
        measured = name == "student" or teacher_ppl
        # a teacher with another tokenizer generates from its own end-of-text token (the same number of tokens)
        prompts[name] = data.test.x[:1, :16] if measured else torch.full((1, 16), _eos_id(teacher))
        ppl = perplexity(model, data.test.x) if measured else {"ppl": None, "loss": None, "tokens": None}
        entries[name] = {"test_ppl": ppl["ppl"], "test_loss": ppl["loss"], "test_tokens": ppl["tokens"], "params": num_params(model),
                         "bytes": weights_bytes(file) if file.is_file() else None}
        if not measured:
            entries[name]["note"] = "another tokenizer: per-token perplexity is not comparable, not measured"
    files = {}
    for name, path in (("onnx", run.onnx_path), ("int8", run.int8_path)):  # after `protege export`
        if path.is_file():
            files[name] = _OrtLM(path, e.threads)
            ppl = perplexity(files[name], data.test.x, batch_size=4)
            entries[name] = {"test_ppl": ppl["ppl"], "test_loss": ppl["loss"], "test_tokens": ppl["tokens"],
                             "bytes": path.stat().st_size, "file": path.name}
            if name == "int8":  # the scheme and portability, as read from the file (export/metadata.py)
                entries[name]["scheme"] = read_metadata(path).get("int8")
    measured = _lm_speed(run, data, {"teacher": teacher, "student": student}, prompts, files, gen_tokens, entries)
    _log_lm(entries, data.input_shape[0])
    t, s = entries["teacher"], entries["student"]
    speedup, reliable = measured["generation"].ratio("teacher", "student")
    report = Report(name=run.recipe.name, task="causal_lm", data=data.description,
                    **{k: Stage(**v) for k, v in entries.items()},
                    compression_ratio=t["params"] / s["params"],
                    # tokens of two tokenizers cover different lengths of text: no like-for-like speedup then
                    speedup_generation=speedup if teacher_ppl else None,
                    speedup_generation_reliable=reliable if teacher_ppl else None,
                    bytes_ratio=(t["bytes"] / s["bytes"]) if t["bytes"] and s["bytes"] else None,
                    latency=latency_section(measured, rounds=e.rounds, warmup=e.warmup, threads=e.threads, new_tokens=gen_tokens),
                    environment=environment(e.threads))
    write_report(run.report_path, report)
    if show:
        print_report(report)
    return report


def _lm_speed(run: Run, data: DataSplits, models: dict[str, nn.Module], prompts: dict[str, torch.Tensor],
              files: dict[str, nn.Module], gen_tokens: int, entries: dict[str, dict]) -> dict[str, Measurement]:
    """Interleaved measurements: greedy generation of ``gen_tokens`` at batch 1 with the KV cache (teacher and student,
    one generation each per round) and, after export, the time to score one test block at batch 1 (student, ONNX,
    int8). Fills the entries' speed keys; returns label -> Measurement for the report's latency section."""
    e = run.recipe.eval
    gen = {n: (lambda m=m.eval(), p=prompts[n]: m.generate(p, gen_tokens, sample=False)) for n, m in models.items()}
    out = {"generation": measure(gen, e.rounds, e.rounds, min(e.warmup, 1), e.threads, prime=False)}  # seconds per call
    for name in models:
        st = out["generation"].stats(name)
        entries[name].update(tokens_per_s=gen_tokens / (st["median"] / 1e3), ms_per_token=st["median"] / gen_tokens,
                             new_tokens=gen_tokens, prompt_tokens=int(prompts[name].shape[1]), generation_reliable=st["reliable"])
    if files:
        calls = {n: torch_timer(m, data.test.x)(1) for n, m in {"student": models["student"], **files}.items()}
        out["scoring_b1"] = measure(calls, e.rounds, e.repeats_b1, e.warmup, e.threads)
        for name in calls:
            st = out["scoring_b1"].stats(name)
            entries[name].update(ms_per_block_b1=st["median"], ms_per_block_b1_p95=st["p95"], ms_per_block_b1_iqr=st["iqr"],
                                 scoring_b1_reliable=st["reliable"])
    return out


def _log_lm(entries: dict[str, dict], block: int) -> None:
    """One line per measured model; "?" after a speed the measurement marked unreliable."""
    for name, en in entries.items():
        mark = lambda key: "" if en.get(key, True) else "?"  # noqa: E731
        if name in ("teacher", "student"):
            ppl = f"{en['test_ppl']:.2f}" if en["test_ppl"] is not None else "not measured (another tokenizer)"
            log.info(f"{name}: test perplexity {ppl}, {en['params']:,} params, {en['tokens_per_s']:.1f}{mark('generation_reliable')} tokens/s")
        else:
            log.info(f"{name}: {en['file']}, test perplexity {en['test_ppl']:.2f}, {en['bytes'] / 1e6:.1f} MB, "
                f"{en['ms_per_block_b1']:.1f}{mark('scoring_b1_reliable')} ms per block of {block} at batch 1")


class _OrtLM(nn.Module):
    """An exported LM file run by ONNX Runtime: ids (B, block_size) -> logits, like the PyTorch model."""

    def __init__(self, path: Path, threads: int):
        super().__init__()
        self.session = ort_session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ort_logits(self.session, x.cpu(), batch_size=len(x))


VERIFY_BLOCKS = 8  # validation blocks the int8 LM file is checked on (each gives block_size x vocabulary logits)


def _eos_id(model: nn.Module) -> int:
    """The model's end-of-text id (the first, where the config lists several; 0 where it has none)."""
    eos = getattr(unwrap(model).config, "eos_token_id", None)
    return int((eos[0] if eos else 0) if isinstance(eos, (list, tuple)) else (eos or 0))


def _teacher_tokenisation(recipe: Recipe, data: DataSplits, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    length = data.input_shape[0]
    positions = getattr(unwrap(teacher).config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise RecipeError(f"the teacher ({recipe.teacher.model}) reads at most {positions} tokens but data.block_size gives "
                          f"{length}; lower data.block_size to {positions} or less")
    return retokenize(data.train.x, load_tokenizer(recipe.data.tokenizer), load_tokenizer(recipe.teacher.model), length)


class CausalLMTask(Task):
    """Next-token distillation of a causal LM (``task: causal_lm``)."""

    name = "causal_lm"

    def data_line(self, data: DataSplits) -> str:
        return f"data: {data.description}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test blocks"

    def build(self, run: Run, data: DataSplits) -> Models:
        recipe = run.recipe
        check_tokenizers(recipe, data)
        foreign = teacher_reads_other_text(recipe)
        uld_ids = recipe.distill.response == "uld" and recipe.distill.alpha < 1.0 and foreign
        if foreign and not uld_ids:
            log.info(f"teacher: {recipe.teacher.model} has another tokenizer; this run learns from text alone (next-token CE), "
                     f"and the teacher is measured for size and speed, not perplexity")
        teacher = build_model(recipe.teacher, data.input_shape, data.num_classes, data.model_args).eval()
        torch.manual_seed(recipe.seed)
        student = build_model(recipe.student, data.input_shape, data.num_classes, data.model_args)
        if recipe.student.init:  # an impossible initialisation fails here, before anything is written
            init_from_teacher_(copy.deepcopy(student), teacher, recipe.student.init, recipe.student.init_every)
        if not foreign:  # (a teacher with another tokenizer never reads the student's ids, not even here)
            _check_vocabularies(recipe, data, teacher, student)
        teacher_ids = _teacher_tokenisation(recipe, data, teacher) if uld_ids else None  # its errors come before any write
        return Models([teacher], student, teacher_ids=teacher_ids, foreign=foreign)

    def teach(self, run: Run, data: DataSplits, models: Models, acc: Accelerator, resume: bool) -> Models:
        if models.teacher_ids is not None:
            log.info(f"teacher: {run.recipe.teacher.model} has another tokenizer; ULD feeds it each training block re-tokenised "
                     f"({models.teacher_ids[1].float().mean():.1f} of its tokens per block of {data.input_shape[0]}) and pairs "
                     f"positions")
        models.teachers[0].to(acc.device)  # live and cache passes on the training device
        return models

    def init_student(self, run: Run, data: DataSplits, student: nn.Module, teacher: nn.Module) -> None:
        r = run.recipe
        rep = init_from_teacher_(student, teacher, r.student.init, r.student.init_every)
        log.info(f"student: initialised from the teacher ({rep.method}, {rep.layers_copied} layers copied)")

    def describe_training(self, run: Run, data: DataSplits, student: nn.Module, models: Models) -> str:
        d = run.recipe.distill
        source = f", top-{d.topk} cache" if d.topk else ", live teacher" + (" on its own tokenisation" if models.teacher_ids else "")
        how = "labels only (next-token CE)" if d.alpha == 1.0 else \
            f"{d.response} T={d.temperature:g} alpha={d.alpha:g}{source}" + (f", on-policy {d.on_policy:g}" if d.on_policy else "")
        return f"student: {num_params(student):,} params, {how}; {len(data.train)} blocks x {data.input_shape[0]} tokens"

    def loss(self, run: Run, data: DataSplits, models: Models, acc: Accelerator, student: nn.Module):
        r, teacher = run.recipe, models.teachers[0]
        cache = _topk(run, data, teacher, teacher_file(run), acc)
        return LMDistiller(r.distill, teacher, cache, seed=r.seed, teacher_ids=models.teacher_ids)

    def validate(self, data: DataSplits):
        def validate(model: nn.Module, device) -> dict:
            m = perplexity(model, data.val.x, device=device)
            return {"val_ppl": m["ppl"], "val_loss": m["loss"], "score": -m["loss"]}

        return validate

    def student_config(self, run: Run, data: DataSplits, student: nn.Module, result: FitResult) -> dict:
        r = run.recipe
        return {"model": r.student.model, "kwargs": r.student.kwargs, "model_args": data.model_args, "params": num_params(student),
                "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "best_val_loss": -result.best_val_accuracy}

    def finish(self, run: Run, data: DataSplits, models: Models, student: nn.Module, acc: Accelerator, resume: bool,
               export: bool, evaluate_: bool) -> Run:
        if evaluate_ and acc.is_main_process:  # measured on CPU, the deployment target
            run.report = evaluate_lm(run, data, models.teachers[0].cpu(), teacher_file(run), student.cpu(),
                                     teacher_ppl=not models.foreign, show=True)
        return run

    def export(self, run: Run, data: DataSplits) -> Path:
        """student.onnx, ids (B, block_size) -> next-token logits with a dynamic batch (the model is causal, so padding
        on the right leaves the logits of the positions before it exact), checked against PyTorch on test blocks;
        student.int8.onnx, its weights dynamically quantized to int8 by ONNX Runtime; then the report again, with both
        files' test perplexity, size and scoring time. (Scoring files: no KV cache inside.)"""
        r = run.recipe
        card = export_checked(run.load_student(data), run, data, run.onnx_path, examples=4, unit="test blocks")
        qcfg = QuantizeConfig(mode="dynamic", target=r.quantize.target if r.quantize else "portable")
        run.int8_path.unlink(missing_ok=True)  # an int8 file of the earlier student must not stay beside the new one
        tmp = quantize_dynamic(run.onnx_path, run.int8_path.with_suffix(".candidate.onnx"), qcfg)
        try:  # one block at a time: block x vocabulary logits, three copies
            check = verify(tmp, data.val.x[:VERIFY_BLOCKS], run.onnx_path, threads=r.eval.threads, batch_size=1)
        except CompressError:
            tmp.replace(run.int8_path.with_suffix(".rejected.onnx"))  # kept for inspection; no int8 file is deployed
            raise
        int8 = scheme(tmp, "dynamic")
        stamp(tmp, card, int8=int8)
        tmp.replace(run.int8_path)
        log.info(f"quantize: dynamic int8 ({int8['weights']}) -> {run.int8_path} ({run.int8_path.stat().st_size / 1e6:.1f} MB); "
                 + (f"int8 kernels match the exact arithmetic on {check['examples']} validation blocks" if check["independent"]
                    else check["note"]))
        run.report = self.evaluate(run, data)
        return run.onnx_path

    def evaluate(self, run: Run, data: DataSplits, show: bool = True) -> Report:
        """Rebuild teacher and student from the run, measure again."""
        teachers, student = run.load_models(data)
        return evaluate_lm(run, data, teachers[0], teacher_file(run), student, teacher_ppl=not teacher_reads_other_text(run.recipe),
                           show=show)


def _check_vocabularies(recipe: Recipe, data: DataSplits, teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student must score the same vocabulary, position by position (ULD excepted); top-k within it."""
    with torch.no_grad():
        v_t, v_s = (int(m.eval()(data.val.x[:1, :8]).shape[-1]) for m in (teacher, student))
    student.train()
    if v_t != v_s and recipe.distill.response != "uld":
        raise RecipeError(f"the teacher scores {v_t} tokens per position but the student {v_s}; token-level losses need "
                          f"one vocabulary: build the student with the teacher's tokenizer and vocab_size")
    if recipe.distill.topk and recipe.distill.topk > v_t:
        raise RecipeError(f"distill.topk is {recipe.distill.topk} but the teacher's vocabulary has {v_t} tokens; lower "
                          f"distill.topk")
