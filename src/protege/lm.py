"""The causal-LM stages: teacher (a model folder) -> student (smaller, optionally built from teacher layers)
-> token-level distillation (teacher top-k cache or live logits; optionally on student-generated text) ->
perplexity, size and generation speed.

loss = alpha * next-token CE + (1 - alpha) * T^2 * divergence(student, teacher) over token positions,
with the divergence from losses/token.py (forward / reverse KL, generalized JSD, skew KLs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn

from .data import DataSplits
from .evaluate.lm import perplexity
from .evaluate.profile import Measurement, latency_section, measure, torch_timer
from .evaluate.report import write_report
from .knowledge.features import unwrap
from .knowledge.topk import TopKCache, load_or_build_topk
from .losses.token import causal_lm_loss, token_kd, token_kd_topk, uld
from .models import build_model, num_params, save_weights
from .files import write_atomic
from .train.guard import require_finite
from .recipe import DistillConfig, Recipe
from .run import Run, file_digest, weights_bytes
from .train import fit

Log = Callable[[str], None]
Losses = dict[str, torch.Tensor]


class LMDistiller:
    """Named token-level losses for a student LM: ``ce`` on the corpus, ``kd`` against the teacher.

    The teacher signal is a top-k cache indexed by training block, or the teacher run live (needed on
    student-generated text). With ``on_policy`` > 0, that share of steps (seeded) trains on continuations the
    student samples after the block's first ``prompt_tokens`` tokens, scored by the teacher, with the prompt
    masked out (GKD, Agarwal et al. 2024).
    """

    def __init__(self, cfg: DistillConfig, teacher: Optional[nn.Module], cache: Optional[TopKCache], seed: int = 0,
                 teacher_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        self.cfg, self.teacher, self.cache, self.seed = cfg, teacher, cache, seed
        self.teacher_ids = teacher_ids  # ULD across tokenizers: each training block in the teacher's ids, and its length
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def _kd(self, logits: torch.Tensor, x: torch.Tensor, idx: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        name = "forward_kl" if c.response == "kl" else c.response
        kw = {"temperature": c.temperature, "mask": mask, "beta": c.beta, "skew": c.skew}
        if self.cache is not None and idx is not None:
            ids, t_log_probs = (t.to(logits.device) for t in self.cache.get(idx))
            return token_kd_topk(logits, ids, t_log_probs, name, **kw)
        with torch.no_grad():
            t_logits = self.teacher(x.to(next(self.teacher.parameters()).device)).to(logits.device)
        return token_kd(logits, t_logits, name, **kw)

    def on_policy_step(self, idx: torch.Tensor) -> bool:
        """Whether this batch trains on generated text: a function of the seed and the batch (so a resumed run
        makes the same choices), true for about ``on_policy`` of the batches."""
        if not self.cfg.on_policy:
            return False
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx[0]) * 7919 + len(idx))
        return float(torch.rand((), generator=g)) < self.cfg.on_policy

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Losses:
        c = self.cfg
        logits = model(x)  # (B, L, V)
        ce = causal_lm_loss(logits[:, :-1], x[:, 1:])
        if c.response == "none" or c.alpha == 1.0:
            return {"loss": ce, "ce": ce}
        if c.response == "uld":
            kd = self._uld(logits, x, idx)
            return {"loss": c.alpha * ce + (1 - c.alpha) * kd, "ce": ce, "kd": kd}
        if self.on_policy_step(idx):
            kd = self._on_policy(model, x)
            return {"loss": c.alpha * ce + (1 - c.alpha) * kd, "ce": ce, "kd": kd, "on_policy": torch.ones(())}
        kd = self._kd(logits, x, idx, None)
        return {"loss": c.alpha * ce + (1 - c.alpha) * kd, "ce": ce, "kd": kd, "on_policy": torch.zeros(())}

    def _uld(self, logits: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """ULD against the live teacher reading the same block in its own tokenisation: the i-th next-token
        distributions of the two are paired, for the positions where the teacher's text has a next token."""
        if self.teacher_ids is None:
            t_x, t_len = x, torch.full((len(x),), x.shape[1], device=x.device)
        else:
            t_x, t_len = (t[idx.cpu()].to(x.device) for t in self.teacher_ids)
        with torch.no_grad():
            t_logits = self.teacher(t_x.to(next(self.teacher.parameters()).device)).to(logits.device)
        n = min(logits.shape[1], t_logits.shape[1]) - 1
        mask = torch.arange(n, device=x.device).unsqueeze(0) < (t_len - 1).unsqueeze(1)
        return uld(logits[:, :n], t_logits[:, :n], temperature=self.cfg.temperature, mask=mask)

    def _on_policy(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The divergence on a continuation the student samples (in eval mode: no dropout) after the block's first
        ``prompt_tokens`` tokens, scored by the live teacher; only positions that predict generated tokens count."""
        p = min(self.cfg.prompt_tokens, x.shape[1] - 1)
        inner = unwrap(model)
        was_training = inner.training
        inner.eval()
        seq = inner.generate(x[:, :p], x.shape[1] - p, sample=True)[:, : x.shape[1]]
        inner.train(was_training)
        mask = torch.zeros(seq.shape, dtype=torch.bool, device=seq.device)
        mask[:, p - 1:-1] = True  # the positions that predict generated tokens; the prompt is masked out
        return self._kd(model(seq), seq, None, mask)


def _topk(run: Run, data: DataSplits, teacher: nn.Module, teacher_file: Path, acc: Accelerator, log: Log) -> Optional[TopKCache]:
    d = run.recipe.distill
    if not d.topk or d.response == "none" or d.alpha == 1.0:
        return None
    folder = Path(d.topk_cache) if d.topk_cache else run.path / "teacher_cache" / f"top{d.topk}"
    key = {"teacher": file_digest(teacher_file), "data": data.fingerprint()}

    def get(say: Log) -> TopKCache:
        return load_or_build_topk(folder, key, teacher, data.train.x, d.topk, d.temperature, strict=bool(d.topk_cache), log=say)

    cache = get(log) if acc.is_main_process else None  # one process writes the cache, the others then read it
    acc.wait_for_everyone()
    return cache if cache is not None else get(lambda *_: None)


def train_lm_student(run: Run, data: DataSplits, teacher: nn.Module, teacher_file: Path, student: nn.Module,
                     acc: Accelerator, resume: bool, log: Log,
                     teacher_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> nn.Module:
    r = run.recipe
    if r.student.init and not (resume and (run.path / "student" / "checkpoints" / "last.safetensors").is_file()):
        from .train.init import init_from_teacher_

        rep = init_from_teacher_(student, teacher, r.student.init, r.student.init_every)
        log(f"student: initialised from the teacher ({rep.method}, {rep.layers_copied} layers copied)")
    d = r.distill
    source = f", top-{d.topk} cache" if d.topk else ", live teacher" + (" on its own tokenisation" if teacher_ids else "")
    how = "labels only (next-token CE)" if d.alpha == 1.0 or d.response == "none" else \
        f"{d.response} T={d.temperature:g} alpha={d.alpha:g}{source}" + (f", on-policy {d.on_policy:g}" if d.on_policy else "")
    log(f"student: {num_params(student):,} params, {how}; {len(data.train)} blocks x {data.input_shape[0]} tokens")
    cache = _topk(run, data, teacher, teacher_file, acc, log)
    loss_fn = LMDistiller(d, teacher, cache, seed=r.seed, teacher_ids=teacher_ids)

    def validate(model: nn.Module, device) -> dict:
        m = perplexity(model, data.val.x, device=device)
        return {"val_ppl": m["ppl"], "val_loss": m["loss"], "score": -m["loss"]}

    result = fit(student, loss_fn, data.train, data.val, r.train, seed=r.seed, ckpt_dir=run.path / "student" / "checkpoints",
                 metrics_path=run.metrics_path, stage="student", accelerator=acc, resume=resume, validate=validate)
    if acc.is_main_process:
        save_weights(student, run.student_weights)
        cfg = {"model": r.student.model, "kwargs": r.student.kwargs, "model_args": data.model_args, "params": num_params(student),
               "epochs_run": result.epochs_run, "best_epoch": result.best_epoch, "best_val_loss": -result.best_val_accuracy}
        write_atomic(run.path / "student" / "config.json", json.dumps(cfg, indent=2), "then continue with --resume")
    acc.wait_for_everyone()
    return student


def evaluate_lm(run: Run, data: DataSplits, teacher: nn.Module, teacher_file: Path, student: nn.Module,
                gen_tokens: int = 32, log: Log = print, teacher_ppl: bool = True) -> dict:
    """Test perplexity, parameters, bytes and batch-1 generation speed of teacher and student (and, after export,
    perplexity, size and scoring time of the ONNX files); report.json. ``teacher_ppl=False``: a teacher with another
    tokenizer, whose per-token perplexity would not be comparable (and which cannot read the student's ids), is
    measured for size and speed only."""
    from .machine import environment

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
                from .export.metadata import read

                entries[name]["scheme"] = read(path).get("int8")
    measured = _lm_speed(run, data, {"teacher": teacher, "student": student}, prompts, files, gen_tokens, entries)
    _log_lm(entries, data.input_shape[0], log)
    t, s = entries["teacher"], entries["student"]
    speedup, reliable = measured["generation"].ratio("teacher", "student")
    report = {"name": run.recipe.name, "task": "causal_lm", "data": data.description, **entries,
              "compression_ratio": t["params"] / s["params"],
              # tokens of two tokenizers cover different lengths of text: no like-for-like speedup then
              "speedup_generation": speedup if teacher_ppl else None,
              "speedup_generation_reliable": reliable if teacher_ppl else None,
              "bytes_ratio": (t["bytes"] / s["bytes"]) if t["bytes"] and s["bytes"] else None,
              "latency": latency_section(measured, rounds=e.rounds, warmup=e.warmup, threads=e.threads, new_tokens=gen_tokens),
              "environment": environment(e.threads)}
    write_report(run.report_path, report)
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


def _log_lm(entries: dict[str, dict], block: int, log: Log) -> None:
    """One line per measured model; "?" after a speed the measurement marked unreliable."""
    for name, en in entries.items():
        mark = lambda key: "" if en.get(key, True) else "?"  # noqa: E731
        if name in ("teacher", "student"):
            ppl = f"{en['test_ppl']:.2f}" if en["test_ppl"] is not None else "not measured (another tokenizer)"
            log(f"{name}: test perplexity {ppl}, {en['params']:,} params, {en['tokens_per_s']:.1f}{mark('generation_reliable')} tokens/s")
        else:
            log(f"{name}: {en['file']}, test perplexity {en['test_ppl']:.2f}, {en['bytes'] / 1e6:.1f} MB, "
                f"{en['ms_per_block_b1']:.1f}{mark('scoring_b1_reliable')} ms per block of {block} at batch 1")


class _OrtLM(nn.Module):
    """An exported LM file run by ONNX Runtime: ids (B, block_size) -> logits, like the PyTorch model."""

    def __init__(self, path: Path, threads: int):
        super().__init__()
        from .export.onnx import ort_session

        self.session = ort_session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .export.onnx import ort_logits

        return ort_logits(self.session, x.cpu(), batch_size=len(x))


VERIFY_BLOCKS = 8  # validation blocks the int8 LM file is checked on (each gives block_size x vocabulary logits)


def export_lm(run: Run, data: DataSplits, log: Log = print) -> Path:
    """`protege export` for a causal-LM run: student.onnx, ids (B, block_size) -> next-token logits with a dynamic
    batch (the model is causal, so padding on the right leaves the logits of the positions before it exact), checked
    against PyTorch on test blocks; student.int8.onnx, its weights dynamically quantized to int8 by ONNX Runtime; then
    the report again, with both files' test perplexity, size and scoring time. (Scoring files: no KV cache inside.)"""
    from .compress.quantize import quantize_dynamic
    from .compress.verify import scheme, verify
    from .errors import CompressError, ExportError, RunError
    from .export.metadata import describe, stamp
    from .export.onnx import export_model_onnx, onnx_parity
    from .models import load_weights
    from .recipe import QuantizeConfig

    r = run.recipe
    if not run.student_weights.is_file():
        raise RunError(f"{run.path} has no finished student ({run.student_weights} missing); finish it with --resume")
    student = build_model(r.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes, data.model_args)
    load_weights(student, run.student_weights)
    require_finite(student, run.student_weights, "student")
    student.eval()
    candidate = run.onnx_path.with_suffix(".candidate.onnx")
    export_model_onnx(student, data.test.x[:2], candidate, r.export.opset)
    try:
        diff = onnx_parity(student, candidate, data.test.x[:4], r.export.tolerance)
    except ExportError:
        candidate.replace(run.onnx_path.with_suffix(".rejected.onnx"))  # kept for inspection
        raise
    card = describe(data, r.task)
    stamp(candidate, card)
    candidate.replace(run.onnx_path)
    log(f"export: {run.onnx_path} ({run.onnx_path.stat().st_size / 1e6:.1f} MB), max |ONNX - PyTorch| = {diff:.2e} on "
        f"{min(4, len(data.test))} test blocks")
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
    log(f"quantize: dynamic int8 ({int8['weights']}) -> {run.int8_path} ({run.int8_path.stat().st_size / 1e6:.1f} MB); "
        + (f"int8 kernels match the exact arithmetic on {check['examples']} validation blocks" if check["independent"] else check["note"]))
    reevaluate_lm(run, data)
    return run.onnx_path


def _eos_id(model: nn.Module) -> int:
    """The model's end-of-text id (the first, where the config lists several; 0 where it has none)."""
    eos = getattr(unwrap(model).config, "eos_token_id", None)
    return int((eos[0] if eos else 0) if isinstance(eos, (list, tuple)) else (eos or 0))


def reevaluate_lm(run: Run, data: DataSplits) -> dict:
    """`protege evaluate` on a finished causal-LM run: rebuild teacher and student, measure again."""
    from .models import load_weights
    from .teaching import teacher_file, teacher_reads_other_text

    r = run.recipe
    if not run.student_weights.is_file():
        from .errors import RunError

        raise RunError(f"{run.path} has no finished student ({run.student_weights} missing); finish it with --resume")
    teacher = build_model(r.teacher, data.input_shape, data.num_classes, data.model_args).eval()
    student = build_model(r.student.model_copy(update={"weights": None}), data.input_shape, data.num_classes, data.model_args)
    load_weights(student, run.student_weights)
    require_finite(student, run.student_weights, "student")
    run.report = evaluate_lm(run, data, teacher, teacher_file(run), student.eval(), teacher_ppl=not teacher_reads_other_text(r))
    return run.report


def _teacher_tokenisation(recipe: Recipe, data: DataSplits, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    from .data.lm import retokenize
    from .data.text import load_tokenizer
    from .errors import RecipeError

    length = data.input_shape[0]
    positions = getattr(unwrap(teacher).config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise RecipeError(f"the teacher ({recipe.teacher.model}) reads at most {positions} tokens but data.block_size gives "
                          f"{length}; lower data.block_size to {positions} or less")
    return retokenize(data.train.x, load_tokenizer(recipe.data.tokenizer), load_tokenizer(recipe.teacher.model), length)


def distill_lm(run: Run, recipe: Recipe, data: DataSplits, acc: Accelerator, resume: bool, log: Log,
               evaluate_: bool = True) -> Run:
    """The causal-LM pipeline (called by ``protege.distill`` for task: causal_lm)."""
    from .teaching import check_tokenizers, teacher_file, teacher_reads_other_text

    check_tokenizers(recipe, data)
    foreign = teacher_reads_other_text(recipe)
    uld_ids = recipe.distill.response == "uld" and recipe.distill.alpha < 1.0 and foreign
    if foreign and not uld_ids:
        log(f"teacher: {recipe.teacher.model} has another tokenizer; this run learns from text alone (next-token CE), and the "
            f"teacher is measured for size and speed, not perplexity")
    teacher = build_model(recipe.teacher, data.input_shape, data.num_classes, data.model_args).eval()
    torch.manual_seed(recipe.seed)
    student = build_model(recipe.student, data.input_shape, data.num_classes, data.model_args)
    if recipe.student.init:  # an impossible initialisation fails here, before anything is written
        import copy

        from .train.init import init_from_teacher_

        init_from_teacher_(copy.deepcopy(student), teacher, recipe.student.init, recipe.student.init_every)
    from .errors import RecipeError

    if not foreign:  # (a teacher with another tokenizer never reads the student's ids, not even here)
        with torch.no_grad():  # both must score the same vocabulary, position by position
            v_t, v_s = (int(m.eval()(data.val.x[:1, :8]).shape[-1]) for m in (teacher, student))
        student.train()
        if v_t != v_s and recipe.distill.response != "uld":
            raise RecipeError(f"the teacher scores {v_t} tokens per position but the student {v_s}; token-level losses need "
                              f"one vocabulary: build the student with the teacher's tokenizer and vocab_size")
        if recipe.distill.topk and recipe.distill.topk > v_t:
            raise RecipeError(f"distill.topk is {recipe.distill.topk} but the teacher's vocabulary has {v_t} tokens; lower "
                              f"distill.topk")
    teacher_ids = _teacher_tokenisation(recipe, data, teacher) if uld_ids else None  # its errors come before any write
    if acc.is_main_process:
        if not resume:
            run.clear_artifacts()
        run.write_recipe()
    acc.wait_for_everyone()
    if uld_ids:
        log(f"teacher: {recipe.teacher.model} has another tokenizer; ULD feeds it each training block re-tokenised "
            f"({teacher_ids[1].float().mean():.1f} of its tokens per block of {data.input_shape[0]}) and pairs positions")
    t_file = teacher_file(run)
    teacher.to(acc.device)  # live and cache passes on the training device
    student = train_lm_student(run, data, teacher, t_file, student, acc, resume, log, teacher_ids=teacher_ids)
    if evaluate_ and acc.is_main_process:  # measured on CPU, the deployment target
        run.report = evaluate_lm(run, data, teacher.cpu(), t_file, student.cpu(), log=log, teacher_ppl=not foreign)
    return run
