"""Kill and resume at seeded random moments in every stage (issue 14): 0 mismatches with an uninterrupted run.

One small recipe on the bundled digits goes through every stage: teacher training (live augmentation, dropout,
BatchNorm), the teacher-output cache, student distillation, structured pruning in two steps with recovery epochs,
export of student.onnx and pruned.onnx, static int8 quantization, evaluation. It runs once uninterrupted (the
reference); then each case starts the same command, sends SIGKILL (or SIGINT, Ctrl-C) at its moment, goes on with
--resume (four cases kill the resumed run once more and resume again), and the finished folder must equal the
reference: the weights and ONNX files byte for byte (export is deterministic: two uninterrupted runs give
identical files, ONNX metadata included), every metrics.jsonl line valid JSON and the rows equal apart from their
times, the report's accuracies, and manifest.json (what --overwrite later removes) listing the same files.

Kill moments come from a fixed seed, in the process's CPU seconds: wall time stretches with the machine's load,
CPU time of a one-thread run hardly does. Each stage of the reference starts when a file appears in the run folder
(the previous stage's last write, STAGES below) and ends when the next one does; a moment is "stage S, a fraction
u of S's reference CPU time after S's marker file appears in this run". Two moments per stage (stratified), eight
more uniform over the reference's whole CPU time. The stage a kill fell in is read from the files that existed
when the process died, with the epochs logged in metrics.jsonl. A kill before recipe.yaml exists cannot be
resumed (protege says "drop --resume"), so that case goes on with the plain command.

`make test-slow` (about 12-15 minutes on 2 cores); `-s` prints a line per case and a table at the end."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from ..conftest import PROTEGE


pytestmark = pytest.mark.slow
SEED = 14  # the number: change it to draw other moments
RECIPE = {
    "name": "kill_resume",
    "seed": 0,
    "data": {"source": "digits"},
    "teacher": {"model": "cnn", "kwargs": {"channels": [32, 64], "depth": 2, "dropout": 0.1},
                "train": {"epochs": 8, "batch_size": 64, "lr": 0.003, "augment": True}},
    "student": {"model": "cnn", "kwargs": {"channels": [16, 32], "depth": 2, "dropout": 0.1}},
    "distill": {"response": "kl", "temperature": 4.0, "alpha": 0.3},
    "train": {"epochs": 16, "batch_size": 64, "lr": 0.01},  # no augmentation: the teacher's outputs are cached
    "prune": {"method": "structured", "ratio": 0.25, "steps": 2, "finetune_epochs": 3},
    "quantize": {"mode": "static"},  # one candidate: `auto`/`int8` choose by measured latency, which no rerun repeats
    "eval": {"warmup": 1, "repeats_b1": 3, "repeats_b32": 2, "rounds": 1, "threads": 1},
}
# One thread everywhere: idle threads of a pool spin, so on a loaded machine a multi-threaded run burns CPU time
# waiting, and CPU time would no longer measure progress through the run.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# (stage, the file whose appearance starts it): each stage ends when the next one's file appears (the last at exit)
STAGES = [("startup", None), ("teacher", "recipe.yaml"), ("cache", "teacher/model.safetensors"),
          ("student", "teacher_cache/t0/meta.json"), ("prune", "student/model.safetensors"),
          ("export", "pruned/model.safetensors"), ("quantize", "pruned.onnx"), ("evaluate", "quantized/choice.json")]
STAGE_NAMES = [s for s, _ in STAGES]
BYTE_EQUAL = ("teacher/model.safetensors", "student/model.safetensors", "pruned/model.safetensors", "pruned/config.json",
              "student.onnx", "pruned.onnx", "quantized/static.onnx", "student.int8.onnx")
TIMING_KEYS = ("epoch_time_s",)
RESULTS: list[dict] = []


def _plan() -> list[dict]:
    rng = random.Random(SEED)
    cases = [{"target": name, "u": rng.uniform(0.02, 0.95)} for _ in range(2) for name in STAGE_NAMES]
    cases += [{"target": "uniform", "u": rng.uniform(0.02, 0.98)} for _ in range(8)]
    for c in cases:
        c["signal"] = "SIGINT" if rng.random() < 0.3 else "SIGKILL"
    for c in rng.sample(cases, 4):  # these resumed runs are killed once more, then resumed again
        c["again"] = rng.uniform(0.05, 0.95)
    return cases


PLAN = _plan()


def _start(recipe: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    # As in tests/test_cli.py: a background job inherits SIGINT ignored; restore it so Ctrl-C reaches Python.
    f = open(log, "a")
    f.write(f"\n===== protege distill {' '.join(extra)} =====\n")
    f.flush()
    try:
        return subprocess.Popen([PROTEGE, "distill", str(recipe), "--out", str(out), *extra], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    finally:
        f.close()


def _stage_of(out: Path) -> str:
    """The stage a dead run was in: the last stage whose marker file exists, with its progress."""
    stage = "startup"
    for name, marker in STAGES[1:]:
        if (out / marker).is_file():
            stage = name
    detail = ""
    try:
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        rows = []
    if stage in ("teacher", "student"):
        done = sum(r.get("stage") == stage for r in rows)
        detail = f" ({done}/{RECIPE['train']['epochs'] if stage == 'student' else RECIPE['teacher']['train']['epochs']} epochs)"
    elif stage == "cache":
        detail = " (building)" if (out / "teacher_cache" / "t0.tmp").exists() else ""
    elif stage == "prune":
        epochs = RECIPE["prune"]["steps"] * RECIPE["prune"]["finetune_epochs"]
        detail = f" ({sum(str(r.get('stage')).startswith('prune') for r in rows)}/{epochs} recovery epochs)"
    elif stage == "export":
        detail = " (student.onnx done)" if (out / "student.onnx").is_file() else ""
    elif stage == "evaluate":
        detail = " (report written)" if (out / "report.json").is_file() else ""
    return stage + detail


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl, every line parsed as JSON (a broken line raises), times dropped."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _report_facts(run: Path) -> list:
    report = json.loads((run / "report.json").read_text())
    return [(s["name"], s["file"], s["accuracy"], s["macro_f1"], s.get("agreement"), s["params"], s["bytes"])
            for s in report["stages"]] + [report["quantization"]["chosen"], report["onnx_max_abs_diff"]]


def _onnx_detail(a: Path, b: Path) -> str:
    """For a byte mismatch of ONNX files: do the tensors differ, or only the rest of the file?"""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    ta = {t.name: numpy_helper.to_array(t) for t in ma.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in mb.graph.initializer}
    differ = sorted(k for k in ta.keys() | tb.keys() if k not in ta or k not in tb or not np.array_equal(ta[k], tb[k]))
    for m in (ma, mb):
        del m.graph.initializer[:]
    return f"tensors differing: {differ[:8]}; graph without tensors equal: {ma.SerializeToString() == mb.SerializeToString()}"


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) a live process has used: the clock kill moments are set in, since
    wall time stretches with the machine's load and CPU time hardly does."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return None


def _interrupt(recipe: Path, out: Path, log: Path, extra: tuple, marker: str | None, cpu_delay: float, sig: str) -> dict:
    """Start the command; once ``marker`` exists (at once if None) and the process has used ``cpu_delay`` more CPU
    seconds, send ``sig``. Returns how the process ended and the stage its files show."""
    proc = _start(recipe, out, log, *extra)
    t0, cpu = time.monotonic(), 0.0
    try:
        while marker is not None and not (out / marker).exists() and proc.poll() is None and time.monotonic() < t0 + 900:
            cpu = _cpu(proc.pid) or cpu
            time.sleep(0.005)
        base = (_cpu(proc.pid) or cpu) if marker is not None else 0.0
        cpu = base
        while proc.poll() is None and cpu < base + cpu_delay and time.monotonic() < t0 + 900:
            time.sleep(0.005)
            cpu = _cpu(proc.pid) or cpu
        t_sig = time.monotonic() - t0
        if proc.poll() is not None:
            return {"killed": False, "code": proc.returncode, "at_s": t_sig, "cpu_s": cpu, "stage": "finished first"}
        proc.send_signal(getattr(signal, sig))
        try:
            code, hung = proc.wait(timeout=120), False
        except subprocess.TimeoutExpired:  # the signal did not end it: a finding; SIGKILL to go on
            proc.kill()
            code, hung = proc.wait(), True
        return {"killed": True, "code": code, "at_s": t_sig, "cpu_s": cpu, "stage": _stage_of(out), "hung": hung,
                "exit_after_s": time.monotonic() - t0 - t_sig}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text()[-n:] if log.exists() else ""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, and how much CPU time (and wall time) it had used when each stage's marker file appeared."""
    if _cpu(os.getpid()) is None:
        pytest.skip("needs /proc to read a process's CPU time")
    tmp = tmp_path_factory.mktemp("kill_resume_ref")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out, log = tmp / "run", tmp / "log.txt"
    t0 = time.monotonic()
    proc = _start(recipe, out, log)
    starts, walls, cpu = {"startup": 0.0}, {"startup": 0.0}, 0.0
    try:
        pending = list(STAGES[1:])
        while proc.poll() is None and time.monotonic() < t0 + 900:
            cpu = _cpu(proc.pid) or cpu
            while pending and (out / pending[0][1]).exists():
                name = pending.pop(0)[0]
                starts[name], walls[name] = cpu, time.monotonic() - t0
            time.sleep(0.005)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.monotonic() - t0
    assert code == 0, _tail(log)
    assert list(starts) == STAGE_NAMES, f"stage markers seen in the reference: {starts}"
    ends = [starts[n] for n in STAGE_NAMES[1:]] + [cpu]
    durations = {n: max(e - starts[n], 0.0) for n, e in zip(STAGE_NAMES, ends)}
    print(f"\nreference run: {wall:.1f} s wall, {cpu:.1f} s CPU; stages (CPU s at start / CPU s / share, wall s at start): "
          + ", ".join(f"{n} {starts[n]:.2f}/{durations[n]:.2f}/{durations[n] / cpu:.0%}/{walls[n]:.1f}" for n in STAGE_NAMES))
    return {"recipe": recipe, "run": out, "starts": starts, "durations": durations, "total": cpu, "wall": wall}


def _aim(case: dict, ref: dict) -> tuple[str, float, float]:
    """(stage, CPU seconds after its marker appears, the moment in the reference's CPU seconds) for a case."""
    if case["target"] == "uniform":
        t = case["u"] * ref["total"]
        stage = [n for n in STAGE_NAMES if ref["starts"][n] <= t][-1]
        return stage, t - ref["starts"][stage], t
    stage = case["target"]
    delay = case["u"] * ref["durations"][stage]
    return stage, delay, ref["starts"][stage] + delay


def _next_args(recipe: Path, out: Path, row: dict) -> tuple:
    """How to go on after a kill: --resume, or (killed before recipe.yaml was written) the plain command."""
    if (out / "recipe.yaml").is_file():
        return ("--resume",)
    refused = subprocess.run([PROTEGE, "distill", str(recipe), "--out", str(out), "--resume"], capture_output=True, text=True)
    row["notes"].append(f"no recipe.yaml at the kill: --resume exit {refused.returncode} "
                        f"('{(refused.stderr.strip().splitlines() or [''])[-1][-60:]}'); ran without --resume")
    return ()


@pytest.mark.parametrize("case", PLAN, ids=[f"{i:02d}-{c['target']}-{c['signal']}{'-twice' if 'again' in c else ''}"
                                            for i, c in enumerate(PLAN)])
def test_kill_and_resume_matches_uninterrupted(tmp_path, reference, case):
    ref, recipe = reference, reference["recipe"]
    out, log = tmp_path / "run", tmp_path / "log.txt"
    stage, delay, moment = _aim(case, ref)
    row = {"id": f"{PLAN.index(case):02d}", "target": case["target"], "signal": case["signal"],
           "aim": f"{stage}+{delay:.2f} CPU s (~{moment / ref['total']:.0%})", "kills": [], "notes": [], "problems": []}
    RESULTS.append(row)
    t_case = time.monotonic()
    interrupts = [(dict(STAGES)[stage], delay, case["signal"])]
    if "again" in case:  # the resumed run killed once more: startup plus what the first kill left, in CPU seconds
        interrupts.append((None, case["again"] * (ref["starts"]["teacher"] + max(ref["total"] - moment, 1.0)), "SIGKILL"))
    args, finished = (), False
    for marker, cpu_delay, sig in interrupts:
        kill = _interrupt(recipe, out, log, args, marker, cpu_delay, sig)
        row["kills"].append(kill)
        _check_interrupt(kill, sig, out, log, row)
        if not kill["killed"]:
            finished = True
            if kill["code"] != 0:
                row["problems"].append(f"{' '.join(args) or 'the run'} exited {kill['code']}")
            break
        args = _next_args(recipe, out, row)
    if not finished:
        proc = _start(recipe, out, log, *args)
        try:
            code = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
        if code != 0:
            row["problems"].append(f"{' '.join(args) or 'the plain command'} after the kill exited {code}")
    row["seconds"] = time.monotonic() - t_case
    if not row["problems"]:
        _compare(out, ref["run"], row)
    row["result"] = "FAIL" if row["problems"] else "ok"
    print(f"\n[kill-resume {row['id']}] {_line(row)}")
    assert not row["problems"], (f"case {row['id']} ({row['aim']}, {case['signal']}): " + "; ".join(row["problems"])
                                 + f"\nlog tail ({log}):\n{_tail(log)}")


def _check_interrupt(kill: dict, sig: str, out: Path, log: Path, row: dict) -> None:
    if not kill["killed"]:
        row["notes"].append("the run finished before the signal")
        return
    if kill.get("hung"):
        row["problems"].append(f"{sig} at {kill['stage']}: the process did not exit within 120 s")
    if sig == "SIGINT":
        text = _tail(log, 3000)
        if kill["code"] != 130 or "Traceback" in text.split("=====")[-1] or "--resume" not in text.split("=====")[-1]:
            row["notes"].append(f"Ctrl-C at {kill['stage']}: exit {kill['code']}"
                                f"{', a traceback' if 'Traceback' in text.split('=====')[-1] else ''}"
                                f"{'' if '--resume' in text.split('=====')[-1] else ', no --resume hint'}")
    if (out / "report.json").is_file() and kill["code"] not in (0,) and not kill["stage"].startswith("evaluate"):
        row["problems"].append(f"report.json exists after a kill in {kill['stage']}")


def _compare(out: Path, ref: Path, row: dict) -> None:
    for name in BYTE_EQUAL:
        a, b = out / name, ref / name
        if not a.is_file():
            row["problems"].append(f"{name} missing")
        elif a.read_bytes() != b.read_bytes():
            detail = _onnx_detail(a, b) if name.endswith(".onnx") else ""
            row["problems"].append(f"{name} differs from the reference {detail}")
    try:
        rows = _metric_rows(out)
    except (OSError, ValueError) as e:
        row["problems"].append(f"metrics.jsonl does not parse as JSON lines: {e}")
    else:
        want = _metric_rows(ref)
        if rows != want:
            got_keys = [(r.get("stage"), r.get("epoch")) for r in rows]
            want_keys = [(r.get("stage"), r.get("epoch")) for r in want]
            row["problems"].append(f"metrics.jsonl rows differ (stage, epoch): {got_keys} vs reference {want_keys}"
                                   if got_keys != want_keys else "metrics.jsonl values differ from the reference")
    if _report_facts(out) != _report_facts(ref):
        row["problems"].append(f"report.json stages differ: {_report_facts(out)} vs {_report_facts(ref)}")
    if (ref / "manifest.json").is_file():  # the record of what protege wrote, which --overwrite removes
        listed = lambda run: set(json.loads((run / "manifest.json").read_text())["files"]) if (run / "manifest.json").is_file() else None  # noqa: E731
        got, want = listed(out), listed(ref)
        if got != want:
            row["problems"].append("manifest.json " + ("missing" if got is None else
                                   f"lists {len(got)} files, the reference {len(want)}; not listed: {', '.join(sorted(want - got))}"
                                   + (f"; listed beyond the reference: {', '.join(sorted(got - want))}" if got - want else "")))
    extra = sorted(_files(out) - _files(ref))
    if extra:
        row["notes"].append(f"left over: {', '.join(extra)}")
    missing = sorted(_files(ref) - _files(out))
    if missing:
        row["problems"].append(f"files the reference has and this run lacks: {', '.join(missing)}")


def _line(row: dict) -> str:
    kills = " | ".join(f"{k['stage']} @{k['at_s']:.1f}s/{k['cpu_s']:.1f}cpu exit {k['code']}" for k in row["kills"])
    tail = "; ".join(row["problems"] + row["notes"])
    return f"{row['result']:4} {row['signal']:7} aim {row['aim']:28} fell in: {kills}  [{row.get('seconds', 0):.0f}s] {tail}"


def test_zz_summary(reference):
    """The table of every case, how many kills landed in each stage, and at least 20 real kills."""
    if not RESULTS:
        pytest.skip("no kill cases ran")
    print(f"\n\nkill-and-resume: {len(RESULTS)} cases, seed {SEED}, reference {reference['wall']:.1f} s wall, {reference['total']:.1f} s CPU")
    for row in RESULTS:
        print(f"  {row['id']} {_line(row)}")
    kills = [k for row in RESULTS for k in row["kills"] if k["killed"]]
    hits = {n: sum(k["stage"].split(" ")[0] == n for k in kills) for n in STAGE_NAMES}
    print(f"kills: {len(kills)} ({sum(len(r['kills']) > 1 for r in RESULTS)} cases killed twice); by stage: "
          + ", ".join(f"{n} {c}" for n, c in hits.items()))
    failed = [r["id"] for r in RESULTS if r.get("result") != "ok"]
    print(f"mismatches or failed resumes: {len(failed)} {failed}")
    assert len([r for r in RESULTS if r["kills"][0]["killed"]]) >= 20
