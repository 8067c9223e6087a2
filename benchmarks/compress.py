"""Compression on Fashion-MNIST: int8 and structured pruning of the teacher-sized CNN (and ResNet-20),
QAT+KD vs post-training int8, prune-then-distill vs a zoo student, and the deployed student.

    python benchmarks/compress.py --resnet-epochs 20   # about 1.5 hours on 2 cores; without the flag ResNet-20 is skipped
    python benchmarks/compress.py --quick     # smoke test on 2,000 images, 1 epoch each

Every latency is the median (p50) of repeated ONNX Runtime runs after warm-up, with 2 threads. All of them are
measured at the end, after all training, in three interleaved rounds (median of the rounds), so the ratios are
side by side and a busy phase earlier in the run cannot skew them: keep the machine otherwise idle for the last
few minutes (the log says "measuring latency"). Accuracy is on the official 10k test set;
anything chosen (the auto quantization mode, the recovered epoch) is chosen on the validation split.
Writes benchmarks/results/compress.{json,md}. The portable (7-bit) and full-range int8 schemes side by side, with
their agreement on an emulated AVX2 CPU, are benchmarks/int8_cpus.py (`make bench` runs it after this script).

The CNN teacher is benchmarks/teachers/fashion_mnist_cnn.safetensors (from benchmarks/fashion_mnist.py). The KD
student is that benchmark's seed-0 run, benchmarks/runs/fashion_mnist/full/kd_seed0; when it is missing it is
trained here the same way (about 8 minutes).

ResNet-20 (--resnet-epochs N > 0): the saved teacher benchmarks/teachers/fashion_mnist_resnet20.safetensors is
used when present. It was trained (20 epochs, crop + flip augmentation, the CNN teacher's optimiser) with
    protege distill recipes/fashion_mnist.yaml --out benchmarks/runs/resnet20_teacher --set teacher.model=resnet20 \
        --set 'teacher.kwargs={}' --set teacher.train.epochs=20 --set train.epochs=1
and copied from benchmarks/runs/resnet20_teacher/teacher/model.safetensors; without the file, this script trains
one for N epochs without augmentation.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402
from fashion_mnist import run_one  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege import PruneConfig, QuantizeConfig, load_recipe  # noqa: E402
from protege.compress.prune import prune_  # noqa: E402
from protege.compress.qat import qat_to_onnx  # noqa: E402
from protege.compress.quantize import choose, quantize_dynamic, quantize_static  # noqa: E402
from protege.stages.quantize import measure  # noqa: E402
from protege.data import load_data  # noqa: E402
from protege.evaluate.profile import ort_latency, torch_latency  # noqa: E402
from protege.export.onnx import export_model_onnx, onnx_parity, ort_logits, ort_session  # noqa: E402
from protege.knowledge import Teacher, predict_logits  # noqa: E402
from protege.models import build_model, load_weights, num_params  # noqa: E402
from protege.recipe import TrainConfig  # noqa: E402
from protege.train import Distiller, fit  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"
RESNET = ROOT / "teachers" / "fashion_mnist_resnet20.safetensors"
KD_RUN = ROOT / "runs" / "fashion_mnist" / "full" / "kd_seed0"
THREADS = 2


def test_acc(path: Path, data) -> float:
    return float((ort_logits(ort_session(path, THREADS), data.test.x).argmax(-1) == data.test.y).float().mean())


PENDING: list[tuple[dict, Path]] = []  # rows whose latency is measured at the end, all together


def onnx_row(name: str, path: Path, data, repeats=None) -> dict:
    """Size and test accuracy now; latency later, in measure_latencies()."""
    row = {"name": name, "file": path.name, "bytes": path.stat().st_size, "test_accuracy": test_acc(path, data)}
    print(f"  {name:<34} {row['bytes'] / 1024:8.1f} kB  acc {100 * row['test_accuracy']:.2f}%", flush=True)
    PENDING.append((row, path))
    return row


def measure_latencies(shape, repeats: tuple[int, int], rounds: int = 3) -> None:
    """Every file's p50 latency, measured in one block at the end in interleaved rounds (file A, B, C, A, B, C, ...);
    each row gets the median of its rounds. Training phases cannot disturb these numbers, and all files
    see the same machine conditions, so the ratios between them are side by side."""
    print(f"measuring latency of {len(PENDING)} files ({rounds} interleaved rounds)...", flush=True)
    for b, n in zip((1, 32), repeats):
        seen: dict[int, list[float]] = {id(row): [] for row, _ in PENDING}
        for _ in range(rounds):
            for row, path in PENDING:
                seen[id(row)].append(ort_latency(path, shape, b, THREADS, 10, n)["p50"])
        for row, _ in PENDING:
            row[f"latency_ms_b{b}"] = statistics.median(seen[id(row)])
    for row, _ in PENDING:
        print(f"  {row['name']:<34} b1 {row['latency_ms_b1']:.3f} ms  b32 {row['latency_ms_b32']:.3f} ms", flush=True)


def add_ratios(out: dict) -> dict:
    fp32, static, after, before = out["fp32"], out["static_int8"], out["pruned_recovered"], out["pruned_no_recovery"]
    out.update(static_smaller=fp32["bytes"] / static["bytes"], static_speedup_b32=fp32["latency_ms_b32"] / static["latency_ms_b32"],
               static_speedup_b1=fp32["latency_ms_b1"] / static["latency_ms_b1"],
               static_drop_points=100 * (fp32["test_accuracy"] - static["test_accuracy"]),
               pruned_speedup_b32=fp32["latency_ms_b32"] / after["latency_ms_b32"],
               pruned_drop_points=100 * (fp32["test_accuracy"] - after["test_accuracy"]),
               pruned_drop_points_no_recovery=100 * (fp32["test_accuracy"] - before["test_accuracy"]))
    return out


def export(model, data, path: Path) -> Path:
    export_model_onnx(model.eval(), data.test.x[:2], path)
    onnx_parity(model, path, data.test.x[:512], 1e-4)
    return path


def kd_loss(teacher_model, data, cfg) -> Distiller:
    """KD from ``teacher_model`` with its logits cached once for the training set (the recipe's T and alpha)."""
    cache = predict_logits(teacher_model.eval(), data.train.x)
    return Distiller(Teacher(teacher_model, cache), cfg)


def train(model, loss, data, epochs: int, lr: float, work: Path, stage: str, seed: int = 0):
    from accelerate import Accelerator

    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    res = fit(model, loss, data.train, data.val, cfg, seed=seed, ckpt_dir=work / stage, metrics_path=work / "metrics.jsonl",
              stage=stage, accelerator=Accelerator(cpu=True))
    return {"epochs": epochs, "lr": lr, "best_epoch": res.best_epoch, "best_val_accuracy": res.best_val_accuracy,
            "seconds": time.perf_counter() - t0}


def int8_and_pruning(name: str, model, data, recipe, work: Path, args) -> dict:
    """fp32 ONNX vs static int8 vs QAT+KD int8, and 50% structured channel pruning with / without KD recovery."""
    print(f"{name}: {num_params(model):,} params", flush=True)
    out: dict = {"params": num_params(model)}
    calib = data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:512]].numpy()
    fp32 = onnx_row("fp32", export(model, data, work / f"{name}.onnx"), data)
    static = onnx_row("static int8 (QDQ, per-channel, minmax)",
                      quantize_static(work / f"{name}.onnx", work / f"{name}.static.onnx", calib, QuantizeConfig()), data)
    out.update(fp32=fp32, static_int8=static)
    if args.qat_epochs:
        info = qat_to_onnx(model, kd_loss(model, data, recipe.distill), data.train, data.val, work / f"{name}.qat.onnx",
                           epochs=args.qat_epochs, lr=recipe.train.lr / 10, batch_size=128, seed=0)
        out["qat_int8"] = onnx_row(f"QAT+KD int8 ({args.qat_epochs} epochs, self-teacher)", work / f"{name}.qat.onnx", data)
        out["qat_int8"].update(info)
    pruned = copy.deepcopy(model).eval().requires_grad_(True)
    res = prune_(pruned, PruneConfig(ratio=0.5), data.train.x[:2])
    before = onnx_row(f"pruned 50% channels ({res.params_after:,} params), no recovery", export(pruned, data, work / f"{name}.p50.onnx"), data)
    rec = train(pruned, kd_loss(model, data, recipe.distill), data, args.recovery_epochs, recipe.train.lr / 5, work, f"{name}_recover")
    after = onnx_row(f"pruned 50% + KD recovery ({args.recovery_epochs} ep)", export(pruned, data, work / f"{name}.p50r.onnx"), data)
    after["recovery"] = rec
    out.update(pruned_params=res.params_after, pruned_no_recovery=before, pruned_recovered=after)
    return out


def main() -> None:
    setup_logging()  # protege's progress and stage messages on stdout, as the CLI shows them
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--recovery-epochs", type=int, default=10)
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--minitron-epochs", type=int, default=15)
    ap.add_argument("--resnet-epochs", type=int, default=0, help="train a ResNet-20 teacher this many epochs (0: skip it)")
    args = ap.parse_args()
    args.repeats = (20, 5) if args.quick else (200, 30)
    torch.set_num_threads(THREADS)
    sets = ["data.limit=2000"] if args.quick else []
    recipe = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", sets)
    if args.quick:
        args.recovery_epochs = args.qat_epochs = args.minitron_epochs = 1
    if not TEACHER.is_file():
        sys.exit(f"run `python benchmarks/fashion_mnist.py` first: it trains the teacher {TEACHER}")
    if not (KD_RUN / "student" / "model.safetensors").is_file():
        print(f"training the KD student of benchmarks/fashion_mnist.py (seed 0) into {KD_RUN}", flush=True)
        run_one(load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", ["seed=0", f"teacher.weights={TEACHER}"]), KD_RUN)
    data = load_data(recipe.data, recipe.seed)
    teacher = build_model(recipe.teacher.model_copy(update={"weights": str(TEACHER)}), data.input_shape, data.num_classes).eval()
    student = build_model(recipe.student, data.input_shape, data.num_classes)
    load_weights(student, KD_RUN / "student" / "model.safetensors")
    result: dict = {"command": " ".join(["python benchmarks/compress.py", *sys.argv[1:]]),
                    "environment": environment(THREADS), "args": {k: v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        result["teacher_cnn"] = int8_and_pruning("teacher_cnn", teacher, data, recipe, work, args)
        if args.resnet_epochs:
            resnet = build_model(recipe.teacher.model_copy(update={"model": "resnet20", "kwargs": {}}), data.input_shape, data.num_classes)
            if RESNET.is_file() and not args.quick:
                load_weights(resnet, RESNET)
            else:
                from protege.train import label_loss
                result["resnet20_training"] = train(resnet, label_loss(), data, args.resnet_epochs, 3e-3, work, "resnet20")
                if not args.quick:
                    from protege.models import save_weights
                    save_weights(resnet, RESNET)
            result["resnet20"] = int8_and_pruning("resnet20", resnet.eval(), data, recipe, work, args)

        print("student (KD, seed 0, from benchmarks/fashion_mnist.py):", flush=True)
        s_fp32 = export(student, data, work / "student.onnx")
        calib = data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:512]].numpy()
        quantize_static(s_fp32, work / "student.static.onnx", calib, QuantizeConfig())
        quantize_dynamic(s_fp32, work / "student.dynamic.onnx", QuantizeConfig())
        qat_info = qat_to_onnx(student, kd_loss(teacher, data, recipe.distill), data.train, data.val, work / "student.qat.onnx",
                               epochs=args.qat_epochs, lr=recipe.train.lr / 10, batch_size=128, seed=0)
        modes = ("fp32", "static", "dynamic", "qat")
        rows = {m: onnx_row(f"student {m}", work / f"student.{m}.onnx" if m != "fp32" else s_fp32, data) for m in modes}

        print("prune-then-distill (teacher pruned to the student's size, then KD) vs the zoo student with KD:", flush=True)
        minitron = copy.deepcopy(teacher).requires_grad_(True)
        res = prune_(minitron, PruneConfig(target_params=num_params(student)), data.train.x[:2])
        m_rec = train(minitron, kd_loss(teacher, data, recipe.distill), data, args.minitron_epochs, recipe.train.lr, work, "minitron")
        m_row = onnx_row(f"pruned teacher ({res.params_after:,} params) + KD {args.minitron_epochs} ep",
                         export(minitron, data, work / "minitron.onnx"), data)
        result["prune_then_distill"] = {"params": res.params_after, "row": m_row, "training": m_rec,
                                        "zoo_student_kd": {"params": num_params(student), "test_accuracy": rows["fp32"]["test_accuracy"],
                                                           "epochs": recipe.train.epochs}}
        baseline = build_model(recipe.student.model_copy(update={"kwargs": {"channels": [16, 32, 64], "depth": 1}}), data.input_shape, data.num_classes)
        b_row = onnx_row("baseline: plain 3-block 16/32/64 CNN, fp32 ONNX", export(baseline, data, work / "baseline.onnx"), data)

        # Every timing from here on, with nothing else running in this process: auto's measured choice, then all files.
        print("auto quantization of the student (measured on the validation split):", flush=True)
        ref = ort_logits(ort_session(s_fp32, THREADS), data.val.x).argmax(-1)
        cands = {m: measure(work / f"student.{m}.onnx" if m != "fp32" else s_fp32, data, THREADS, 10, (100, 30),
                            None if m == "fp32" else ref) for m in modes}
        choices = {b: choose(cands, QuantizeConfig(mode="auto", latency_batch=b)) for b in (1, 32)}
        result["student"] = {"params": num_params(student), "rows": rows, "validation_candidates": cands, "qat": qat_info,
                             "auto_choice": {f"b{b}": {"chosen": c, "reason": r} for b, (c, r) in choices.items()}}
        measure_latencies(data.input_shape, args.repeats)
        for key in ("teacher_cnn", "resnet20"):
            if key in result:
                add_ratios(result[key])
        t_b1 = statistics.median(torch_latency(teacher, data.input_shape, 1, THREADS, 10, args.repeats[0])["p50"] for _ in range(3))
        deployed_name = choices[1][0]
        dep = rows[deployed_name]
        result["deployed"] = {"choice": deployed_name, "row": dep, "baseline_fp32_onnx": b_row,
                              "teacher_pytorch": {"bytes": TEACHER.stat().st_size, "latency_ms_b1": t_b1},
                              "bytes_vs_teacher": TEACHER.stat().st_size / dep["bytes"],
                              "latency_b1_vs_teacher": t_b1 / dep["latency_ms_b1"],
                              "latency_b1_vs_baseline": b_row["latency_ms_b1"] / dep["latency_ms_b1"]}
    if not args.quick:
        (ROOT / "results").mkdir(exist_ok=True)
        (ROOT / "results" / "compress.json").write_text(json.dumps(result, indent=2))
        (ROOT / "results" / "compress.md").write_text(markdown(result))
    print(markdown(result))


def _r(row: dict) -> str:
    return (f"{row['bytes'] / 1024:.1f} kB | {100 * row['test_accuracy']:.2f} | {row['latency_ms_b1']:.3f} | {row['latency_ms_b32']:.3f}")


def markdown(r: dict) -> str:
    e = r["environment"]
    lines = [f"Compression on Fashion-MNIST, `{r['command']}` ({e['cpu']}, {' '.join(e['cpu_flags'])}; torch {e['torch']}, "
             f"onnxruntime {e['onnxruntime']}, {e['threads']} threads; ONNX Runtime p50 latency in ms)", "",
             "| model | variant | size | test acc (%) | b1 ms | b32 ms |", "|---|---|---:|---:|---:|---:|"]
    for key in ("teacher_cnn", "resnet20"):
        m = r.get(key)
        if not m:
            continue
        lines.append(f"| {key} ({m['params']:,} params) | fp32 | {_r(m['fp32'])} |")
        lines.append(f"| | static int8 | {_r(m['static_int8'])} |")
        if "qat_int8" in m:
            lines.append(f"| | QAT+KD int8 | {_r(m['qat_int8'])} |")
        lines.append(f"| | 50% channels pruned ({m['pruned_params']:,} params), no recovery | {_r(m['pruned_no_recovery'])} |")
        lines.append(f"| | 50% channels pruned + KD recovery | {_r(m['pruned_recovered'])} |")
    s = r["student"]
    for name, row in s["rows"].items():
        lines.append(f"| student, KD ({s['params']:,} params) | {name} | {_r(row)} |")
    p = r["prune_then_distill"]
    lines.append(f"| teacher pruned to {p['params']:,} params + KD | fp32 | {_r(p['row'])} |")
    d = r["deployed"]
    lines.append(f"| baseline 16/32/64 CNN (untrained weights; latency only) | fp32 | {d['baseline_fp32_onnx']['bytes'] / 1024:.1f} kB | - | "
                 f"{d['baseline_fp32_onnx']['latency_ms_b1']:.3f} | {d['baseline_fp32_onnx']['latency_ms_b32']:.3f} |")
    lines.append("")
    for key in ("teacher_cnn", "resnet20"):
        m = r.get(key)
        if m:
            lines.append(f"- {key}: static int8 is {m['static_smaller']:.2f}x smaller and {m['static_speedup_b32']:.2f}x faster at batch 32 "
                         f"({m['static_speedup_b1']:.2f}x at batch 1) than fp32 ONNX, {m['static_drop_points']:+.2f} points accuracy drop; "
                         f"50% structured pruning is {m['pruned_speedup_b32']:.2f}x faster at batch 32, "
                         f"{m['pruned_drop_points_no_recovery']:+.2f} points drop without recovery, {m['pruned_drop_points']:+.2f} after KD recovery.")
    lines.append(f"- auto quantization of the student (chosen on the validation split): batch 1 -> {s['auto_choice']['b1']['chosen']} "
                 f"({s['auto_choice']['b1']['reason']}); batch 32 -> {s['auto_choice']['b32']['chosen']}.")
    lines.append(f"- prune-then-distill: {100 * p['row']['test_accuracy']:.2f}% at {p['params']:,} params ({p['training']['epochs']} KD epochs) vs the "
                 f"zoo student with KD {100 * p['zoo_student_kd']['test_accuracy']:.2f}% at {p['zoo_student_kd']['params']:,} params "
                 f"({p['zoo_student_kd']['epochs']} epochs).")
    lines.append(f"- deployed student ({d['choice']}): {100 * d['row']['test_accuracy']:.2f}%, {d['row']['bytes'] / 1024:.1f} kB, "
                 f"batch-1 latency {d['latency_b1_vs_baseline']:.2f}x the baseline's speed; vs the teacher in PyTorch fp32: "
                 f"{d['bytes_vs_teacher']:.1f}x fewer bytes, {d['latency_b1_vs_teacher']:.1f}x lower batch-1 latency.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
