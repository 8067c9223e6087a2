"""`protege compress RUN --max-latency-ms X --max-bytes N`: compression to a budget, measured on this machine's CPU.

Each structured pruning ratio (and no pruning) is a candidate run in RUN/budget/<name>/ (the run's teacher and student
copied in): pruned, recovered by distillation from the teacher, exported, and quantized to static and dynamic int8
(`protege compress` on it). Every file (fp32, static, dynamic per ratio) is then measured side by side in interleaved
rounds: latency at the budget's batch size, size on disk, validation accuracy (which chooses) and test accuracy (which
is reported). The most accurate file within the budget is copied to RUN/student.budget.onnx; RUN/budget/budget.json and
report.html list every candidate and the Pareto front. The run's own files are not changed. A budget no candidate
meets is an error naming the closest; its measurements go to RUN/budget/failed.json, and an earlier budget's files stay.
A second budget reuses the candidates of the first (same student and settings): it costs only the measurements."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from ..compress.budget import BudgetConfig, choose, overshoot
from ..errors import CompressError, ProtegeError, RecipeError, RunError
from ..evaluate.html import CSS, _plot, pareto_front
from ..evaluate.report import Stage
from ..export.onnx import ort_logits, ort_session
from ..files import write_atomic
from ..machine import environment
from ..recipe import PruneConfig, QuantizeConfig
from ..run import Run, file_digest, locked
from .compress import compress
from .quantize import latencies, val_metrics
from .tasks import load_run_data, task_for

log = logging.getLogger(__name__)
COPIED = ("teacher/model.safetensors", "teacher/config.json", "student/model.safetensors", "student/config.json")


def _candidate(run: Run, name: str) -> Path:
    """A fresh candidate run folder holding copies of the run's teacher and student (never links: nothing written in
    a candidate can reach the run's own files)."""
    sub = run.path / "budget" / name
    if sub.exists():
        shutil.rmtree(sub)
    for rel in COPIED:
        if (run.path / rel).is_file():
            (sub / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run.path / rel, sub / rel)
    Run(sub, run.recipe.model_copy(update={"prune": None, "quantize": None})).write_recipe()
    return sub


def compress_to_budget(run: Run | str | Path, budget: BudgetConfig, *, prune: Optional[dict] = None,
                       quantize: Optional[dict] = None) -> dict:
    """Search pruning ratios x {fp32, static, dynamic int8} for the most accurate file within ``budget``. ``prune`` /
    ``quantize``: further PruneConfig / QuantizeConfig fields for every candidate (recovery epochs, calibration, ...)."""
    path = run.path if isinstance(run, Run) else Path(run)
    prune, quantize = dict(prune or {}), dict(quantize or {})
    for field in ("ratio", "target_params", "steps"):
        if field in prune:
            raise RecipeError(f"--{'prune' if field == 'ratio' else field.replace('_', '-')} with a budget: the budget search "
                              f"chooses the pruning itself; give the ratios to try with --ratios")
    if "mode" in quantize:
        raise RecipeError("--quantize with a budget: the budget search tries fp32, static and dynamic int8 itself; drop --quantize")
    prune.setdefault("finetune_epochs", 2)
    with locked(path, "compress"):
        run = Run.load(path, read_report=False)
        if not task_for(run.recipe).compressible:
            raise RecipeError(f"a compression budget is for classification runs; {path} is a {run.recipe.task} run")
        if not run.student_weights.is_file():
            raise RunError(f"{path} has no finished student ({run.student_weights} missing); finish it with "
                           f"`protege distill RECIPE --out {path} --resume` first")
        q = QuantizeConfig(mode="int8", **quantize)
        configs = [PruneConfig(ratio=r, **prune) for r in budget.ratios]  # bad options fail here, before any work
        names = ["unpruned", *(f"pruned{100 * r:g}" for r in budget.ratios)]
        log.info(f"budget: {budget.describe()}; {len(names)} candidate runs ({', '.join(names)}) x fp32/static/dynamic int8 "
                 f"in {path / 'budget'}")
        for name, cfg in zip(names, [None, *configs]):
            if _reusable(run, name, cfg, q):
                log.info(f"budget: reusing the candidate {run.path / 'budget' / name} (same student, pruning and int8 settings)")
                continue
            compress(_candidate(run, name), prune=cfg, quantize=q)
        return _measure_and_choose(run, budget, names)


def _reusable(run: Run, name: str, prune: Optional[PruneConfig], quantize: QuantizeConfig) -> bool:
    """Whether an earlier search left this candidate finished, from the same student and with the same settings (a
    second budget then costs only the measurements)."""
    sub = run.path / "budget" / name
    if not (sub / "report.json").is_file() or not all(
            (run.path / rel).is_file() == (sub / rel).is_file() and (not (run.path / rel).is_file() or
                                                                     file_digest(run.path / rel) == file_digest(sub / rel))
            for rel in COPIED):
        return False
    try:
        old = Run.load(sub, read_report=False).recipe
    except ProtegeError:
        return False
    return old.prune == prune and old.quantize == quantize and \
        old.model_copy(update={"prune": None, "quantize": None}) == run.recipe.model_copy(update={"prune": None, "quantize": None})


def _files(run: Run, names: list[str]) -> dict[str, Path]:
    files = {}
    for name in names:
        sub = run.path / "budget" / name
        fp32 = sub / "pruned.onnx" if (sub / "pruned.onnx").is_file() else sub / "student.onnx"
        files[f"{name}/fp32"] = fp32
        for mode in ("static", "dynamic"):
            if (sub / "quantized" / f"{mode}.onnx").is_file():
                files[f"{name}/{mode}"] = sub / "quantized" / f"{mode}.onnx"
    return files


def _measure_and_choose(run: Run, budget: BudgetConfig, names: list[str]) -> dict:
    data = load_run_data(run.recipe)
    e = run.recipe.eval
    files = _files(run, names)
    log.info(f"budget: measuring {len(files)} files side by side ({e.rounds} interleaved rounds, {e.threads} thread(s))")
    cands: dict[str, dict] = {}
    for name, f in files.items():
        test_pred = ort_logits(ort_session(f, e.threads), data.test.x).argmax(-1)
        cands[name] = {**val_metrics(f, data, e.threads), "file": str(f.relative_to(run.path)),
                       "test_accuracy": float((test_pred == data.test.y).float().mean())}
    for name, lat in latencies(files, data, e.threads, e.warmup, (e.repeats_b1, e.repeats_b32), e.rounds).items():
        cands[name].update(lat)
    key = f"latency_ms_b{budget.batch_size}"
    order = list(cands)
    front = [order[i] for i in pareto_front([(cands[n][key], 100 * cands[n]["val_accuracy"]) for n in order])]
    chosen, why = choose(cands, budget)
    result = {"budget": budget.model_dump(), "budget_text": budget.describe(), "candidates": cands, "pareto_front": front,
              "chosen": chosen, "reason": why if chosen else f"no candidate meets the budget; closest: {why}",
              "selected_on": "validation split (test accuracy reported, not used to choose)",
              "environment": environment(e.threads)}
    out = run.path / "budget"
    _log_table(cands, front, chosen, key)
    if chosen is None:  # an earlier budget's budget.json, report.html and student.budget.onnx stay as they were
        write_atomic(out / "failed.json", json.dumps(result, indent=2))
        c = cands[why]
        raise CompressError(f"no candidate meets the budget ({budget.describe()}): the closest, {why}, has p50 "
                            f"{c.get(key, float('nan')):.3g} ms at batch {budget.batch_size} and {c['bytes']:,} bytes "
                            f"({overshoot(c, budget):.2f}x the budget); raise the budget or add larger --ratios "
                            f"(every candidate: {out / 'failed.json'})")
    tmp = run.path / "student.budget.onnx.tmp"  # the file first (complete, then renamed), then what describes it
    shutil.copy2(files[chosen], tmp)
    tmp.replace(run.path / "student.budget.onnx")
    (out / "failed.json").unlink(missing_ok=True)
    write_atomic(out / "budget.json", json.dumps(result, indent=2))
    write_atomic(out / "report.html", _html(run.recipe.name, result))
    c = cands[chosen]
    log.info(f"budget: chose {chosen} -> {run.path / 'student.budget.onnx'}: validation {100 * c['val_accuracy']:.2f} %, test "
             f"{100 * c['test_accuracy']:.2f} %, p50 {c[key]:.3g} ms at batch {budget.batch_size}, {c['bytes']:,} bytes")
    return result


def _log_table(cands: dict, front: list[str], chosen: Optional[str], key: str) -> None:
    lines = [f"{'candidate':<20} {'val %':>7} {'test %':>7} {key.replace('latency_', ''):>10} {'bytes':>10}"]
    for n, c in cands.items():
        mark = (" (Pareto)" if n in front else "") + (" <- chosen" if n == chosen else "")
        lines.append(f"{n:<20} {100 * c['val_accuracy']:7.2f} {100 * c['test_accuracy']:7.2f} {c.get(key, float('nan')):10.3g} "
                     f"{c['bytes']:10,}{mark}")
    log.info("budget candidates (measured side by side on this CPU):\n" + "\n".join(lines))


def _html(name: str, result: dict) -> str:
    from html import escape

    b = result["budget"]["batch_size"]
    key = f"latency_ms_b{b}"
    stages = [Stage(name=n, accuracy=c["val_accuracy"], bytes=c["bytes"], latency_ms_b1=c.get(key)) for n, c in result["candidates"].items()]
    rows = "".join(
        f'<tr><td class="l">{escape(n)}{" (chosen)" if n == result["chosen"] else ""}</td><td>{100 * c["val_accuracy"]:.2f}</td>'
        f'<td>{100 * c["test_accuracy"]:.2f}</td><td>{c.get(key, float("nan")):.3g}</td><td>{c["bytes"]:,}</td>'
        f'<td>{"yes" if n in result["pareto_front"] else ""}</td></tr>' for n, c in result["candidates"].items())
    env = " &middot; ".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in result["environment"].items())
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>protege budget: {escape(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>protege budget: {escape(name)}</h1>", f'<p class="sub">budget: {escape(result["budget_text"])}; '
        f'{escape(str(result["chosen"] or "none met it"))}: {escape(result["reason"])}</p>',
        f'<table><tr><th class="l">candidate</th><th>val acc. (%)</th><th>test acc. (%)</th><th>p50 ms, batch {b}</th>'
        f"<th>bytes</th><th>Pareto front</th></tr>{rows}</table>",
        f"<figure>{_plot('plot-budget', f'Validation accuracy vs batch-{b} latency', f'p50 latency at batch {b} (ms, log scale)', stages, lambda s: s.latency_ms_b1)}</figure>",
        '<p class="note">Chosen on the validation split; latency measured side by side in interleaved rounds on this CPU.</p>',
        f"<footer>Environment: {env}</footer>", "</body></html>", ""])
