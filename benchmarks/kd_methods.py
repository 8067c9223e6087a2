"""Distillation methods side by side: scratch, KD, DKD, FitNets, AT, RKD, SP, two teachers, born-again,
a student initialised from the teacher's weights, and an EMA self-teacher; 3 seeds each.

    python benchmarks/kd_methods.py --tier digits     # fast tier, bundled data (about 10 minutes on 2 cores)
    python benchmarks/kd_methods.py --tier fashion    # the core pipeline's teacher and student (hours; resumable)
    python benchmarks/kd_methods.py --tier fashion --methods kd fitnets --seeds 0   # a subset

Every run is the shipped recipe (recipes/digits.yaml or recipes/fashion_mnist.yaml) plus the overrides listed
in METHODS, so a method differs from plain KD only in its loss terms (same student, epochs, optimiser, T
and alpha). Seed s fixes the student's initial weights and the data order, shared by all methods.
Accuracy is on the test split at the validation-selected epoch; mean ± std over seeds. Finished runs are
skipped and interrupted ones resumed, so re-running continues where it stopped. Each finished run's numbers are
kept in benchmarks/results/kd_methods/<tier>/<method>_seed<s>.json (committed), so a later session (or machine)
continues the table; the run folders themselves (runs/kd_methods/) are scratch space.

Teachers: fashion uses the committed benchmarks/teachers/fashion_mnist_cnn.safetensors (and, as the second
teacher, fashion_mnist_resnet20.safetensors); digits trains its two teachers (the recipe's CNN, and a ResNet-8)
once, in runs/kd_methods/digits/. Born-again's teacher is the same seed's KD student (generation 1 -> 2).
Writes benchmarks/results/kd_methods_<tier>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege import distill, load_recipe  # noqa: E402
from protege.data import load_data  # noqa: E402
from protege.knowledge import predict_logits  # noqa: E402
from protege.models import build_model, load_weights  # noqa: E402

RESULTS = ROOT / "results" / "kd_methods"
TIERS = {
    "digits": {"recipe": "digits.yaml", "student": "{channels: [8, 16, 32], depth: 1}", "second": "resnet8"},
    "fashion": {"recipe": "fashion_mnist.yaml", "student": "{channels: [16, 32, 64], depth: 1}", "second": "resnet20"},
}
# Loss weights follow the papers' settings where their loss has the same scale as ours: RKD 25 (distance) and 50
# (angle), SP 3000 (Tung & Mori); AT's beta/2 = 500 divided by H*W, because our AT sums over positions (the paper's
# code averages); FitNets weight 1 on the adapted MSE. None was tuned on test data.
METHODS: dict[str, list[str]] = {
    "scratch": ["distill.alpha=1.0"],
    "kd": [],
    "dkd": ["distill.response=dkd"],
    "fitnets": ["distill.features=[{loss: hint, student: features.1, teacher: features.1, weight: 1.0}]"],
    "at": ["distill.features=[{loss: at, student: features.0, teacher: features.0, weight: {w0}},"
           "{loss: at, student: features.1, teacher: features.1, weight: {w1}},"
           "{loss: at, student: features.2, teacher: features.2, weight: {w1}}]"],
    "rkd": ["distill.features=[{loss: rkd_distance, student: pool, teacher: pool, weight: 25},"
            "{loss: rkd_angle, student: pool, teacher: pool, weight: 50}]"],
    "sp": ["distill.features=[{loss: sp, student: features.2, teacher: features.2, weight: 3000}]"],
    "two_teachers": ["more_teachers=[{model: {second}, weights: {second_weights}}]"],
    "born_again": ["teacher.model=cnn", "teacher.kwargs={student}", "teacher.weights={kd_student}"],
    "init_from_teacher": ["student.init=select"],
    "ema_self": ["teacher={model: ema}", "distill.ema_decay=0.999"],
}


def teacher_files(tier: str, out: Path) -> tuple[Path, Path]:
    """The tier's teacher and second teacher weights (digits: trained here once, through the pipeline)."""
    if tier == "fashion":
        return ROOT / "teachers" / "fashion_mnist_cnn.safetensors", ROOT / "teachers" / "fashion_mnist_resnet20.safetensors"
    files = []
    for name, sets in (("cnn", []), ("resnet8", ["teacher.model=resnet8", "teacher.kwargs={}"])):
        dst = out / f"teacher_{name}.safetensors"
        if not dst.is_file():
            run_dir = out / f"teacher_{name}_run"
            shutil.rmtree(run_dir, ignore_errors=True)
            r = load_recipe(ROOT.parent / "recipes" / TIERS[tier]["recipe"], sets + ["train.epochs=1"])
            distill(r, run_dir, export=False, evaluate_=False)
            shutil.copy(run_dir / "teacher" / "model.safetensors", dst)
        files.append(dst)
    return files[0], files[1]


def overrides(method: str, tier: str, seed: int, teacher: Path, second: Path, out: Path) -> list[str]:
    t = TIERS[tier]
    hw0, hw1 = (16, 4) if tier == "digits" else (196, 49)  # H*W of features.0 and of features.1/2
    fill = {"{w0}": f"{500 / hw0:g}", "{w1}": f"{500 / hw1:g}", "{second}": t["second"], "{second_weights}": str(second),
            "{student}": t["student"], "{kd_student}": str(out / f"kd_seed{seed}" / "student" / "model.safetensors")}
    sets = [f"seed={seed}", f"teacher.weights={teacher}"]
    for s in METHODS[method]:
        for k, v in fill.items():
            s = s.replace(k, v)
        sets.append(s)
    if method == "ema_self":
        sets.remove(f"teacher.weights={teacher}")
    return sets


def load_weights_from_checkpoint(model, path: Path) -> None:
    """The student's weights at the last epoch, from a fit() checkpoint (``student.`` inside a DistillModule)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = {k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    if any(k.startswith("student.") for k in state):
        state = {k[8:]: v for k, v in state.items() if k.startswith("student.")}
    model.load_state_dict(state)


def run_method(tier: str, method: str, seed: int, teacher: Path, second: Path, out: Path, force: bool = False) -> dict:
    run_dir = out / f"{method}_seed{seed}"
    done = RESULTS / tier / f"{method}_seed{seed}.json"
    if done.is_file() and not force:
        return json.loads(done.read_text())
    if method == "born_again" and not (out / f"kd_seed{seed}" / "student" / "model.safetensors").is_file():
        run_method(tier, "kd", seed, teacher, second, out, force=True)  # its teacher: this seed's KD student
    recipe = load_recipe(ROOT.parent / "recipes" / TIERS[tier]["recipe"], overrides(method, tier, seed, teacher, second, out))
    resume = (run_dir / "recipe.yaml").is_file()
    print(f"== {tier} {method} seed {seed}", flush=True)
    run = distill(recipe, run_dir, resume=resume, overwrite=not resume, export=False, evaluate_=False)
    data = load_data(recipe.data, recipe.seed)
    student = build_model(recipe.student.model_copy(update={"weights": None, "init": None}), data.input_shape, data.num_classes)
    load_weights(student, run.student_weights)
    acc = float((predict_logits(student, data.test.x).argmax(-1) == data.test.y).float().mean())
    load_weights_from_checkpoint(student, run.path / "student" / "checkpoints" / "last.safetensors")
    last_acc = float((predict_logits(student, data.test.x).argmax(-1) == data.test.y).float().mean())
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    student_rows = [r for r in rows if r["stage"].startswith("student")]
    cfg = json.loads((run.path / "student" / "config.json").read_text())
    result = {"method": method, "seed": seed, "test_accuracy": acc, "last_epoch_test_accuracy": last_acc, "best_epoch": cfg["best_epoch"],
              "best_val_accuracy": cfg["best_val_accuracy"], "epoch_time_s": statistics.median(r["epoch_time_s"] for r in student_rows),
              "overrides": METHODS[method]}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


def summarise(tier: str, results: dict[str, list[dict]], args) -> dict:
    def ms(xs):
        return [statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]

    table = {m: {"test_accuracy_mean_std": ms([100 * r["test_accuracy"] for r in rs]), "seeds": [r["seed"] for r in rs],
                 "last_epoch_test_accuracy_mean_std": ms([100 * r["last_epoch_test_accuracy"] for r in rs])
                 if all("last_epoch_test_accuracy" in r for r in rs) else None,
                 "epoch_time_s": statistics.median(r["epoch_time_s"] for r in rs)} for m, rs in results.items() if rs}
    # vs KD: the mean of per-seed differences over the seeds both have (equal to the difference of the means when
    # every seed is in; paired, so a method with fewer finished seeds is compared on those seeds only)
    kd = {r["seed"]: r["test_accuracy"] for r in results.get("kd", [])}
    for m, row in table.items():
        diffs = [100 * (r["test_accuracy"] - kd[r["seed"]]) for r in results[m] if r["seed"] in kd]
        row["vs_kd_points"] = statistics.mean(diffs) if diffs else None
        row["vs_kd_seeds"] = len(diffs)
    recipe = load_recipe(ROOT.parent / "recipes" / TIERS[tier]["recipe"])
    return {"command": f"python benchmarks/kd_methods.py --tier {tier}", "environment": environment(torch.get_num_threads()),
            "setting": {"recipe": f"recipes/{TIERS[tier]['recipe']}", "student": recipe.student.model_dump(include={"model", "kwargs"}),
                        "train": recipe.train.model_dump(), "distill": recipe.distill.model_dump(include={"response", "temperature", "alpha"}),
                        "selection": "validation-selected epoch; test split"},
            "methods": table, "runs": results}


def markdown(s: dict) -> str:
    e = s["environment"]
    lines = [f"Distillation methods, `{s['command']}` ({e['cpu']}; torch {e['torch']}, {e['threads']} threads; "
             f"{s['setting']['recipe']}, {s['setting']['train']['epochs']} epochs, T={s['setting']['distill']['temperature']:g}, "
             f"alpha={s['setting']['distill']['alpha']:g})", "",
             "| method | test acc (%), validation-selected epoch | vs KD (points, paired by seed) | test acc (%), last epoch | seeds | s / epoch |",
             "|---|---:|---:|---:|---:|---:|"]
    for m, row in s["methods"].items():
        mean, std = row["test_accuracy_mean_std"]
        vs = "" if row["vs_kd_points"] is None or m == "kd" else f"{row['vs_kd_points']:+.2f}"
        last = "-" if not row.get("last_epoch_test_accuracy_mean_std") else "{:.2f} ± {:.2f}".format(*row["last_epoch_test_accuracy_mean_std"])
        lines.append(f"| {m} | {mean:.2f} ± {std:.2f} | {vs} | {last} | {len(row['seeds'])} | {row['epoch_time_s']:.1f} |")
    better = [m for m, row in s["methods"].items() if m not in ("kd", "scratch") and (row["vs_kd_points"] or 0) > 0]
    lines += ["", f"Methods above plain KD on the mean: {', '.join(better) or 'none'} ({len(better)})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    setup_logging()  # protege's progress and stage messages on stdout, as the CLI shows them
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tier", choices=list(TIERS), default="digits")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "kd_methods")
    ap.add_argument("--summary-only", action="store_true", help="write the table from the finished runs; train nothing")
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = args.out / args.tier
    out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        teacher, second = teacher_files(args.tier, out)
        for seed in args.seeds:
            for m in args.methods:
                run_method(args.tier, m, seed, teacher, second, out)
    # the table holds every finished run (earlier invocations included), never a partial one
    results = {m: [json.loads(f.read_text()) for f in sorted((RESULTS / args.tier).glob(f"{m}_seed*.json"))] for m in METHODS}
    summary = summarise(args.tier, results, args)
    (ROOT / "results").mkdir(exist_ok=True)
    name = f"kd_methods_{args.tier}"
    (ROOT / "results" / f"{name}.json").write_text(json.dumps(summary, indent=2))
    (ROOT / "results" / f"{name}.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
