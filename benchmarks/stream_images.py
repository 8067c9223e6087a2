"""Fashion-MNIST as 70,000 PNG files (issue 16): the `images` source, streamed from its memory-mapped uint8 cache,
against the built-in in-memory source, with the same teacher and student.

    python benchmarks/stream_images.py          # about 25 minutes on 2 cores

The script writes the 60,000 training and 10,000 test images of the Debian package dataset-fashion-mnist as PNG files
in one folder per class, plus a manifest listing the first 10,000 of them. Every run below is a separate process
(so its peak memory is its own), distilling the 24k-parameter CNN student of recipes/fashion_mnist.yaml (T=4,
alpha=0.3, for EPOCHS epochs instead of 40) from the committed teacher benchmarks/teachers/fashion_mnist_cnn.safetensors
(cached logits). The images source reads x / 255 (`scaling: none`) and each model normalises its own input with the
teacher's training mean and std (`normalize`), which is the arithmetic of the built-in source; `classes` lists the
class folders in the order of the teacher's outputs (the folders sort otherwise alphabetically).

- accuracy: test accuracy of the validation-selected student, seeds 0-2, images (streamed) vs built-in. The built-in
  source tests on the official 10k test images; the images source on its own stratified 20% split of all 70k.
- epoch time: the median student epoch after the first, side by side from the same runs, and one images run held in
  memory (`stream: false`) and one streamed with one loader worker process (`workers: 1`), seed 0.
- memory: peak RSS of the main process (and of its loader workers) for 10k files (the manifest) and 70k files,
  streamed and in memory, each training one epoch; the first streamed run of each also decodes the files.

Writes benchmarks/results/stream_images.json and .md with the machine's CPU, flags, library versions and threads.
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "src"))
from _env import environment  # noqa: E402

THREADS = 2
EPOCHS = 8
FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
NORMALIZE = {"mean": [0.2860], "std": [0.3530]}  # the built-in source's constants (protege.data.loaders)


def _idx(name: str) -> np.ndarray:
    raw = gzip.open(FASHION / name, "rb").read()
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(raw[3])]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(dims)


def write_pngs(root: Path) -> tuple[Path, float]:
    """All 70k images as PNGs in class folders, and a manifest of the first 10k; the seconds it took."""
    from PIL import Image

    t0 = time.perf_counter()
    x = np.concatenate([_idx("train-images-idx3-ubyte.gz"), _idx("t10k-images-idx3-ubyte.gz")])
    y = np.concatenate([_idx("train-labels-idx1-ubyte.gz"), _idx("t10k-labels-idx1-ubyte.gz")])
    rows = []
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(x, y)):
        rel = f"{CLASSES[label]}/{i:05d}.png"
        Image.fromarray(img, "L").save(root / rel)
        rows.append(f"{rel},{CLASSES[label]}")
    (root / "first10k.csv").write_text("path,label\n" + "\n".join(rows[:10_000]) + "\n")
    return root, time.perf_counter() - t0


def recipe(data: dict, seed: int, epochs: int = EPOCHS) -> dict:
    images = data["source"] == "images"
    norm = {"normalize": NORMALIZE} if images else {}
    return {"name": "stream", "seed": seed, "data": data,
            "teacher": {"model": "cnn", "kwargs": {"channels": [32, 64, 128], "depth": 2, "dropout": 0.2},
                        "weights": str(ROOT / "teachers" / "fashion_mnist_cnn.safetensors"), **norm},
            "student": {"model": "cnn", "kwargs": {"channels": [16, 32, 64], "depth": 1}, **norm},
            "distill": {"response": "kl", "temperature": 4.0, "alpha": 0.3},
            "train": {"epochs": epochs, "batch_size": 128, "lr": 0.005, "weight_decay": 0.0001},
            "eval": {"threads": THREADS, "rounds": 1, "warmup": 1, "repeats_b1": 5, "repeats_b32": 2}}


def one(spec: dict) -> dict:
    """Run one recipe in this process; what it measured, with this process's peak RSS (and its workers')."""
    import torch

    import protege
    from protege.recipe import parse_recipe

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    run = protege.distill(parse_recipe(spec["recipe"]), Path(spec["out"]), export=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(ln) for ln in (Path(spec["out"]) / "metrics.jsonl").read_text().splitlines()]
    times = [r["epoch_time_s"] for r in rows if r["stage"] == "student"]
    return {"accuracy": run.report.student.accuracy, "teacher_accuracy": run.report.teacher.accuracy,
            "epoch_times_s": times, "median_epoch_after_first_s": statistics.median(times[1:]) if len(times) > 1 else None,
            "wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def child(spec: dict, cache: Path) -> dict:
    env = {**__import__("os").environ, "PROTEGE_CACHE": str(cache), "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {spec['out']}\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{Path(spec['out']).name}: {out['accuracy']:.4f}, {out['median_epoch_after_first_s']}, "
          f"rss {out['peak_rss_mib']:.0f} MiB (+ workers {out['worker_peak_rss_mib']:.0f})", flush=True)
    return out


def _ms(vals: list[float]) -> str:
    vals = [100 * v for v in vals]
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(ROOT / "results" / "stream_images.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    with tempfile.TemporaryDirectory(prefix="protege-stream-") as tmp:
        work = Path(tmp)
        folder, png_s = write_pngs(work / "fashion_png")
        print(f"wrote 70,000 PNG files in {png_s:.0f} s", flush=True)
        cache, runs = work / "cache", work / "runs"
        imgs = lambda path, **kw: {"source": "images", "path": str(path), "scaling": "none", "classes": CLASSES, **kw}  # noqa: E731
        memory = {}
        for n, path in ((10_000, folder / "first10k.csv"), (70_000, folder)):
            for stream in (True, False):
                spec = {"recipe": recipe(imgs(path, stream=stream), 0, epochs=1), "out": str(runs / f"rss_{n}_{stream}")}
                memory[f"{n}_{'streamed' if stream else 'in_memory'}"] = child(spec, cache)
        result = {"command": "python benchmarks/stream_images.py", "environment": environment(THREADS), "epochs": EPOCHS,
                  "png_write_s": png_s, "memory": memory, "images": [], "builtin": []}
        for seed in args.seeds:
            result["images"].append(child({"recipe": recipe(imgs(folder, stream=True), seed), "out": str(runs / f"img{seed}")}, cache))
            result["builtin"].append(child({"recipe": recipe({"source": "fashion_mnist"}, seed), "out": str(runs / f"bi{seed}")}, cache))
        result["images_in_memory"] = child({"recipe": recipe(imgs(folder, stream=False), 0), "out": str(runs / "mem0")}, cache)
        result["images_one_worker"] = child({"recipe": recipe(imgs(folder, stream=True, workers=1), 0, epochs=3),
                                             "out": str(runs / "w1")}, cache)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    write_md(result, args.seeds, Path(args.out).with_suffix(".md"))


def write_md(result: dict, seeds: list[int], path: Path) -> None:
    env, im, bi, mem = result["environment"], result["images"], result["builtin"], result["memory"]
    pairs = [(a["median_epoch_after_first_s"], b["median_epoch_after_first_s"]) for a, b in zip(im, bi)]
    ratio = [a / b for a, b in pairs]
    diff = [100 * (a["accuracy"] - b["accuracy"]) for a, b in zip(im, bi)]
    decoded = lambda n: n * 784 * 4 / 2**20  # noqa: E731 - float32 bytes of n decoded 28x28 images
    md = [f"# Fashion-MNIST as 70,000 PNG files (`{result['command']}`)", "",
          f"{env['cpu']} ({' '.join(env['cpu_flags'])}), torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
          f"{env['threads']} threads; student CNN 24k params, {result['epochs']} epochs, KD from the committed CNN teacher; "
          f"seeds {seeds}; validation-selected epoch; mean ± std over seeds.", "",
          "| source | student test accuracy % | median epoch after the first (s) |", "|---|---|---|",
          f"| images, 70k PNG files, streamed (no loader workers, the default) | {_ms([r['accuracy'] for r in im])} | "
          f"{statistics.median([p[0] for p in pairs]):.2f} |",
          f"| built-in fashion_mnist, in memory | {_ms([r['accuracy'] for r in bi])} | {statistics.median([p[1] for p in pairs]):.2f} |",
          f"| images, in memory (seed 0) | {100 * result['images_in_memory']['accuracy']:.2f} | "
          f"{result['images_in_memory']['median_epoch_after_first_s']:.2f} |",
          f"| images, streamed with one loader worker (seed 0, 3 epochs) | - | "
          f"{result['images_one_worker']['median_epoch_after_first_s']:.2f} |", "",
          f"Accuracy difference images - built-in, paired by seed: {statistics.mean(diff):+.2f} ± "
          f"{statistics.stdev(diff) if len(diff) > 1 else 0:.2f} points (the built-in source tests on the official 10k "
          f"test images, the images source on its own 20% split). Epoch time ratio streamed / built-in, per seed: "
          f"{', '.join(f'{r:.2f}' for r in ratio)} (median {statistics.median(ratio):.2f}; issue target at most 1.3).", "",
          "| files | peak RSS streamed (MiB) | + loader worker | peak RSS in memory (MiB) | decoded float32 data (MiB) |",
          "|---|---|---|---|---|"]
    for n in (10_000, 70_000):
        s, m = mem[f"{n}_streamed"], mem[f"{n}_in_memory"]
        md.append(f"| {n:,} | {s['peak_rss_mib']:.0f} | {s['worker_peak_rss_mib']:.0f} | {m['peak_rss_mib']:.0f} | {decoded(n):.0f} |")
    grow_s = mem["70000_streamed"]["peak_rss_mib"] - mem["10000_streamed"]["peak_rss_mib"]
    grow_m = mem["70000_in_memory"]["peak_rss_mib"] - mem["10000_in_memory"]["peak_rss_mib"]
    md += ["", f"From 10k to 70k files the streamed run's peak RSS grows by {grow_s:.0f} MiB, the in-memory run's by "
           f"{grow_m:.0f} MiB; the decoded data grows by {decoded(60_000):.0f} MiB. Writing the PNGs took "
           f"{result['png_write_s']:.0f} s. Each memory row is one epoch; the first streamed run of each size also decoded "
           f"the files into the cache."]
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
