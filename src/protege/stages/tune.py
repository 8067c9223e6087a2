"""`protege tune RECIPE --trials N`: choose the recipe's knobs on the validation split with Optuna (TPE sampling,
median pruning on each epoch's validation accuracy), write the best recipe, and optionally train it with several
seeds against a labels-only student tuned with the same trial budget.

Layout of the tune folder (default runs/<name>-tune):
  tune.json                 what the folder was made for (the recipe, the search spaces), checked on every start
  study.db                  the Optuna studies (SQLite) unless --storage names another database
  study.db.lock             held while a process opens study.db (processes may start at the same moment)
  teacher/                  the teacher, trained once and loaded by every trial (when the recipe trains one)
  teacher_cache/            the teacher's outputs on the training set, computed by the first trial, read by the others
  distilled/trials/NNNN/    one run folder per trial (no export, no evaluation, the test split dropped)
  baseline/trials/NNNN/     the labels-only student's trials (with --baseline)
  best.yaml, best_baseline.yaml, summary.json
  final/                    with --seeds / --baseline: the best recipes trained and tested (stages/seeds.py)

A killed tune resumes with the same command: finished trials stay in the study, the trial that was running when the
process died is marked failed and replaced. Several processes can work on one study: start each with the same command
(on several machines, the same ``--storage`` URL and a shared --out), at the same moment if you like: tune.json is
claimed with an atomic link and the database opened under its lock. The study stops at N finished trials. With
--seeds, the processes then share the final runs as well (stages/seeds.py). The study's bookkeeping across processes is
stages/tune_study.py; the search space, stages/tune_space.py.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from ..errors import FolderInUse, RecipeError, RunError, StorageError
from ..files import write_atomic, write_error, write_fix
from ..logs import progress, quiet
from ..recipe import Recipe, dump_recipe
from ..run import JOIN, joined, read_json
from ..train.fit import watch_epochs
from ..train.guard import Diverged
from ..tune import Range
from .distill import distill
from .seeds import _trains_teacher, distill_seeds, labels_only, one_process, with_fields
from .tune_space import at_edge, edge_advice, search_spaces, sample
from .tune_study import all_trials, counted, delete_study, fail_dead_trials, finished, open_storage, sampler_seed, settle, shown_url

log = logging.getLogger(__name__)
KINDS = ("distilled", "baseline")
TRIAL = {"prune": None, "quantize": None, "tune": {}}  # a trial trains and validates the student, nothing more
STARTING = ("tune.json", "study.db", "study.db.lock")  # what a process starting beside this one may have written


def _identity(recipe: Recipe, spaces: dict) -> dict:
    """What a tune folder was made for: the recipe (without the trial count and the final run's seeds, which may
    change between starts) and the search spaces."""
    data = recipe.model_dump(mode="json")
    data["tune"] = {k: v for k, v in data["tune"].items() if k != "trials"}
    data.pop("seeds"), data.pop("baseline")
    text = json.dumps(data, sort_keys=True)
    return {"recipe_sha256": hashlib.sha256(text.encode()).hexdigest(), "recipe": data,
            "spaces": {k: {f: r.model_dump(exclude_none=True) for f, r in s.items()} for k, s in spaces.items()}}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix[:-1]]


def _check_folder(out: Path, ident: dict, overwrite: bool) -> None:
    """A new tune folder, or the same recipe's (resumed); another recipe's is refused, nothing in it touched."""
    if out.exists() and not out.is_dir():
        raise RunError(f"output path '{out}' is a file; choose a folder for --out")
    if overwrite and (out / "tune.json").is_file():
        for name in (*STARTING, "teacher", "teacher_cache", *KINDS, "final", "best.yaml", "best_baseline.yaml", "summary.json"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for p in out.iterdir():  # (the claim of a process that was killed while it started)
            if _claiming(p.name):
                p.unlink(missing_ok=True)
        return
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    if "tune.json" in names:
        _same_recipe(out, ident)
    elif any(n != JOIN and n not in STARTING and not _claiming(n) for n in names):
        raise RunError(f"'{out}' is not empty and is not a tune folder; choose an empty or new folder for --out")


def _same_recipe(out: Path, ident: dict) -> None:
    old = read_json(out / "tune.json", "remove the tune folder or choose another --out")
    if old.get("recipe_sha256") != ident["recipe_sha256"]:
        diff = _differences(old.get("recipe"), ident["recipe"]) or ["tune.space"]
        raise RecipeError(f"'{out}' was made for another recipe (differs in {', '.join(diff[:4])}); its trials would not "
                          f"apply: use another --out, or --overwrite to start this folder over")


def _claiming(name: str) -> bool:
    """A tune.json being written by a process starting beside this one (_claim's or write_atomic's temporary file)."""
    return name.startswith("tune.json.") and name.endswith(".tmp")


def _claim(out: Path, ident: dict) -> None:
    """Write tune.json in a new tune folder, before the study database. Processes starting together may all have
    found the folder new: the link is atomic, so one writes the file and the others check it as on a resume (the same
    recipe joins, another is refused)."""
    made = out / "tune.json"
    if made.is_file():
        return _same_recipe(out, ident)
    mine = out / f"tune.json.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # (one --out, several machines)
    write_atomic(mine, json.dumps(ident, indent=2))
    try:
        os.link(mine, made)
    except FileExistsError:
        _same_recipe(out, ident)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise StorageError(f"cannot write {made} ({write_error(e)}); {write_fix(e, made)}, then run the command again") from None
        if not made.exists():  # a file system without hard links: a rename (two processes racing here go unguarded)
            os.replace(mine, made)
        _same_recipe(out, ident)
    finally:
        mine.unlink(missing_ok=True)


def _teacher(recipe: Recipe, out: Path) -> Recipe:
    """The recipe every trial runs: with a recipe-trained teacher, trained once in out/teacher (waiting while another
    process of the same tune trains it) and then loaded."""
    if not _trains_teacher(recipe):
        return recipe
    folder = out / "teacher"
    weights = folder / "teacher" / "model.safetensors"
    while True:
        try:
            distill(with_fields(recipe, TRIAL), folder, resume=(folder / "recipe.yaml").is_file(), teacher_only=True, test=False)
            break
        except FolderInUse:
            log.info(f"tune: another process is training the teacher in {folder}; waiting for it")
            time.sleep(10)
    return with_fields(recipe, {"teacher.weights": str(weights.resolve()), "teacher.train": None})


def _study(recipe: Recipe, kind: str, storage, out: Path, space: dict[str, Range], trials: int, identity: str) -> Any:
    """Run (or continue) one study until it holds ``trials`` finished trials; returns it. A study of the same name made
    for another recipe (a shared --storage) is refused."""
    import optuna

    name = recipe.name if kind == "distilled" else f"{recipe.name}-baseline"
    t = recipe.tune
    pruner = optuna.pruners.MedianPruner(n_startup_trials=t.startup_trials, n_warmup_steps=round(100 * t.warmup)) if t.prune \
        else optuna.pruners.NopPruner()
    earlier = all_trials(storage, name)  # a process joining a running study draws other values than the one already there
    seed = sampler_seed(recipe.seed, len(earlier), sum(t.state.name == "RUNNING" for t in earlier))
    with quiet():
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True, pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True))
    made_for = study.user_attrs.get("recipe_sha256")
    if made_for is None:
        study.set_user_attr("recipe_sha256", identity)
    elif made_for != identity:
        raise RecipeError(f"the storage already holds a study '{name}' made for another recipe; give this recipe another name, "
                          f"use another --storage, or --overwrite to delete that study")
    fail_dead_trials(study, storage)
    done = finished(study)
    if done >= trials:
        log.info(f"tune {kind}: the study holds {done} finished trials (asked for {trials}); nothing to run")
        return study
    shown: dict[str, str] = {}
    left = trials - done
    bar = iter(progress(range(left + 1), f"tune {kind}", total=left, logger=log, every=0, postfix=shown))
    next(bar)  # (a line is logged as each trial ends)
    failed = [0]

    def objective(trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        values = sample(trial, recipe, space)
        r = with_fields(recipe, {**values, **TRIAL}, f"tune trial {trial.number}")
        folder = out / kind / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("folder", str(folder))
        reported = [0]

        def report(stage: str, epoch: int, score: float) -> None:
            """At each tenth of the trial's epochs (step 10, 20, .. 100: the percentage of training done), so trials of
            different lengths are compared at the same phase of their schedules."""
            step = 10 * (10 * epoch // r.train.epochs)
            if stage != "student" or step <= reported[0]:
                return
            reported[0] = step
            if finished(trial.study) >= trials:  # another process ended the budget's last trial: this one is past it
                trial.set_user_attr("beyond_budget", True)
                raise optuna.TrialPruned(f"the study holds its {trials} finished trials; stopped at epoch {epoch}")
            trial.report(score, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation accuracy {score:.4f} at epoch {epoch} is below the median of earlier trials")

        with watch_epochs(report):
            distill(r, folder, overwrite=True, test=False, shared_cache=out / "teacher_cache")
        if finished(trial.study) >= trials:  # the budget filled after this trial's last check: it ends past it
            trial.set_user_attr("beyond_budget", True)
        cfg = read_json(folder / "student" / "config.json", "run the tune again")
        trial.set_user_attr("best_epoch", cfg["best_epoch"])
        return float(cfg["best_val_accuracy"])

    def after(study, trial) -> None:
        pruned = sum(1 for x in study.get_trials(deepcopy=False) if x.state.name == "PRUNED")
        try:
            shown["best val"] = f"{study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            pass
        shown["pruned"] = str(pruned)
        shown["study"] = f"{finished(study)}/{trials} finished"  # (with several processes, the bar counts this one's trials)
        if trial.state.name == "FAIL":
            failed[0] += 1
            log.warning(f"tune {kind}: trial {trial.number} failed: {trial.system_attrs.get('fail_reason', 'see its folder')}")
        next(bar, None)  # logs this trial's line (a bar in a terminal)
        if finished(study) >= trials:
            study.stop()
        elif failed[0] > max(trials, 5):
            raise RunError(f"tune {kind}: {failed[0]} trials failed (training diverged); lower the high end of train.lr in "
                           f"tune.space, then run the same command again")

    with quiet():
        study.optimize(objective, callbacks=[after], catch=(Diverged,), gc_after_trial=True)
    return study


def _best(recipe: Recipe, study, budget: int) -> tuple[Recipe, dict]:
    from optuna.trial import TrialState

    complete = [t for t in counted(study, budget) if t.state == TrialState.COMPLETE]
    if not complete:
        raise RunError(f"tune: no trial of study '{study.study_name}' finished (all pruned or failed); see the trial folders' "
                       f"logs, widen or move the search space, then run again")
    best = max(complete, key=lambda t: (t.value, -t.number))
    trials = study.get_trials(deepcopy=False)
    beyond = sum(bool(t.user_attrs.get("beyond_budget")) and t.state != TrialState.FAIL for t in trials)
    info = {"best_value": best.value, "best_trial": best.number, "params": best.params,
            "best_epoch": best.user_attrs.get("best_epoch"), "folder": best.user_attrs.get("folder"),
            "trials": len(trials), "complete": sum(t.state == TrialState.COMPLETE and not t.user_attrs.get("beyond_budget")
                                                   for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED and not t.user_attrs.get("beyond_budget") for t in trials),
            "beyond_budget": beyond,
            "failed": sum(t.state == TrialState.FAIL for t in trials),
            "wall_time_s": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                               if t.datetime_complete and t.datetime_start)}
    return with_fields(recipe, dict(best.params)), info


def tune(recipe: Recipe, out: str | Path, *, trials: Optional[int] = None, baseline: Optional[bool] = None,
         final_seeds: Optional[int] = None, storage: Optional[str] = None, overwrite: bool = False) -> dict:
    """Tune ``recipe`` on validation (and, with ``baseline``, a labels-only student with the same trial budget); write
    best.yaml (best_baseline.yaml) and summary.json into ``out``. With ``final_seeds``, the best recipe (and the best
    baseline) are then trained with that many seeds and tested, in out/final (stages/seeds.py). Returns the summary."""
    if recipe.task != "classify":
        raise RecipeError("protege tune is for task: classify (validation accuracy)")
    if trials is not None and trials < 1:
        raise RecipeError(f"--trials {trials}: give 1 or more")
    if final_seeds is not None and final_seeds < 1:
        raise RecipeError(f"--seeds {final_seeds}: give 1 or more (the best recipe is then trained with seeds seed, seed+1, ...)")
    trials = trials or recipe.tune.trials
    baseline = recipe.baseline if baseline is None else baseline
    out = Path(out)
    spaces = search_spaces(recipe, baseline)
    ident = _identity(recipe, spaces)
    one_process("protege tune")  # (before --overwrite removes anything)
    if out.exists() and not out.is_dir():
        raise RunError(f"output path '{out}' is a file; choose a folder for --out")
    with joined(out, alone=overwrite):  # several processes may work here, but not beside one that starts it over
        return _tune(recipe, out, trials, baseline, final_seeds, storage, overwrite, spaces, ident)


def _start(recipe: Recipe, out: Path, ident: dict, storage: Optional[str], overwrite: bool) -> tuple[Any, str]:
    """What each process does first, also when several start at once: check the folder, claim it (tune.json), open
    the study database; with --overwrite, start the studies over. Returns the storage and its URL."""
    _check_folder(out, ident, overwrite=overwrite)
    if storage:  # a bad URL fails before anything is written
        storage_obj, url = open_storage(storage, out)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, ident)
    if not storage:
        storage_obj, url = open_storage(None, out)
    if overwrite:  # (a shared --storage keeps its studies outside the folder)
        for name in (recipe.name, f"{recipe.name}-baseline"):
            delete_study(storage_obj, name)
    return storage_obj, url


def _tune(recipe: Recipe, out: Path, trials: int, baseline: bool, final_seeds: Optional[int], storage: Optional[str],
          overwrite: bool, spaces: dict, ident: dict) -> dict:
    storage_obj, url = _start(recipe, out, ident, storage, overwrite)
    base = _teacher(recipe.model_copy(update={"seeds": 1, "baseline": False}), out)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"name": recipe.name, "trials_per_study": trials, "storage": shown_url(url) if storage else "study.db"}
    best: dict[str, Recipe] = {}
    for kind, space in spaces.items():
        start = base if kind == "distilled" else labels_only(base)
        log.info(f"tune {kind}: {trials} trials over {', '.join(space)}; objective: validation accuracy (test split unread)")
        study = _study(start, kind, storage_obj, out, space, trials, ident["recipe_sha256"])
        settle(study, storage_obj, kind)
        best[kind], summary[kind] = _best(start, study, trials)
        name = "best.yaml" if kind == "distilled" else "best_baseline.yaml"
        dump_recipe(best[kind], out / name)
        log.info(f"tune {kind}: best validation accuracy {summary[kind]['best_value']:.4f} (trial {summary[kind]['best_trial']}: "
                 f"{_params(summary[kind]['params'])}); {summary[kind]['pruned']} of {summary[kind]['trials']} trials pruned"
                 + (f", {summary[kind]['beyond_budget']} stopped past the budget" if summary[kind]["beyond_budget"] else "")
                 + f"; recipe: {out / name}")
        try:  # (advice only: never the reason a finished tune loses its summary)
            summary[kind]["at_edge"] = at_edge(start, space, summary[kind]["params"])
        except Exception as e:
            log.warning(f"tune {kind}: could not check whether the best values lie at the ends of their ranges ({e})")
            summary[kind]["at_edge"] = {}
        for line in edge_advice(kind, summary[kind]["at_edge"]):
            log.warning(line)
    summary["elapsed_s"] = time.perf_counter() - t0  # this call's (the trials' own times: each study's wall_time_s)
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if final_seeds:  # (without the tune section: a later tune of more trials starts changed finals over, not resumes them)
        final = with_fields(best["distilled"], {"seeds": final_seeds, "baseline": baseline, "tune": {}})
        against = with_fields(best["baseline"], {"tune": {}}) if "baseline" in best else None
        # (several processes of one tune share these runs too: each takes the runs nobody holds, then waits for the rest)
        summary["final"] = distill_seeds(final, out / "final", resume=True, baseline_recipe=against, restart_changed=True)
        write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _params(params: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())
