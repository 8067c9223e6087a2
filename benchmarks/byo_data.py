"""Your data and your teacher as they are (issue 16): a scikit-learn pipeline exported by skl2onnx as the teacher of
a CSV with an ID column it never saw, and a pixel-table CSV reshaped into a CNN.

    pip install skl2onnx                      # the exporter (not a protege dependency)
    python benchmarks/byo_data.py             # both cases, 3 seeds each (about 2 minutes on 2 cores)

Case `sklearn`: breast_cancer (569 rows, 30 features) written as a CSV with an `id` column first. The teacher is
Pipeline(StandardScaler, MLPClassifier) fitted on the raw features of protege's own training split (same seed), then
exported with skl2onnx (zipmap off: outputs `label` int64 and `probabilities` float). protege reads the CSV with
`drop: [id]` and `scaling: none` and picks the `probabilities` output itself. Checked: the teacher's test accuracy
in protege's report equals the ONNX file's own accuracy on the same raw test rows (run here with ONNX Runtime), and
the student (an MLP) distils, exports and is measured. For contrast, the file's accuracy on z-scored rows (what
protege fed every CSV teacher before data.scaling existed).

Case `pixels`: scikit-learn's digits written as a 64-pixel-column CSV; `shape: [1, 8, 8]` makes each row an image
for a CNN teacher (trained here) and a CNN student.

Writes benchmarks/results/byo_data.json and .md with the machine's CPU, flags, library versions and threads.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))
from _env import environment  # noqa: E402

import protege  # noqa: E402
from protege.data import load_data  # noqa: E402
from protege.export.onnx import ort_session  # noqa: E402
from protege.recipe import parse_recipe  # noqa: E402

THREADS = 2
EVAL = {"threads": THREADS, "rounds": 3, "warmup": 2, "repeats_b1": 20, "repeats_b32": 5}


def _csv(path: Path, header: list[str], rows) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def sklearn_case(work: Path, seed: int) -> dict:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bc = load_breast_cancer()
    names = [f"f{i}" for i in range(bc.data.shape[1])]
    labels = np.array(["malignant", "benign"])[bc.target]
    csv = _csv(work / "cancer.csv", ["id", *names, "diagnosis"],
               ([90000 + i, *row, lab] for i, (row, lab) in enumerate(zip(bc.data, labels))))
    data_cfg = {"source": "csv", "path": str(csv), "target": "diagnosis", "drop": ["id"], "scaling": "none"}
    recipe = {"name": f"sklearn-{seed}", "seed": seed, "data": data_cfg,
              "teacher": {"model": str(work / "pipeline.onnx")}, "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
              "distill": {"temperature": 2.0, "alpha": 0.5}, "train": {"epochs": 30, "batch_size": 32, "lr": 3e-3},
              "eval": EVAL}
    data = load_data(parse_recipe({**recipe, "teacher": {"model": "mlp", "train": {"epochs": 1}}}).data, seed)
    train_x = np.concatenate([data.train.x.numpy(), data.val.x.numpy()]).astype(np.float64)
    train_y = np.concatenate([data.train.y.numpy(), data.val.y.numpy()])
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed))
    pipe.fit(train_x, train_y)
    onx = to_onnx(pipe, train_x[:1].astype(np.float32), options={id(pipe.steps[-1][1]): {"zipmap": False}})
    (work / "pipeline.onnx").write_bytes(onx.SerializeToString())
    session = ort_session(work / "pipeline.onnx", THREADS)
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    prob = outputs.index("probabilities")
    own = float((session.run(None, {name: data.test.x.numpy()})[prob].argmax(1) == data.test.y.numpy()).mean())
    mean, std = train_x.mean(0), train_x.std(0)
    zscored = ((data.test.x.numpy() - mean) / np.where(std > 0, std, 1)).astype(np.float32)
    on_zscored = float((session.run(None, {name: zscored})[prob].argmax(1) == data.test.y.numpy()).mean())
    run = protege.distill(parse_recipe(recipe), work / f"run{seed}", overwrite=True)
    rep = run.report
    return {"seed": seed, "onnx_outputs": outputs, "file_accuracy_raw": own, "file_accuracy_zscored": on_zscored,
            "report_teacher_accuracy": rep.teacher.accuracy,
            "equal": abs(rep.teacher.accuracy - own) < 1e-6,  # the report's float32 mean; one example is 1/114
            "student_accuracy": rep.student.accuracy, "student_onnx_accuracy": rep.student_onnx.accuracy,
            "student_agreement": rep.student.agreement, "compression_ratio": rep.compression_ratio,
            "speedup_b1": rep.speedup_b1, "speedup_b1_reliable": rep.speedup_b1_reliable, "data": rep.data}


def pixels_case(work: Path, seed: int) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    csv = _csv(work / "pixels.csv", [*(f"p{i}" for i in range(64)), "digit"],
               ([*row.astype(int), t] for row, t in zip(d.data, d.target)))
    recipe = {"name": f"pixels-{seed}", "seed": seed,
              "data": {"source": "csv", "path": str(csv), "target": "digit", "shape": [1, 8, 8], "scaling": "minmax"},
              "teacher": {"model": "cnn", "kwargs": {"channels": [32, 64], "depth": 1}, "train": {"epochs": 15}},
              "student": {"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1}},
              "train": {"epochs": 20}, "eval": EVAL}
    rep = protege.distill(parse_recipe(recipe), work / f"pix{seed}", overwrite=True).report
    return {"seed": seed, "input_shape": [1, 8, 8], "teacher_accuracy": rep.teacher.accuracy,
            "student_accuracy": rep.student.accuracy, "student_onnx_accuracy": rep.student_onnx.accuracy,
            "compression_ratio": rep.compression_ratio, "data": rep.data}


def hf_vit_case(work: Path, seed: int) -> dict:
    """A small ViT (a Hugging Face folder written here, random weights) trained here on Fashion-MNIST as the teacher of
    a zoo CNN student, with static int8 at the end: the whole path with a transformers image model."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=128, num_labels=10)
    ViTForImageClassification(cfg).save_pretrained(work / "vit")
    recipe = {"name": f"hf-vit-{seed}", "seed": seed, "data": {"source": "fashion_mnist"},
              "teacher": {"model": str(work / "vit"), "train": {"epochs": 6, "batch_size": 128, "lr": 1e-3}},
              "student": {"model": "cnn", "kwargs": {"channels": [16, 32, 64], "depth": 1}},
              "distill": {"temperature": 4.0, "alpha": 0.3}, "train": {"epochs": 8, "batch_size": 128, "lr": 0.01},
              "quantize": {"mode": "static"}, "eval": EVAL}
    rep = protege.distill(parse_recipe(recipe), work / f"vit{seed}", overwrite=True).report
    stages = {s.name: s for s in rep.stages}
    int8 = stages.get("int8 (static)")
    return {"seed": seed, "teacher_params": rep.teacher.params, "teacher_accuracy": rep.teacher.accuracy,
            "student_params": rep.student.params, "student_accuracy": rep.student.accuracy,
            "int8_accuracy": int8.accuracy if int8 else None, "int8_bytes": int8.bytes if int8 else None,
            "deployed": rep.deployed, "compression_ratio": rep.compression_ratio, "speedup_b1": rep.speedup_b1,
            "speedup_b1_reliable": rep.speedup_b1_reliable}


def _summary(rows: list[dict], key: str) -> str:
    vals = [100 * r[key] for r in rows]
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "results" / "byo_data.json"))
    ap.add_argument("--vit", action="store_true", help="the Fashion-MNIST ViT teacher case instead (about 20 minutes, "
                    "one seed); writes byo_data_vit.json / .md")
    args = ap.parse_args()
    if args.vit:
        return vit_main(args.seeds[:1], Path(args.out).with_name("byo_data_vit.json"))
    with tempfile.TemporaryDirectory(prefix="protege-byo-") as tmp:
        work = Path(tmp)
        result = {"command": "python benchmarks/byo_data.py", "environment": environment(THREADS),
                  "sklearn": [sklearn_case(work, s) for s in args.seeds], "pixels": [pixels_case(work, s) for s in args.seeds]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    sk, px, env = result["sklearn"], result["pixels"], result["environment"]
    md = [f"# Your data, your teacher (`{result['command']}`)", "",
          f"{env['cpu']} ({' '.join(env['cpu_flags'])}), torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
          f"{env['threads']} threads; seeds {args.seeds}; mean ± std over seeds, test accuracy %.", "",
          "| case | teacher in the report | the file itself, raw rows | the file on z-scored rows | student | student ONNX |",
          "|---|---|---|---|---|---|",
          f"| skl2onnx pipeline, CSV with an id column | {_summary(sk, 'report_teacher_accuracy')} | "
          f"{_summary(sk, 'file_accuracy_raw')} | {_summary(sk, 'file_accuracy_zscored')} | "
          f"{_summary(sk, 'student_accuracy')} | {_summary(sk, 'student_onnx_accuracy')} |",
          f"| digits as a 64-column pixel CSV, shape [1, 8, 8], CNN | {_summary(px, 'teacher_accuracy')} | - | - | "
          f"{_summary(px, 'student_accuracy')} | {_summary(px, 'student_onnx_accuracy')} |", "",
          f"Report teacher accuracy equal to the file's own (within float32 rounding, 1e-6) on every seed: "
          f"{all(r['equal'] for r in sk)}. "
          f"ONNX outputs of the pipeline: {', '.join(sk[0]['onnx_outputs'])} (protege read `probabilities`)."]
    Path(args.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def vit_main(seeds: list[int], out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="protege-byo-") as tmp:
        rows = [hf_vit_case(Path(tmp), s) for s in seeds]
    env = environment(THREADS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/byo_data.py --vit", "environment": env, "hf_vit": rows}, indent=2))
    r = rows[0]
    md = ["# A Hugging Face ViT teacher on Fashion-MNIST (`python benchmarks/byo_data.py --vit`)", "",
          f"{env['cpu']} ({' '.join(env['cpu_flags'])}), torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
          f"{env['threads']} threads; one seed ({r['seed']}): a run, not an accuracy claim.", "",
          "| model | params | test accuracy % |", "|---|---|---|",
          f"| ViT teacher (4 layers, width 64, trained here 6 epochs) | {r['teacher_params']:,} | {100 * r['teacher_accuracy']:.2f} |",
          f"| CNN student (8 epochs) | {r['student_params']:,} | {100 * r['student_accuracy']:.2f} |",
          f"| its static int8 ONNX file ({r['int8_bytes'] / 1024:.1f} kB) | - | {100 * r['int8_accuracy']:.2f} |", "",
          f"Deployed: {r['deployed']}; compression {r['compression_ratio']:.1f}x params; batch-1 speedup over the teacher "
          f"{r['speedup_b1']:.1f}x{'' if r['speedup_b1_reliable'] else ' (marked unreliable: the machine was busy)'}."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
