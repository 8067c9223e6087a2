"""Compression to a budget on Fashion-MNIST: `protege compress RUN --max-latency-ms X --max-bytes N` on the teacher-sized
CNN (288k parameters), measured on this machine's CPU.

    python benchmarks/budget.py            # about 15 minutes on 2 cores; keep the machine otherwise idle
    python benchmarks/budget.py --quick    # smoke test: 2,000 images, 1 recovery epoch

The run's student is the committed teacher itself (benchmarks/teachers/fashion_mnist_cnn.safetensors, its weights
copied into a run folder as the student; the teacher is the same file), so the search compresses the teacher-sized
CNN, recovering each pruned candidate by distillation from the uncompressed one. The search is run once with no
binding limit (every candidate measured), then with the budgets below, stated relative to the uncompressed fp32 file
as measured here: half its batch-1 latency; then half its latency and a fifth of its size. Each budget reuses the
candidates and measures every file again side by side. Writes benchmarks/results/budget.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402

from protege.compress.budget import BudgetConfig  # noqa: E402
from protege.errors import CompressError  # noqa: E402
from protege.logs import setup as setup_logging  # noqa: E402
from protege.models import build_model, load_weights, save_weights  # noqa: E402
from protege.recipe import load_recipe  # noqa: E402
from protege.run import Run  # noqa: E402
from protege.stages.budget import compress_to_budget  # noqa: E402
from protege.stages.tasks import load_run_data  # noqa: E402
from protege.stages.teacher import model_config, write_config  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"


def make_run(out: Path, quick: bool) -> Run:
    """A run folder whose student is the teacher-sized CNN with the teacher's weights."""
    r = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml",
                    [f"teacher.weights={TEACHER}", "teacher.train=null", "student.kwargs={channels: [32, 64, 128], depth: 2, dropout: 0.2}",
                     *(["data.limit=2000"] if quick else [])])
    if out.exists():
        shutil.rmtree(out)
    run = Run(out, r)
    run.write_recipe()
    data = load_run_data(r)
    student = build_model(r.student, data.input_shape, data.num_classes, data.model_args)
    load_weights(student, TEACHER)
    save_weights(student, run.student_weights)
    write_config(out / "student" / "config.json", model_config(r.student, data, student, None))
    return run


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "budget")
    args = ap.parse_args()
    torch.set_num_threads(2)
    run = make_run(args.out / ("quick" if args.quick else "full") / "teacher_cnn", args.quick)
    prune = {"finetune_epochs": 1 if args.quick else 2}
    everything = compress_to_budget(run.path, BudgetConfig(max_bytes=10**12), prune=prune)
    base = everything["candidates"]["unpruned/fp32"]
    budgets = {"half the latency": BudgetConfig(max_latency_ms=base["latency_ms_b1"] / 2),
               "half the latency, a fifth of the bytes": BudgetConfig(max_latency_ms=base["latency_ms_b1"] / 2,
                                                                      max_bytes=base["bytes"] // 5)}
    results = {}
    for name, b in budgets.items():
        try:
            results[name] = compress_to_budget(run.path, b, prune=prune)
        except CompressError as e:
            results[name] = {"budget": b.model_dump(), "budget_text": b.describe(), "chosen": None, "error": str(e),
                             **json.loads((run.path / "budget" / "failed.json").read_text())}
    out = {"command": "python benchmarks/budget.py" + (" --quick" if args.quick else ""), "environment": environment(2),
           "unbounded": everything, "budgets": results}
    if not args.quick:
        (ROOT / "results").mkdir(exist_ok=True)
        (ROOT / "results" / "budget.json").write_text(json.dumps(out, indent=2))
        (ROOT / "results" / "budget.md").write_text(markdown(out))
    print(markdown(out))


def markdown(s: dict) -> str:
    e, u = s["environment"], s["unbounded"]
    base = u["candidates"]["unpruned/fp32"]
    lines = [f"Compression to a budget, teacher-sized CNN on Fashion-MNIST, `{s['command']}` ({e['cpu']}, "
             f"{' '.join(e['cpu_flags'])}; torch {e['torch']}, onnxruntime {e['onnxruntime']}, {e['threads']} threads; "
             f"p50 batch-1 latency, every file measured side by side in the last measurement)", "",
             "| candidate | val acc. (%) | test acc. (%) | b1 ms | bytes | Pareto front |", "|---|---:|---:|---:|---:|---|"]
    last = list(s["budgets"].values())[-1]
    for n, c in last["candidates"].items():
        lines.append(f"| {n} | {100 * c['val_accuracy']:.2f} | {100 * c['test_accuracy']:.2f} | {c['latency_ms_b1']:.3f} | "
                     f"{c['bytes']:,} | {'yes' if n in last['pareto_front'] else ''} |")
    lines.append("")
    for name, r in s["budgets"].items():
        if r["chosen"] is None:
            lines.append(f"- budget {name} ({r['budget_text']}): not met; {r['error']}")
            continue
        c = r["candidates"][r["chosen"]]
        lines.append(f"- budget {name} ({r['budget_text']}): met by **{r['chosen']}**, test {100 * c['test_accuracy']:.2f} % "
                     f"(validation {100 * c['val_accuracy']:.2f} %), {c['latency_ms_b1']:.3f} ms at batch 1, {c['bytes']:,} bytes; "
                     f"the uncompressed file: test {100 * base['test_accuracy']:.2f} %, {base['bytes']:,} bytes.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
