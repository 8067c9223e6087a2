"""Augmented images without live teacher passes: `distill.teacher_views` on Fashion-MNIST.

    python benchmarks/teacher_views.py                   # speed: 3 epochs in each mode (about 10 minutes on 2 cores)
    python benchmarks/teacher_views.py --accuracy 0      # and accuracy: tuned KD with augmentation and 8 views, seed 0
    python benchmarks/teacher_views.py --quick           # smoke test: 2,000 images

Speed: recipes/fashion_mnist.yaml's student (24k-parameter CNN) and the committed teacher (288k-parameter CNN), 2
threads, three modes run one after another in one process: no augmentation (teacher outputs cached), augmentation with
live teacher passes, and augmentation with the teacher cached on 8 fixed views. Per mode: the median epoch time (and
its ratio to the first mode's), and the time outside epochs (reading the data, building the teacher cache).

Accuracy (``--accuracy SEED ...``): tune_fashion.py's tuned KD recipe (its lr, weight decay, epochs, alpha and T)
with train.augment and 8 views, trained with each seed; its validation accuracy (validation-selected epoch; the test
split is not read) against the same recipe without augmentation, as tune_fashion.py's final runs trained it with the
same seed (benchmarks/results/tune_fashion.json).

Writes benchmarks/results/teacher_views.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege.recipe import load_recipe  # noqa: E402
from protege.stages import distill  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"
VIEWS = 8
MODES = {"no augmentation, teacher cached": [],
         "augmentation, live teacher": ["train.augment=true"],
         f"augmentation, teacher cached on {VIEWS} views": ["train.augment=true", f"distill.teacher_views={VIEWS}"]}


def train(sets: list[str], out: Path) -> dict:
    """One run (no export, no evaluation, test split dropped); its epoch times, wall time and best validation."""
    recipe = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", [f"teacher.weights={TEACHER}", "teacher.train=null", *sets])
    t0 = time.perf_counter()
    distill(recipe, out, overwrite=True, export=False, evaluate_=False, test=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r["epoch_time_s"] for r in rows if r.get("stage") == "student" and "epoch_time_s" in r]
    cfg = json.loads((out / "student" / "config.json").read_text())
    return {"epoch_times_s": epochs, "median_epoch_s": statistics.median(epochs), "wall_s": wall,
            "outside_epochs_s": wall - sum(epochs), "best_epoch": cfg["best_epoch"], "best_val_accuracy": cfg["best_val_accuracy"]}


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accuracy", type=int, nargs="*", default=[], metavar="SEED")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "teacher_views")
    args = ap.parse_args()
    torch.set_num_threads(2)
    limit = ["data.limit=2000"] if args.quick else []
    speed = {}
    for mode, sets in MODES.items():
        print(f"== {mode}", flush=True)
        speed[mode] = train([*sets, *limit, "train.epochs=3"], args.out / f"speed{len(speed)}")
    accuracy = []
    if args.accuracy:
        ref = json.loads((ROOT / "results" / "tune_fashion.json").read_text())
        tuned = [f"{k}={v}" for k, v in ref["distilled"]["params"].items()]
        without = {r["seed"]: r["distilled"]["val_accuracy"] for r in ref["final"]["runs"]}
        for seed in args.accuracy:
            print(f"== tuned KD, augmentation, {VIEWS} views, seed {seed}", flush=True)
            r = train([*tuned, *MODES[f"augmentation, teacher cached on {VIEWS} views"], *limit, f"seed={seed}"],
                      args.out / f"accuracy_seed{seed}")
            accuracy.append({"seed": seed, "val_accuracy": r["best_val_accuracy"], "best_epoch": r["best_epoch"],
                             "without_augmentation_val_accuracy": without.get(seed), "median_epoch_s": r["median_epoch_s"]})
    command = "python benchmarks/teacher_views.py" + (f" --accuracy {' '.join(map(str, args.accuracy))}" if args.accuracy else "")
    result = {"command": command + (" --quick" if args.quick else ""),
              "environment": environment(2), "views": VIEWS, "speed": speed, "accuracy": accuracy}
    if not args.quick:
        (ROOT / "results" / "teacher_views.json").write_text(json.dumps(result, indent=2))
        (ROOT / "results" / "teacher_views.md").write_text(markdown(result))
    print(markdown(result))


def markdown(s: dict) -> str:
    e = s["environment"]
    first = next(iter(s["speed"].values()))["median_epoch_s"]
    lines = [f"Augmentation with a cached teacher, `{s['command']}` ({e['cpu']}, {' '.join(e['cpu_flags'])}; torch {e['torch']}, "
             f"{e['threads']} threads; recipes/fashion_mnist.yaml)", "",
             "| mode | s / epoch (median of 3) | vs no augmentation | time outside epochs (s): data, teacher cache |",
             "|---|---:|---:|---:|"]
    for mode, r in s["speed"].items():
        lines.append(f"| {mode} | {r['median_epoch_s']:.1f} | {r['median_epoch_s'] / first:.2f}x | {r['outside_epochs_s']:.0f} |")
    if s["accuracy"]:
        lines += ["", "| tuned KD recipe, seed | val acc. (%), augmentation + views | val acc. (%), no augmentation (tune_fashion.py) |",
                  "|---|---:|---:|"]
        for a in s["accuracy"]:
            w = a["without_augmentation_val_accuracy"]
            lines.append(f"| {a['seed']} | {100 * a['val_accuracy']:.2f} | {'' if w is None else f'{100 * w:.2f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
