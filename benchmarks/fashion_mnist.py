"""Fashion-MNIST: teacher vs a <=30k-parameter student trained from scratch and with KD, 3 seeds.

    python benchmarks/fashion_mnist.py            # full run (about an hour or more on 2 cores)
    python benchmarks/fashion_mnist.py --quick    # smoke test: 2,000 images, 1 epoch each

Scratch and KD runs of one seed share the student's initial weights and the data order (the seed
fixes both). Reported accuracy is on the official 10k test set, of the validation-selected epoch.
The teacher is trained once (with augmentation) and saved under benchmarks/teachers/ for reuse by
later benchmarks; delete it or pass --retrain-teacher to train it again. Finished runs are skipped
and interrupted ones resumed, so re-running continues where it stopped.
Writes benchmarks/results/fashion_mnist.{json,md}.
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
from protege import Run, distill, load_recipe  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"


def run_one(recipe, out: Path) -> dict:
    if (out / "report.json").is_file():
        return Run.load(out).report.to_json()  # report.json as a dict
    resume = (out / "recipe.yaml").is_file()
    return distill(recipe, out, resume=resume, overwrite=not resume).report.to_json()


def epoch_times(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_time_s"] for r in rows if r["stage"] == "student"]


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    setup_logging()  # protege's progress and stage messages on stdout, as the CLI shows them
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (does not touch the saved teacher or results)")
    ap.add_argument("--retrain-teacher", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fashion_mnist")
    args = ap.parse_args()
    torch.set_num_threads(2)
    overrides = ["data.limit=2000", "teacher.train.epochs=1", "train.epochs=1"] if args.quick else []
    out = args.out / ("quick" if args.quick else "full")
    teacher_file = out / "teacher.safetensors" if args.quick else TEACHER
    if args.retrain_teacher and teacher_file.is_file():
        teacher_file.unlink()

    results, recipes = {"scratch": [], "kd": []}, {}
    for seed in args.seeds:
        for mode in ("kd", "scratch"):
            sets = overrides + [f"seed={seed}"] + (["distill.alpha=1.0"] if mode == "scratch" else [])
            if teacher_file.is_file():
                sets.append(f"teacher.weights={teacher_file}")
            recipe = recipes[mode] = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", sets)
            run_dir = out / f"{mode}_seed{seed}"
            report = run_one(recipe, run_dir)
            if not teacher_file.is_file():  # the first run trained the teacher: keep it for all others
                teacher_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(run_dir / "teacher" / "model.safetensors", teacher_file)
            results[mode].append({"seed": seed, "report": report, "epoch_time_s": statistics.median(epoch_times(run_dir))})

    summary = summarise(results, recipes["kd"])
    if not args.quick:
        (ROOT / "results").mkdir(exist_ok=True)
        (ROOT / "results" / "fashion_mnist.json").write_text(json.dumps({**summary, "runs": results}, indent=2))
        (ROOT / "results" / "fashion_mnist.md").write_text(markdown(summary))
    print(markdown(summary))


def summarise(results: dict, recipe) -> dict:
    acc = {m: mean_std([100 * r["report"]["student"]["accuracy"] for r in rs]) for m, rs in results.items()}
    first = results["kd"][0]["report"]
    t_time = statistics.median(r["epoch_time_s"] for r in results["kd"])
    s_time = statistics.median(r["epoch_time_s"] for r in results["scratch"])
    return {
        "command": "python benchmarks/fashion_mnist.py",
        "environment": environment(torch.get_num_threads()),
        "setting": {"teacher": recipe.teacher.model_dump(include={"model", "kwargs"}) | {"train": recipe.teacher.train.model_dump()},
                    "student": recipe.student.model_dump(include={"model", "kwargs"}), "train": recipe.train.model_dump(),
                    "distill": recipe.distill.model_dump(), "seeds": [r["seed"] for r in results["kd"]],
                    "selection": "validation-selected epoch (6,000 held-out training images); test = official 10k"},
        "teacher_accuracy": 100 * first["teacher"]["accuracy"],
        "teacher_params": first["teacher"]["params"],
        "student_params": first["student"]["params"],
        "scratch_accuracy_mean_std": acc["scratch"],
        "kd_accuracy_mean_std": acc["kd"],
        "kd_gain_points": acc["kd"][0] - acc["scratch"][0],
        "kd_epoch_time_over_label_only": t_time / s_time,
        "student_onnx_vs_teacher_bytes": first["bytes_ratio"],
        "student_onnx_vs_teacher_latency_b1": first["speedup_b1"],
        "latency_ms": {k: {"b1": first[k]["latency_ms_b1"], "b32": first[k]["latency_ms_b32"]} for k in ("teacher", "student", "student_onnx")},
    }


def markdown(s: dict) -> str:
    e = s["environment"]
    sc, kd = s["scratch_accuracy_mean_std"], s["kd_accuracy_mean_std"]
    d = s["setting"]["distill"]
    return "\n".join([
        f"Fashion-MNIST, `{s['command']}` ({e['cpu']}, {' '.join(e['cpu_flags'])}; torch {e['torch']}, onnxruntime {e['onnxruntime']}, {e['threads']} threads)",
        "",
        "| model | params | test accuracy (%) |",
        "|---|---:|---:|",
        f"| teacher (CNN, augmentation) | {s['teacher_params']:,} | {s['teacher_accuracy']:.2f} |",
        f"| student from scratch | {s['student_params']:,} | {sc[0]:.2f} ± {sc[1]:.2f} |",
        f"| student with KD (T={d['temperature']:g}, alpha={d['alpha']:g}) | {s['student_params']:,} | {kd[0]:.2f} ± {kd[1]:.2f} |",
        "",
        f"KD gain: {s['kd_gain_points']:+.2f} points (mean of {len(s['setting']['seeds'])} seeds, validation-selected epoch, "
        f"{s['setting']['train']['epochs']} epochs, no student augmentation). KD epoch time / label-only epoch time: "
        f"{s['kd_epoch_time_over_label_only']:.2f}x (cached teacher logits). Student ONNX vs teacher PyTorch: "
        f"{s['student_onnx_vs_teacher_bytes']:.1f}x fewer bytes, {s['student_onnx_vs_teacher_latency_b1']:.1f}x lower batch-1 latency.",
        "",
    ])


if __name__ == "__main__":
    main()
