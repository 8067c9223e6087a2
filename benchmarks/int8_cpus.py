"""int8 across CPUs: the portable scheme (7-bit weights) beside full-range int8 (and uint8 weights) on Fashion-MNIST,
for the deployed KD student, the teacher-sized CNN and ResNet-20.

    python benchmarks/int8_cpus.py            # about 15 minutes on 2 cores (plus 8 to train the student if missing)
    python benchmarks/int8_cpus.py --quick    # smoke test: 2,000 training images, 300 test images
    python benchmarks/int8_cpus.py --demo runs/demo   # the demo run's deployed int8 file on the emulated AVX2 CPU

For every file: test accuracy, agreement with the fp32 file's test predictions, bytes, and batch-1 / batch-32 latency
in ONNX Runtime (interleaved rounds, median, 2 threads; protege.evaluate.profile.measure), all side by side in one
run; then how its int8 kernels compare with the exact QDQ arithmetic (protege.compress.verify), on this CPU and on an
emulated AVX2 CPU without VNNI (QEMU's EPYC-Milan model, protege.compress.emulate; the first --emulated test images).
Emulation checks what the kernels compute, never how fast. Writes benchmarks/results/int8_cpus.{json,md}.
`make bench` runs it after benchmarks/compress.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402

from protege.logs import setup as setup_logging  # noqa: E402
from protege import QuantizeConfig, load_recipe  # noqa: E402
from protege.compress import verify as V  # noqa: E402
from protege.compress.emulate import CPUS, available, run_emulated  # noqa: E402
from protege.compress.quantize import _preprocess, _Reader, quantize_static  # noqa: E402
from protege.data import load_data  # noqa: E402
from protege.evaluate.profile import measure, ort_timer  # noqa: E402
from protege.export.onnx import export_model_onnx, ort_logits, ort_session  # noqa: E402
from protege.models import build_model, load_weights, num_params  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"
RESNET = ROOT / "teachers" / "fashion_mnist_resnet20.safetensors"
KD_RUN = ROOT / "runs" / "fashion_mnist" / "full" / "kd_seed0"
THREADS = 2
SCHEMES = {"full range (this_cpu)": "this_cpu", "portable (7-bit)": "portable", "uint8 weights": "u8u8"}


def uint8_weights(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    """Static int8 with uint8 (asymmetric) weights: ONNX Runtime's U8U8 kernels, the other way to avoid saturation."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static as ort_static

    with tempfile.TemporaryDirectory() as td:
        pre = _preprocess(fp32, Path(td) / "pre.onnx")
        ort_static(str(pre), str(out), _Reader("input", calib), quant_format=QuantFormat.QDQ, per_channel=True,
                   activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
    return out


def files_for(name: str, model, data, work: Path) -> dict[str, Path]:
    fp32 = export_model_onnx(model.eval(), data.test.x[:2], work / f"{name}.onnx")
    calib = data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:512]].numpy()
    out = {"fp32": fp32}
    for label, target in SCHEMES.items():
        dst = work / f"{name}.{target}.onnx"
        out[label] = uint8_weights(fp32, dst, calib) if target == "u8u8" else quantize_static(fp32, dst, calib, QuantizeConfig(target=target))
    return out


def rows_for(files: dict[str, Path], data, n_emulated: int, repeats: tuple[int, int]) -> list[dict]:
    x, y = data.test.x, data.test.y
    base = ort_logits(ort_session(files["fp32"], THREADS), x)
    emulated = run_emulated({k: v for k, v in files.items() if k != "fp32"}, x[:n_emulated].numpy()) if available() is None else {}
    timing = {}
    for b, n in zip((1, 32), repeats):
        timing[b] = measure({k: ort_timer(ort_session(p, THREADS), data.input_shape)(b) for k, p in files.items()},
                            rounds=5, total_calls=n, warmup=10, threads=THREADS)
    rows = []
    for label, path in files.items():
        logits = ort_logits(ort_session(path, THREADS), x)
        row = {"file": label, "bytes": path.stat().st_size, "test_accuracy": float((logits.argmax(-1) == y).float().mean()),
               "agreement_fp32": float((logits.argmax(-1) == base.argmax(-1)).float().mean())}
        for b in (1, 32):
            s = timing[b].stats(label)
            row.update({f"latency_ms_b{b}": s["median"], f"latency_ms_b{b}_iqr": s["iqr"], f"latency_b{b}_reliable": s["reliable"]})
            row[f"speedup_b{b}"], row[f"speedup_b{b}_reliable"] = timing[b].ratio("fp32", label)
        if label != "fp32":
            row["scheme"] = V.scheme(path, "static")
            ref = ort_logits(ort_session(V.reference_model(path), THREADS, optimize=False), x).numpy()
            row["this_cpu"] = V.compare(logits.numpy(), ref, base.numpy())
            if label in emulated:
                got = emulated[label]
                row["emulated_avx2"] = {**V.compare(got, ref[:n_emulated], base[:n_emulated].numpy()), "examples": n_emulated,
                                        "agreement_fp32": float((got.argmax(-1) == base[:n_emulated].argmax(-1).numpy()).mean()),
                                        "test_accuracy": float((got.argmax(-1) == y[:n_emulated].numpy()).mean())}
        rows.append(row)
        print(f"  {label:<22} {row['bytes'] / 1024:8.1f} kB  acc {100 * row['test_accuracy']:.2f}%  agree {100 * row['agreement_fp32']:.2f}%"
              + (f"  emulated AVX2 agree {100 * row['emulated_avx2']['agreement_fp32']:.2f}%" if "emulated_avx2" in row else ""), flush=True)
    return rows


def models(recipe, data, quick: bool) -> dict:
    teacher = build_model(recipe.teacher.model_copy(update={"weights": str(TEACHER)}), data.input_shape, data.num_classes)
    resnet = build_model(recipe.teacher.model_copy(update={"model": "resnet20", "kwargs": {}}), data.input_shape, data.num_classes)
    load_weights(resnet, RESNET)
    if not (KD_RUN / "student" / "model.safetensors").is_file():
        from fashion_mnist import run_one

        print(f"training the KD student of benchmarks/fashion_mnist.py (seed 0) into {KD_RUN}", flush=True)
        run_one(load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", ["seed=0", f"teacher.weights={TEACHER}"]), KD_RUN)
    student = build_model(recipe.student, data.input_shape, data.num_classes)
    load_weights(student, KD_RUN / "student" / "model.safetensors")
    return {"student (KD)": student, "teacher CNN": teacher, "ResNet-20": resnet}


def demo(run_dir: Path) -> None:
    """A finished run's student.int8.onnx against its student.onnx on the test split: here and on the emulated AVX2 CPU."""
    from protege import Run

    run = Run.load(run_dir)
    data = load_data(run.recipe.data, run.recipe.seed)
    x, y = data.test.x, data.test.y.numpy()
    fp32 = ort_logits(ort_session(run.onnx_path, THREADS), x).numpy().argmax(-1)
    here = ort_logits(ort_session(run.int8_path, THREADS), x).numpy().argmax(-1)
    emulated = run_emulated({"int8": run.int8_path}, x.numpy())["int8"].argmax(-1)
    out = {"run": str(run_dir), "environment": environment(THREADS), "emulated_cpu": f"QEMU {CPUS['avx2']}", "test_examples": len(y),
           "scheme": V.scheme(run.int8_path, "static"), "fp32_accuracy": float((fp32 == y).mean())}
    for name, pred in (("this_cpu", here), ("emulated_avx2", emulated)):
        out[name] = {"agreement_fp32": float((pred == fp32).mean()), "accuracy": float((pred == y).mean())}
    print(json.dumps(out, indent=2))
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "int8_demo_avx2.json").write_text(json.dumps(out, indent=2))


def main() -> None:
    setup_logging()  # protege's progress and stage messages on stdout, as the CLI shows them
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--emulated", type=int, default=2000, help="test images run on the emulated AVX2 CPU")
    ap.add_argument("--demo", type=Path, help="only check this finished run's int8 file (e.g. runs/demo)")
    args = ap.parse_args()
    if args.demo:
        return demo(args.demo)
    torch.set_num_threads(THREADS)
    recipe = load_recipe(ROOT.parent / "recipes" / "fashion_mnist.yaml", ["data.limit=2000"] if args.quick else [])
    data = load_data(recipe.data, recipe.seed)
    if args.quick:
        data.test.x, data.test.y = data.test.x[:300], data.test.y[:300]
    repeats = (20, 5) if args.quick else (200, 30)
    result = {"command": " ".join(["python benchmarks/int8_cpus.py", *sys.argv[1:]]), "environment": environment(THREADS),
              "emulated_cpu": f"QEMU {CPUS['avx2']} (AVX2, no AVX-512, no VNNI)" if available() is None else available(),
              "models": {}}
    with tempfile.TemporaryDirectory() as td:
        for name, model in models(recipe, data, args.quick).items():
            print(f"{name}: {num_params(model):,} params", flush=True)
            safe = name.split()[0].lower().replace("-", "")
            result["models"][name] = {"params": num_params(model),
                                      "rows": rows_for(files_for(safe, model, data, Path(td)), data, min(args.emulated, len(data.test)), repeats)}
    text = markdown(result)
    if not args.quick:
        (ROOT / "results").mkdir(exist_ok=True)
        (ROOT / "results" / "int8_cpus.json").write_text(json.dumps(result, indent=2))
        (ROOT / "results" / "int8_cpus.md").write_text(text)
    print(text)


def _mark(row: dict, key: str) -> str:
    return "" if row.get(key, True) else "?"


def markdown(r: dict) -> str:
    e = r["environment"]
    lines = [f"int8 across CPUs, `{r['command']}` ({e['cpu']}: {' '.join(e['cpu_flags'])}; {e['int8_kernels']}; torch {e['torch']}, "
             f"onnxruntime {e['onnxruntime']}, {e['threads']} threads). Emulated CPU: {r['emulated_cpu']}.", "",
             "| model | file | weights | size (kB) | test acc (%) | agrees with fp32 (%) | b1 ms | b32 ms | speedup b32 | "
             "this CPU: max diff vs exact QDQ | emulated AVX2: agrees with fp32 (%) | emulated AVX2: predictions changed vs exact QDQ | "
             "emulated AVX2: max diff (x quantization error) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["models"].items():
        for i, row in enumerate(m["rows"]):
            em, here = row.get("emulated_avx2"), row.get("this_cpu")
            cells = [name + (f" ({m['params']:,} params)" if i == 0 else "") if i == 0 else "", row["file"],
                     row["scheme"]["weights"] if "scheme" in row else "fp32", f"{row['bytes'] / 1024:.1f}",
                     f"{100 * row['test_accuracy']:.2f}", f"{100 * row['agreement_fp32']:.2f}",
                     f"{row['latency_ms_b1']:.3f}{_mark(row, 'latency_b1_reliable')}",
                     f"{row['latency_ms_b32']:.3f}{_mark(row, 'latency_b32_reliable')}",
                     f"{row['speedup_b32']:.2f}x{'' if row['speedup_b32_reliable'] else '?'}",
                     f"{here['max_abs_diff']:.3g}" if here else "-",
                     f"{100 * em['agreement_fp32']:.2f}" if em else "-",
                     f"{em['predictions_changed']} of {em['predictions']}" if em else "-",
                     f"{em['max_abs_diff']:.3g} ({em['max_abs_diff'] / em['max_abs_diff_fp32']:.2f}x)" if em else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "speedup b32: fp32 ONNX time / this file's, the median of per-round ratios; '?' marks a figure the "
              "measurement flagged unreliable (spread or a busy machine). Emulated runs check what the int8 kernels compute, "
              "not speed."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
