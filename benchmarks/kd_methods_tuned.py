"""Distillation methods with their weights tuned on validation, against tuned KD (Fashion-MNIST tier).

    python benchmarks/kd_methods_tuned.py                      # every method (hours on 2 cores; resumable, per method)
    python benchmarks/kd_methods_tuned.py --methods dkd at     # a subset
    python benchmarks/kd_methods_tuned.py --summary-only       # the table from the finished methods
    python benchmarks/kd_methods_tuned.py --quick              # smoke test: 2,000 images, 2 trials, 2 seeds, 3 epochs

The reference is benchmarks/tune_fashion.py: its tuned KD student (8 trials over lr, weight decay, epochs, alpha and
T) and its equally tuned labels-only student, both trained with seeds 0-2 (benchmarks/results/tune_fashion.json).
Each method here starts from the tuned KD recipe (its lr, weight decay, epochs, alpha and T) plus the method's terms
(benchmarks/kd_methods.py METHODS), and `protege tune` searches the method's own knobs with the same trial budget
(8 finished trials): alpha and T, and DKD's alpha/beta, each feature term's weight (a tenth to ten times the paper's),
the EMA decay (protege's default space without the train.* fields). Two processes of one thread share each study
(median pruning after 3 trials and 30 % of a trial's epochs, as in tune_fashion.py); the best recipe is then trained
with seeds 0-2 and tested once, paired by seed with tuned KD. Born-again is left out: its teacher is each seed's own
KD student, so one study cannot serve all seeds.

Each finished method's figures (and its study's trials) are kept in benchmarks/results/kd_methods_tuned/<method>.json
(committed), so a later session continues the table; the tune folders (runs/kd_methods_tuned/) are scratch space. A
method's study is copied into <method>.studies.json beside them while it runs, so a method cut off by the end of a
session continues from its finished trials (_study_state.py); the file goes once the method's figures are written.
Writes benchmarks/results/kd_methods_tuned.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402
from kd_methods import METHODS, overrides, teacher_files  # noqa: E402
from tune_fashion import past_budget, span, study_span, study_trials, tune_in_parallel  # noqa: E402

from protege.evaluate.compare import mean_std, paired, verdict  # noqa: E402
from protege.logs import setup as setup_logging  # noqa: E402
from protege.recipe import load_recipe  # noqa: E402
from protege.tune.space import default_space  # noqa: E402

RESULTS = ROOT / "results" / "kd_methods_tuned"
REFERENCE = ROOT / "results" / "tune_fashion.json"
TUNED = [m for m in METHODS if m not in ("scratch", "kd", "born_again")]


def reference(quick: bool) -> dict:
    """Tuned KD and the tuned labels-only student: chosen knobs and per-seed test figures (tune_fashion.py)."""
    if quick:  # a stand-in reference for the smoke test: the shipped recipe's knobs, no seeds to pair with
        return {"params": {}, "kd": {}, "scratch": {}}
    if not REFERENCE.is_file():
        raise SystemExit(f"{REFERENCE} not found: run python benchmarks/tune_fashion.py first (it tunes KD, the reference)")
    ref = json.loads(REFERENCE.read_text())
    runs = ref["final"]["runs"]
    return {"params": ref["distilled"]["params"], "environment": ref["environment"],
            "kd": {r["seed"]: r["distilled"] for r in runs}, "scratch": {r["seed"]: r["baseline"] for r in runs}}


def tune_method(method: str, ref: dict, args, teacher: Path, second: Path, out: Path, state: Path) -> dict:
    """Tune one method's knobs on top of tuned KD, train the best recipe with the seeds, return its figures. The
    study is copied into ``state`` as it runs (a later session continues it: _study_state.py)."""
    folder = out / method
    sets = overrides(method, "fashion", 0, teacher, second, out) + [f"name=fashion_mnist-{method}", "teacher.train=null",
                                                                   "tune.startup_trials=3", "tune.warmup=0.3"]
    sets += [f"{k}={v}" for k, v in ref["params"].items()]  # tuned KD's choice (train.lr, distill.alpha, ...)
    sets += ["data.limit=2000", "train.epochs=3"] if args.quick else []
    data = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", sets).model_dump(mode="json")
    space = {k: r.model_dump(exclude_defaults=True) for k, r in default_space(data, baseline=False).items()
             if not k.startswith("train.")}
    data["tune"]["space"] = space
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = out / f"{method}.yaml"
    recipe_file.write_text(yaml.safe_dump(data, sort_keys=False))
    print(f"== {method}: {args.trials} trials over {', '.join(space)}", flush=True)
    summary = tune_in_parallel(recipe_file, folder / "tune", args.trials, args.workers, baseline=False, final_seeds=args.seeds,
                               state=state)
    tuned_s = study_span(folder / "tune", [data["name"]])
    runs = {r["seed"]: r["distilled"] for r in summary["final"]["runs"]}
    return {"method": method, "overrides": METHODS[method], "space": space, "tuning_wall_time_s": tuned_s,
            "study": summary["distilled"], "seeds": sorted(runs), "runs": runs, "environment": environment(1),
            "final_runs": f"{args.workers} processes of 1 thread",
            "trials": study_trials(folder / "tune", [data["name"]])[data["name"]]}


def compare(result: dict, ref: dict) -> dict:
    """A method's test figures, and its difference from tuned KD paired by seed (over the seeds both have)."""
    runs = {int(s): r for s, r in result["runs"].items()}
    row = {fig: mean_std([r[key] for r in runs.values()]) for fig, key in (("val_selected", "test_accuracy"),
                                                                            ("last_epoch", "last_epoch_test_accuracy"))}
    common = sorted(s for s in runs if s in ref["kd"])
    if len(common) > 1:
        diff = paired([runs[s]["test_accuracy"] for s in common], [ref["kd"][s]["test_accuracy"] for s in common])
        row["vs_tuned_kd"] = {**diff, "verdict": verdict(diff, what=result["method"], test_examples=10_000)}
    return row


def summarise(results: dict[str, dict], ref: dict, args) -> dict:
    rows = {"scratch": {"val_selected": mean_std([r["test_accuracy"] for r in ref["scratch"].values()]), "reference": True},
            "kd": {"val_selected": mean_std([r["test_accuracy"] for r in ref["kd"].values()]), "reference": True}}
    for row in rows.values():
        row["cpu"] = ref.get("environment", {}).get("cpu", "")
    if ref["kd"]:
        seeds = sorted(ref["kd"])
        diff = paired([ref["scratch"][s]["test_accuracy"] for s in seeds], [ref["kd"][s]["test_accuracy"] for s in seeds])
        rows["scratch"]["vs_tuned_kd"] = {**diff, "verdict": verdict(diff, what="labels only", test_examples=10_000)}
    for m, res in results.items():
        rows[m] = {**compare(res, ref), "study": {k: res["study"].get(k, 0) for k in ("trials", "complete", "pruned", "failed", "beyond_budget",
                                                                                 "best_value", "params")},
                   "tuning_wall_time_s": span(res["trials"]),  # (finished trials only)
                   "cpu": res["environment"]["cpu"] if "environment" in res else "not recorded"}
    return {"command": "python benchmarks/kd_methods_tuned.py", "environment": environment(2),
            "reference": {"file": "benchmarks/results/tune_fashion.json", "kd_params": ref["params"]},
            "trials_per_method": args.trials, "workers": args.workers, "seeds": sorted(ref["kd"]), "methods": rows,
            "runs": results}


def markdown(s: dict) -> str:
    e = s["environment"]
    kd = {k.split(".")[-1]: v for k, v in s["reference"]["kd_params"].items()}
    ways: dict[str, list[str]] = {}  # (the first methods' final runs were one process of 2 threads)
    for m, res in s["runs"].items():
        ways.setdefault(res.get("final_runs", "1 process of 2 threads"), []).append(m)
    finals = "; ".join(f"{w} ({', '.join(ms)})" for w, ms in ways.items()) or "none yet"
    lines = [f"Distillation methods, each tuned on validation, `{s['command']}` ({e['cpu']}, {' '.join(e['cpu_flags'])}; "
             f"torch {e['torch']}; tuning {s['workers']} processes of 1 thread; final runs: {finals})", "",
             "| method | test acc. (%), val-selected epoch | vs tuned KD (points, paired by seed) | verdict | test acc. (%), "
             "last epoch | trials (pruned) | tuning min | chosen | CPU |", "|---|---:|---:|---|---:|---:|---:|---|---|"]
    for m, row in s["methods"].items():
        v = row["val_selected"]
        vs = row.get("vs_tuned_kd")
        diff = "" if vs is None else f"{100 * vs['mean']:+.2f} ± {100 * vs['std']:.2f}"
        word = "" if vs is None else vs["verdict"].split(":")[0]
        last = "" if "last_epoch" not in row else f"{100 * row['last_epoch']['mean']:.2f} ± {100 * row['last_epoch']['std']:.2f}"
        cpu = row.get("cpu", "")
        if row.get("reference"):
            trials, minutes, chosen = "tune_fashion.py", "", "(reference)"
        else:
            st = row["study"]
            failed = (f", {st['failed']} failed" if st["failed"] else "") + past_budget(st)
            trials, minutes = f"{st['trials']} ({st['pruned']}{failed})", f"{row['tuning_wall_time_s'] / 60:.0f}"
            chosen = ", ".join(f"{k.replace('distill.', '')} {x:.4g}" for k, x in st["params"].items())
        lines.append(f"| {m} | {100 * v['mean']:.2f} ± {100 * v['std']:.2f} | {diff} | {word} | {last} | {trials} | "
                     f"{minutes} | {chosen} | {cpu} |")
    lines += ["", f"Every method starts from tuned KD's lr {kd.get('lr', 0):.3g}, weight decay {kd.get('weight_decay', 0):.2g}, "
              f"{kd.get('epochs')} epochs, alpha {kd.get('alpha', 0):.2f}, T {kd.get('temperature', 0):.2f} (tune_fashion.py) and "
              f"tunes its own knobs with {s['trials_per_method']} finished trials; mean ± std over seeds "
              f"{', '.join(map(str, s['seeds']))}, each trained once "
              "and tested once. The interval behind each verdict is in benchmarks/results/kd_methods_tuned.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", choices=TUNED, default=TUNED)
    ap.add_argument("--trials", type=int, help="finished trials per method; default 8 (--quick: 2)")
    ap.add_argument("--workers", type=int, default=2, help="processes working on a study at once (1 thread each)")
    ap.add_argument("--seeds", type=int, help="seeds of the final runs; default 3 (--quick: 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kd_methods_tuned")
    ap.add_argument("--summary-only", action="store_true", help="write the table from the finished methods; train nothing")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    args.trials = args.trials or (2 if args.quick else 8)
    args.seeds = args.seeds or (2 if args.quick else 3)
    ref = reference(args.quick)
    out = args.out / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    teacher, second = teacher_files("fashion", out)
    results_dir = out / "results" if args.quick else RESULTS
    if not args.summary_only:
        for m in args.methods:
            done = results_dir / f"{m}.json"
            if not done.is_file():
                done.parent.mkdir(parents=True, exist_ok=True)
                state = results_dir / f"{m}.studies.json"
                result = tune_method(m, ref, args, teacher, second, out, state)
                done.write_text(json.dumps(result, indent=2))
                state.unlink(missing_ok=True)  # (its trials are in the result)
    results = {m: json.loads((results_dir / f"{m}.json").read_text()) for m in TUNED if (results_dir / f"{m}.json").is_file()}
    if args.quick:
        for m, res in results.items():
            print(m, compare(res, ref))
        return
    summary = summarise(results, ref, args)
    (ROOT / "results" / "kd_methods_tuned.json").write_text(json.dumps(summary, indent=2))
    (ROOT / "results" / "kd_methods_tuned.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
