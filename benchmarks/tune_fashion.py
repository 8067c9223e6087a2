"""`protege tune` on Fashion-MNIST: the KD student's knobs and a labels-only student's, each chosen on validation with the
same trial budget, then both trained with 3 seeds and tested once (paired by seed).

    python benchmarks/tune_fashion.py                 # 8 trials per study, 2 worker processes, then 3 seeds (about 2 h on 2 cores)
    python benchmarks/tune_fashion.py --quick         # smoke test: 2,000 images, 3 trials of 2-4 epochs, 2 seeds
    python benchmarks/tune_fashion.py --student 12,20,40:2   # another student: channels per stage, convs per stage
    python benchmarks/tune_fashion.py --augment 8     # both students see augmented images (crop + flip); the KD
                                                      # student's teacher is cached on 8 fixed views (distill.teacher_views)

The recipe is recipes/fashion_mnist.yaml (a 24k-parameter CNN student) with the committed teacher
(benchmarks/teachers/fashion_mnist_cnn.safetensors, 94.03 % test); the search space is SPACE below. Both studies live
in one SQLite file; a second process (`protege tune` with the same arguments) works on them at the same time, each
with one thread. Re-running continues a killed tune, also in a later session: the studies are copied into
benchmarks/results/tune_fashion<tag>.studies.json while they run (commit it), and a run whose scratch folder is gone
rebuilds them from it (_study_state.py; the final runs start over). Writes benchmarks/results/tune_fashion.{json,md}
(tune_fashion_augment8.{json,md} with --augment 8, the labels-only student then drawing fresh augmentations every
epoch; tune_fashion_student12-20-40d2.{json,md} with --student 12,20,40:2).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402
from _study_state import restore, saving  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege.recipe import load_recipe  # noqa: E402
from protege.stages import tune  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"
SPACE = {
    "train.lr": {"low": 0.001, "high": 0.02, "log": True},
    "train.weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
    "train.epochs": {"low": 30, "high": 60},
    "distill.alpha": {"low": 0.0, "high": 0.9},
    "distill.temperature": {"low": 1.0, "high": 10.0},
}


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, help="finished trials per study (distilled, baseline); default 8 (--quick: 3)")
    ap.add_argument("--workers", type=int, default=2, help="processes working on the studies at once (1 thread each)")
    ap.add_argument("--seeds", type=int, help="seeds of the final runs; default 3 (--quick: 2)")
    ap.add_argument("--augment", type=int, default=0, metavar="K",
                    help="train both students on augmented images, the KD student's teacher cached on K fixed views")
    ap.add_argument("--student", metavar="CHANNELS:DEPTH", help="the student CNN's channels per stage and convs per stage, "
                    "e.g. 12,20,40:2 (29,462 parameters); default: the recipe's 16,32,64:1 (24,058)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "tune_fashion")
    args = ap.parse_args()
    args.trials = args.trials or (3 if args.quick else 8)
    args.seeds = args.seeds or (2 if args.quick else 3)
    tag = f"_augment{args.augment}" if args.augment else ""
    student = []
    if args.student:
        try:
            channels, depth = args.student.split(":")
            widths = [int(c) for c in channels.split(",")]
            student = [f"student.kwargs.channels={widths}", f"student.kwargs.depth={int(depth)}"]
        except ValueError:
            raise SystemExit(f"--student {args.student}: give channels per stage and convs per stage as CHANNELS:DEPTH, "
                             f"e.g. 12,20,40:2") from None
        tag += f"_student{'-'.join(map(str, widths))}d{int(depth)}"
    out = args.out / (("quick" if args.quick else "full") + tag)
    space = dict(SPACE, **({"train.epochs": {"low": 2, "high": 4}} if args.quick else {}))
    sets = [f"teacher.weights={TEACHER}", "teacher.train=null", "tune.startup_trials=3", "tune.warmup=0.3"]
    sets += ["train.augment=true", f"distill.teacher_views={args.augment}"] if args.augment else []
    sets += student
    sets += ["data.limit=2000"] if args.quick else []
    base = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", sets)
    recipe_file = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    data = base.model_dump(mode="json")
    data["tune"]["space"] = space
    recipe_file.write_text(yaml.safe_dump(data, sort_keys=False))
    recipe = load_recipe(recipe_file)

    folder = out / "tune"
    name = "tune_fashion" + tag
    state = out / "studies.json" if args.quick else ROOT / "results" / f"{name}.studies.json"  # (kept until the results)
    summary = tune_in_parallel(recipe_file, folder, args.trials, args.workers, baseline=True, final_seeds=args.seeds,
                               state=state)
    tuned_s = study_span(folder, [recipe.name, f"{recipe.name}-baseline"])  # (a tune continued later is not counted twice)
    result = {"command": "python benchmarks/tune_fashion.py" + (f" --augment {args.augment}" if args.augment else "")
              + (f" --student {args.student}" if args.student else "")
              + (" --quick" if args.quick else ""), "augment_views": args.augment,
              "environment": environment(1), "workers": args.workers, "threads_per_worker_while_tuning": 1,
              "final_runs": f"{args.workers} processes of 1 thread",
              "trials_per_study": args.trials, "space": space, "tuning_wall_time_s": tuned_s,
              "pruning": {"startup_trials": recipe.tune.startup_trials, "warmup": recipe.tune.warmup},
              "student_params": summary["final"]["runs"][0]["distilled"]["params"],
              "teacher_test_accuracy": summary["final"]["runs"][0]["distilled"]["teacher_test_accuracy"], **summary,
              "trials": study_trials(folder, [recipe.name, f"{recipe.name}-baseline"])}
    if not args.quick:
        (ROOT / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))
        (ROOT / "results" / f"{name}.md").write_text(markdown(result))
        state.unlink(missing_ok=True)  # (its trials are in the results; a rerun tunes afresh)
    print(markdown(result))


def tune_in_parallel(recipe_file: Path, folder: Path, trials: int, workers: int, baseline: bool,
                     final_seeds: int | None = None, state: Path | None = None) -> dict:
    """`protege tune` of ``recipe_file`` into ``folder`` by ``workers`` processes of one thread each, sharing the
    folder's study database (and, with ``final_seeds``, the final runs: each process takes the seeds nobody holds);
    returns this process's summary once every process is done. With ``state`` (a file under benchmarks/results/),
    the studies are copied there while they run and rebuilt from it when ``folder`` is gone (_study_state.py)."""
    if state is not None and restore(folder, state, recipe_file):
        print(f"studies rebuilt from {state}: their finished trials count, the final runs start over", flush=True)
    with saving(folder, state, recipe_file) if state is not None else contextlib.nullcontext():
        return _tune_in_parallel(recipe_file, folder, trials, workers, baseline, final_seeds)


def _tune_in_parallel(recipe_file: Path, folder: Path, trials: int, workers: int, baseline: bool,
                      final_seeds: int | None) -> dict:
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("protege")), "tune", str(recipe_file), "--out", str(folder), "--trials",
           str(trials), "--baseline" if baseline else "--no-baseline", *(["--seeds", str(final_seeds)] if final_seeds else [])]
    helpers = []
    for i in range(workers - 1):  # the other processes join once this one has written the tune folder
        time.sleep(5 if i == 0 else 1)
        helpers.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    summary = tune(load_recipe(recipe_file), folder, trials=trials, baseline=baseline, final_seeds=final_seeds)
    for h in helpers:
        h.wait()
    return summary


def study_trials(folder: Path, names: list[str]) -> dict[str, list[dict]]:
    """Every trial of the named studies (state, values, validation accuracy, the per-tenth reports, times), for the
    results file: the study database itself stays in the scratch folder."""
    import optuna

    out = {}
    for n in names:
        study = optuna.load_study(study_name=n, storage=f"sqlite:///{folder / 'study.db'}")
        out[n] = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                   "reports": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                   "start": t.datetime_start.isoformat() if t.datetime_start else None,
                   "end": t.datetime_complete.isoformat() if t.datetime_complete else None}
                  for t in study.get_trials(deepcopy=False)]
    return out


def study_span(folder: Path, names: list[str]) -> float:
    """Wall time of the tuning itself (``span``) over the named studies' trials."""
    return span([t for trials in study_trials(folder, names).values() for t in trials])


def span(trials: list[dict]) -> float:
    """Seconds during which at least one finished (complete or pruned) trial was running, trials as ``study_trials``
    records them: the union of their intervals, so the hours between two sessions of a continued tune are not
    counted. Failed trials are left out: a trial whose process was killed (a session that ended) is marked failed
    only when the tune resumes, so its interval would count the time nothing ran."""
    from datetime import datetime

    spans = sorted((datetime.fromisoformat(t["start"]), datetime.fromisoformat(t["end"])) for t in trials
                   if t["state"] in ("COMPLETE", "PRUNED") and t["start"] and t["end"])
    total, reach = 0.0, None
    for start, end in spans:
        if reach is not None and start < reach:
            start = reach
        if end > start:
            total += (end - start).total_seconds()
        reach = end if reach is None else max(reach, end)
    return total


def past_budget(study: dict) -> str:
    """Trials another process was running when the budget filled, stopped and not counted (stages/tune_study.py counted)."""
    n = study.get("beyond_budget", 0)
    return f", {n} stopped past the budget" if n else ""


def markdown(s: dict) -> str:
    e, f = s["environment"], s["final"]
    rows = []
    for kind, label in (("distilled", "KD student, tuned"), ("baseline", "labels-only student, tuned")):
        st, v, last = s[kind], f[kind]["val_selected"], f[kind]["last_epoch"]
        params = ", ".join(f"{k.split('.')[-1]} {x:.3g}" if isinstance(x, float) else f"{k.split('.')[-1]} {x}" for k, x in st["params"].items())
        rows.append(f"| {label} | {s['student_params']:,} | {100 * v['mean']:.2f} ± {100 * v['std']:.2f} | "
                    f"{100 * last['mean']:.2f} ± {100 * last['std']:.2f} | {100 * st['best_value']:.2f} | {params} |")
    cost = "; ".join(f"{kind}: {s[kind]['trials']} trials ({s[kind]['complete']} finished, {s[kind]['pruned']} pruned, "
                     f"{s[kind]['failed']} failed{past_budget(s[kind])}), {s[kind]['wall_time_s'] / 60:.0f} min of trial time" for kind in ("distilled", "baseline"))
    return "\n".join([
        f"Fashion-MNIST, tuned on validation, `{s['command']}` ({e['cpu']}, {' '.join(e['cpu_flags'])}; torch {e['torch']}, "
        f"onnxruntime {e['onnxruntime']}; {s['workers']} tuning processes of 1 thread, final runs "
        f"{s.get('final_runs', '1 process of 2 threads')})",
        "",
        "| student | params | test acc. (%), val-selected epoch | test acc. (%), last epoch | best trial's val acc. (%) | chosen |",
        "|---|---:|---:|---:|---:|---|",
        *rows,
        "",
        f"Teacher: {100 * s['teacher_test_accuracy']:.2f} % test. Mean ± std over {len(f['seeds'])} seeds (each tuned recipe "
        f"trained once per seed, tested once). KD - labels only, paired by seed: {f['verdict']}.",
        f"Budget: {s['trials_per_study']} finished trials per study, the same for both. Cost: {cost}; tuning wall time "
        f"{s['tuning_wall_time_s'] / 60:.0f} min. Search space: {json.dumps(s['space'])}; median pruning at each tenth of a "
        f"trial's epochs after {s['pruning']['startup_trials']} trials and {100 * s['pruning']['warmup']:.0f} % of its epochs.",
        "",
    ])


if __name__ == "__main__":
    main()
