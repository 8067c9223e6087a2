"""One `--seeds` run trained by one process of 2 threads, or by 2 processes of 1 thread sharing its folder.

    python benchmarks/parallel_seeds.py                # 2 seeds x (KD + baseline), 4 epochs, both students, 2 rounds
    python benchmarks/parallel_seeds.py --quick        # smoke test: 2,000 images, 2 epochs, 1 round

Each mode trains the same `protege distill recipes/fashion_mnist.yaml --seeds 2 --baseline` (the committed teacher,
its outputs cached; 4 runs of a few epochs each, with export and evaluation as the command does them) into a folder
of its own:
  one process     OMP_NUM_THREADS=2, one command
  two processes   OMP_NUM_THREADS=1 each, the same command twice, the second with --resume once the first has started
                  (each takes the runs nobody holds; stages/seeds.py)
for two students: the recipe's 24k-parameter CNN (16,32,64, one conv per stage) and 12,20,40 with two convs per stage
(29k). Rounds alternate the modes (one, two, one, two, ...) so both see the same machine conditions; the figure is the
median wall time per mode and the ratio one / two (above 1: two processes are faster). Writes
benchmarks/results/parallel_seeds.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from _env import environment  # noqa: E402

TEACHER = ROOT / "teachers" / "fashion_mnist_cnn.safetensors"
PROTEGE = str(Path(sys.executable).with_name("protege"))
STUDENTS = {"16,32,64:1": ["student.kwargs.channels=[16,32,64]", "student.kwargs.depth=1"],
            "12,20,40:2": ["student.kwargs.channels=[12,20,40]", "student.kwargs.depth=2"]}


def command(out: Path, sets: list[str]) -> list[str]:
    cmd = [PROTEGE, "distill", str(ROOT.parent / "recipes" / "fashion_mnist.yaml"), "--out", str(out), "--seeds", "2", "--baseline"]
    for s in [f"teacher.weights={TEACHER}", "teacher.train=null", *sets]:
        cmd += ["--set", s]
    return cmd


def one_process(out: Path, sets: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(command(out, sets), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "2"})
    return time.perf_counter() - t0


def two_processes(out: Path, sets: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    first = subprocess.Popen(command(out, sets), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not (out / "distilled").is_dir() and first.poll() is None:  # the second joins once the folder is started
        time.sleep(0.1)
    second = subprocess.Popen([*command(out, sets), "--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    codes = first.wait(), second.wait()
    if codes != (0, 0):
        raise SystemExit(f"two processes on {out}: exit codes {codes}; run the commands by hand to see why")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, help="student epochs per run; default 4 (--quick: 2)")
    ap.add_argument("--rounds", type=int, help="rounds of both modes; default 2 (--quick: 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "parallel_seeds")
    args = ap.parse_args()
    epochs, rounds = args.epochs or (2 if args.quick else 4), args.rounds or (1 if args.quick else 2)
    base = [f"train.epochs={epochs}", *(["data.limit=2000"] if args.quick else [])]
    rows = {}
    for name, student in STUDENTS.items():
        sets = base + student
        times: dict[str, list[float]] = {"one process, 2 threads": [], "two processes, 1 thread each": []}
        for r in range(rounds):
            for mode, fn in zip(times, (one_process, two_processes), strict=True):
                out = args.out / f"{name.replace(',', '-').replace(':', 'd')}_{'one' if fn is one_process else 'two'}"
                shutil.rmtree(out, ignore_errors=True)  # (each round trains from nothing)
                times[mode].append(fn(out, sets))
                print(f"{name} round {r + 1}: {mode}: {times[mode][-1]:.0f} s", flush=True)
        med = {m: statistics.median(t) for m, t in times.items()}
        one, two = med.values()
        rows[name] = {"wall_s": times, "median_wall_s": med, "one_over_two": one / two}
    result = {"command": "python benchmarks/parallel_seeds.py" + (" --quick" if args.quick else ""),
              "environment": environment(2), "epochs": epochs, "rounds": rounds, "runs_per_mode": 4, "students": rows}
    md = markdown(result)
    if not args.quick:
        (ROOT / "results").mkdir(exist_ok=True)
        (ROOT / "results" / "parallel_seeds.json").write_text(json.dumps(result, indent=2))
        (ROOT / "results" / "parallel_seeds.md").write_text(md)
    print(md)


def markdown(s: dict) -> str:
    e = s["environment"]
    lines = [f"`--seeds 2 --baseline` (4 runs of {s['epochs']} epochs), one process or two sharing the folder, "
             f"`{s['command']}` ({e['cpu']}, {' '.join(e['cpu_flags'])}; torch {e['torch']}, onnxruntime {e['onnxruntime']}; "
             f"{e['cores']} cores; median of {s['rounds']} alternating rounds)", "",
             "| student | one process, 2 threads (s) | two processes, 1 thread each (s) | one / two |", "|---|---:|---:|---:|"]
    for name, row in s["students"].items():
        one, two = row["median_wall_s"].values()
        lines.append(f"| {name} | {one:.0f} | {two:.0f} | {row['one_over_two']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
