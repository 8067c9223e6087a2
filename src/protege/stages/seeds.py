"""`protege distill --seeds N --baseline`: the student trained with N seeds, and for each seed a matched student from
labels only, each a run folder of its own; then the figures a claim about accuracy needs (mean +- std, the paired
difference, validation-selected and last-epoch) in summary.json and report.html.

Layout: OUT/distilled/seed<S>/ and OUT/baseline/seed<S>/ (each a whole run), OUT/summary.json, OUT/report.html,
OUT/teacher_cache/ (the teacher's outputs on the training set, computed by the first seed's run, read by the others).

What is held fixed: the train/validation/test split (the first seed's, ``data.split_seed``) and the teacher (trained
once, by the first seed's run, and loaded by every other run), so the test data is never seen by the teacher and only
the student's randomness changes from seed to seed. What a seed changes: the student's initial weights, the batch
order, dropout. The distilled and the baseline student of one seed share all three (the seed fixes them).

Several processes can work on one folder at once (the same command again, with --resume, in another terminal): each
run folder is locked while it trains, so each process takes the runs nobody holds and at the end waits for the others'
(reusing them once finished, or continuing one whose process died); every process then writes the same summary."""
from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Optional

from ..data import DataSplits
from ..errors import FolderInUse, RecipeError, RunError
from ..evaluate.compare import mean_std, render_seeds_html, summarise
from ..files import write_atomic
from ..knowledge import predict_logits
from ..logs import progress
from ..recipe import Recipe, parse_recipe
from ..run import JOIN, Run, joined, read_json, wait_until_free
from ..train.checkpoint import load_checkpoint_weights
from .distill import distill
from .tasks import load_run_data

log = logging.getLogger(__name__)


def with_fields(recipe: Recipe, fields: dict[str, Any], source: str = "") -> Recipe:
    """A copy of ``recipe`` with ``section.field`` values replaced, validated again (a bad value is a RecipeError)."""
    data = recipe.model_dump(mode="json")
    for key, value in fields.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            if isinstance(node, list):
                node = node[int(p)]
                continue
            if node.get(p) is None:  # absent, or an empty section (prune: null)
                node[p] = {}
            node = node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return parse_recipe(data, source or f"recipe {recipe.name}")


def labels_only(recipe: Recipe) -> Recipe:
    """The matched baseline: the same student, data, seed and training from labels only (distill.alpha 1, no feature
    terms, one generation) and no compression (the comparison is of the students). With an EMA self-teacher, the
    running average is still kept (and reported as the teacher), but it teaches nothing."""
    return with_fields(recipe, {"distill.alpha": 1.0, "distill.features": [], "distill.generations": 1, "prune": None,
                                "quantize": None, "seeds": 1, "baseline": False})


def _trains_teacher(recipe: Recipe) -> bool:
    t = recipe.teacher
    return not recipe.ema_teacher and t.weights is None and t.train is not None and not t.model.endswith(".onnx")


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"output path '{out}' is a file; choose a folder for --out")
    held = [p for p in ("summary.json", "distilled", "baseline") if (out / p).exists()]
    if held and not (resume or overwrite):
        raise RunError(f"'{out}' already holds a --seeds run ({held[0]}); pass --resume to continue it, --overwrite to "
                       f"replace it, or choose another --out")
    if not held and out.is_dir() and any(p.name != JOIN for p in out.iterdir()) and not overwrite:
        raise RunError(f"'{out}' is not empty and is not a --seeds run; choose an empty or new folder for --out (or --overwrite)")


def _run(recipe: Recipe, folder: Path, resume: bool, overwrite: bool, restart_changed: bool = False,
         shared_cache: Optional[Path] = None) -> Run:
    """One seed's run: reused when finished (with --resume), continued when interrupted, else trained.
    ``restart_changed``: a folder holding another recipe's run is started over (tune's final runs after more trials).
    ``shared_cache``: the folder of teacher caches the seeds share (the split and the teacher are the same)."""
    same = False
    if resume and (folder / "recipe.yaml").is_file():
        same = Run.load(folder, read_report=False).recipe.model_dump() == recipe.model_dump()
        if same and (folder / "report.json").is_file():
            log.info(f"seeds: {folder} is finished; reusing it")
            return Run.load(folder)
        if not same and restart_changed:
            log.info(f"seeds: {folder} holds a run of another recipe; starting it over")
            return distill(recipe, folder, overwrite=True, shared_cache=shared_cache)
    again = resume and (folder / "recipe.yaml").is_file()
    return distill(recipe, folder, resume=again, overwrite=overwrite or resume, shared_cache=shared_cache)


def _figures(run: Run, data: DataSplits) -> dict:
    """What the summary needs of one finished run: test accuracy of the validation-selected epoch (from its report)
    and of the last epoch (its last checkpoint, scored here, once), which epoch was selected, validation accuracy."""
    cfg = read_json(run.path / "student" / "config.json", "train the run again with --overwrite")
    gens = run.recipe.distill.generations
    ckpt = run.path / "student" / ("checkpoints" if gens == 1 else f"gen{gens}_checkpoints") / "last.safetensors"
    test = float(run.report.student.accuracy)
    if cfg["best_epoch"] == cfg["epochs_run"]:
        last = test
    else:
        student = run.load_student(data)
        load_checkpoint_weights(ckpt, student)
        logits = predict_logits(student, data.test.x, pad_id=data.test.pad_id)
        last = float((logits.argmax(-1) == data.test.y).float().mean())
    return {"folder": str(run.path), "test_accuracy": test, "last_epoch_test_accuracy": last,
            "val_accuracy": cfg["best_val_accuracy"], "best_epoch": cfg["best_epoch"], "epochs": cfg["epochs_run"],
            "params": cfg["params"], "teacher_test_accuracy": None if run.report.teacher.accuracy is None else float(run.report.teacher.accuracy)}


def one_process(what: str) -> None:
    """Several runs, each its own folder and report, are driven from one process; refuse a multi-process launch."""
    from accelerate import PartialState

    if PartialState().num_processes > 1:
        raise RecipeError(f"{what} runs in one process (each run of it is a whole run); start it without accelerate launch, "
                          f"or launch each run's recipe on its own")


def distill_seeds(recipe: Recipe, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                  baseline_recipe: Optional[Recipe] = None, restart_changed: bool = False) -> dict:
    """Train ``recipe.seeds`` students (seeds seed, seed+1, ...) and, with ``recipe.baseline`` (or a given
    ``baseline_recipe``, e.g. one tuned separately), a labels-only student per seed; write summary.json and
    report.html into ``out``; returns the summary."""
    if recipe.task != "classify":
        raise RecipeError("seeds and baseline are for task: classify (accuracy); for a causal LM, run each seed with --set seed=N")
    one_process("--seeds / --baseline")
    out = Path(out)
    _check_out(out, resume, overwrite)
    with joined(out, alone=overwrite):  # other processes may join this one (not one that overwrites)
        return _seeds(recipe, out, overwrite, baseline_recipe, restart_changed)


def _seeds(recipe: Recipe, out: Path, overwrite: bool, baseline_recipe: Optional[Recipe], restart_changed: bool) -> dict:
    """distill_seeds' runs, figures and summary. Each run is trained, continued or reused (a run found finished was
    trained by this command earlier, or by another process working here); one that another process holds is left to it
    and waited for at the end."""
    if overwrite:  # (the runs' own files go as each run is overwritten; the shared caches of earlier teachers here)
        shutil.rmtree(out / "teacher_cache", ignore_errors=True)
    baseline = baseline_recipe or (labels_only(recipe) if recipe.baseline else None)
    seeds = list(range(recipe.seed, recipe.seed + recipe.seeds))
    split = recipe.seed if recipe.data.split_seed is None else recipe.data.split_seed
    jobs = [(s, k) for s in seeds for k in ("distilled", "baseline") if k == "distilled" or baseline is not None]
    fixed: dict[str, Any] = {"data.split_seed": split, "seeds": 1, "baseline": False}
    results: dict[int, dict] = {s: {"seed": s, "distilled": None, "baseline": None} for s in seeds}
    shown: dict[str, str] = {}
    data: Optional[DataSplits] = None
    log.info(f"seeds: {len(seeds)} seed(s) x {'distilled + baseline' if baseline else 'distilled'} = {len(jobs)} runs into {out}")

    def train(seed: int, kind: str) -> bool:
        """Train (or reuse, or continue) one run and record its figures; False when another process holds its folder.
        (Without --overwrite, a run found here is this command's earlier one or a sharer's: always resumed.)"""
        nonlocal data
        r = with_fields(recipe if kind == "distilled" else baseline, {**fixed, "seed": seed})
        folder = out / kind / f"seed{seed}"
        try:
            run = _run(r, folder, not overwrite, overwrite, restart_changed, out / "teacher_cache")
        except FolderInUse:
            if overwrite:  # (it holds this folder alone: some other command is using that run)
                raise
            return False
        if _trains_teacher(recipe) and "teacher.weights" not in fixed:  # every later run loads this teacher
            fixed.update({"teacher.weights": str((folder / "teacher" / "model.safetensors").resolve()), "teacher.train": None})
        data = data or load_run_data(r)
        results[seed][kind] = _figures(run, data)
        for k in ("distilled", "baseline"):
            accs = [v[k]["test_accuracy"] for v in results.values() if v[k]]
            if accs:
                ms = mean_std(accs)
                shown[k] = f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f} %"
        return True

    def wait_for(seed: int, kind: str) -> None:
        """The run another process is training: wait for it, then reuse it (or continue it, if that process died)."""
        folder = out / kind / f"seed{seed}"
        log.info(f"seeds: another process is training {folder}; waiting for it")
        while True:
            wait_until_free(folder)
            if train(seed, kind):
                return

    pending, deferred = list(jobs), []  # several processes may work on one --seeds folder: each takes the runs nobody
    for _ in progress(range(len(jobs)), "seeds", logger=log, every=0, postfix=shown):  # holds (a step: one run here)
        while pending:
            seed, kind = pending.pop(0)
            if train(seed, kind):
                break
            if _trains_teacher(recipe) and "teacher.weights" not in fixed:  # that run trains every later run's teacher
                wait_for(seed, kind)
                break
            log.info(f"seeds: {out / kind / f'seed{seed}'} is being trained by another process; taking the next run")
            deferred.append((seed, kind))
        else:  # nothing left that nobody holds: wait for the others' runs, in order
            wait_for(*deferred.pop(0))
    summary = {"name": recipe.name, **summarise(list(results.values()), len(data.test)), "test_examples": len(data.test),
               "held_fixed": {"split_seed": split, "teacher": fixed.get("teacher.weights", recipe.teacher.weights or recipe.teacher.model)},
               "notes": "test accuracy of each run's validation-selected epoch (and of its last epoch); the difference is "
                        "distilled - baseline, paired by seed (same initial weights and batch order)"}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2), "then run the command again with --resume")
    write_atomic(out / "report.html", render_seeds_html(recipe.name, copy.deepcopy(summary), summary["notes"]),
                 "then run the command again with --resume")
    log.info(_lines(summary))
    return summary


def _lines(summary: dict) -> str:
    """The summary as the CLI prints it."""
    parts = ["seeds " + ", ".join(map(str, summary["seeds"])) + " (test accuracy, validation-selected epoch; last epoch):"]
    for kind in ("distilled", "baseline"):
        if kind in summary:
            v, last = summary[kind]["val_selected"], summary[kind]["last_epoch"]
            parts.append(f"  {kind}: {100 * v['mean']:.2f} ± {100 * v['std']:.2f} %  (last epoch {100 * last['mean']:.2f} ± "
                         f"{100 * last['std']:.2f} %)")
    if "verdict" in summary:
        parts.append(f"  {summary['verdict']}")
    return "\n".join(parts)
