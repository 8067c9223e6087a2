"""Why did KD on Fashion-MNIST gain little? A validation-only study (the test set is never evaluated).

    python benchmarks/fashion_mnist_sweep.py [--seed 0]

Uses the teacher saved by benchmarks/fashion_mnist.py and varies one setting at a time from the
benchmark's recipe (T=4, alpha=0.3, 20 epochs): temperature, alpha, DKD, and training length for both
KD and scratch. Reports the validation-selected epoch's validation accuracy (6,000 held-out training
images) so a later benchmark run can choose its settings without touching the test set.
Writes benchmarks/results/fashion_mnist_sweep.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege import distill, load_recipe  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"
BENCH_RUNS = ROOT / "runs" / "fashion_mnist" / "full"  # the benchmark's own runs are reused when present
VARIANTS = {  # name -> recipe overrides
    "kd T=4 a=0.3 (benchmark)": [],
    "kd T=2 a=0.3": ["distill.temperature=2"],
    "kd T=8 a=0.3": ["distill.temperature=8"],
    "kd T=4 a=0 (soft labels only)": ["distill.alpha=0.0"],
    "dkd T=4 a=0.3": ["distill.response=dkd"],
    "scratch": ["distill.alpha=1.0"],
    "kd T=4 a=0.3, 40 epochs": ["train.epochs=40"],
    "scratch, 40 epochs": ["distill.alpha=1.0", "train.epochs=40"],
}


def main() -> None:
    setup_logging()  # protege's progress and stage messages on stdout, as the CLI shows them
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only these variant names")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fashion_mnist_sweep")
    args = ap.parse_args()
    if not TEACHER.is_file():
        sys.exit(f"error: {TEACHER} missing; run benchmarks/fashion_mnist.py first (it trains and saves the teacher)")
    torch.set_num_threads(2)
    rows = []
    for i, (name, sets) in enumerate(VARIANTS.items()):
        if args.only and name not in args.only:
            continue
        out = args.out / f"seed{args.seed}_{i}"
        same_as_bench = {"kd T=4 a=0.3 (benchmark)": "kd", "scratch": "scratch"}.get(name)
        if same_as_bench and (BENCH_RUNS / f"{same_as_bench}_seed{args.seed}" / "student" / "model.safetensors").is_file():
            out = BENCH_RUNS / f"{same_as_bench}_seed{args.seed}"
        if not (out / "student" / "model.safetensors").is_file():
            recipe = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml",
                                 [f"seed={args.seed}", f"teacher.weights={TEACHER}", *sets])
            distill(recipe, out, overwrite=True, export=False, evaluate_=False)  # no test-set evaluation
        student = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if m["stage"] == "student"]
        accs = [m["val_accuracy"] for m in student]
        best = accs.index(max(accs))  # the epoch the fit loop selects: first with the highest val accuracy
        rows.append({"variant": name, "overrides": sets, "val_selected": 100 * accs[best],
                     "best_epoch": student[best]["epoch"], "val_last_epoch": 100 * accs[-1]})
    result = {"command": "python benchmarks/fashion_mnist_sweep.py", "seed": args.seed,
              "environment": environment(torch.get_num_threads()), "rows": rows}
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "fashion_mnist_sweep.json").write_text(json.dumps(result, indent=2))
    md = ["Fashion-MNIST validation study, `python benchmarks/fashion_mnist_sweep.py` (seed "
          f"{args.seed}; validation accuracy on 6,000 held-out training images, test set untouched; one seed, "
          "so differences under about 0.4 points are within noise)", "",
          "| variant | val acc, selected epoch (%) | selected epoch | val acc, last epoch (%) |", "|---|---:|---:|---:|"]
    md += [f"| {r['variant']} | {r['val_selected']:.2f} | {r['best_epoch']} | {r['val_last_epoch']:.2f} |" for r in rows]
    (ROOT / "results" / "fashion_mnist_sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
