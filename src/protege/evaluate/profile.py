"""CPU latency that says how far it can be trusted.

Every stage is timed in interleaved rounds (teacher, student, ONNX, int8, then again), so a slow moment of the
machine hits all of them alike; each stage gets the median, p95 and interquartile range over all its timed calls,
and ratios are the median over rounds of the per-round ratio. A load probe around the measurement says how much of
the machine other processes used meanwhile. A figure is unreliable when its spread is large or the machine was busy.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..config import _Strict
from ..export.onnx import ort_session

Call = Callable[[], object]              # one call of a stage, the thing timed
Timer = Callable[[int], Call]            # batch size -> a call on a batch of that size
Rounds = list[list[float]]               # round -> ms of each timed call in it
CpuTimes = tuple[float, float]           # (busy, total) CPU seconds of all CPUs since boot
StatReader = Callable[[], Optional[CpuTimes]]
Inputs = Union[Sequence[int], torch.Tensor]

# Chosen on this project's 2-core VM (the demo run, 5 rounds): quiet, other processes used 0-3% of the CPU while
# measuring; with one or two `while True: pass` loops beside it, 21-49%, and the 2-thread PyTorch teacher's batch-32
# latency (so speedup_b32) came out 2-10x too slow. Quiet, IQR / median was at most 1.33 at batch 1 (2% of figures
# above 1) and 2.5 at batch 32 (12% above 1, mostly that teacher, whose quiet medians ranged 1.8-4.6 ms).
MAX_SPREAD = 1.0         # IQR / median above this (the middle half of the calls spans more than the median): unreliable
MAX_OTHER_SHARE = 0.10   # other processes' share of all CPUs' time while measuring above this: the machine was busy
SETTLE_MAX_S = 0.1       # the longest wait for the previous stage's spinning threads (ONNX Runtime's: ~40 ms here)


class EvalConfig(_Strict):
    """Latency: every stage timed in `rounds` interleaved rounds after `warmup` calls each; repeats_b1 / repeats_b32
    timed calls per stage in all, split over the rounds (at least one per round)."""

    threads: int = Field(2, ge=1, le=1024)
    warmup: int = Field(5, ge=0, le=10_000)
    repeats_b1: int = Field(50, ge=1, le=100_000)
    repeats_b32: int = Field(10, ge=1, le=100_000)
    rounds: int = Field(5, ge=1, le=1000)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def example_batch(inputs: Inputs, batch: int) -> torch.Tensor:
    """A batch to time: random normal values of shape ``inputs``, or the first example of a tensor repeated
    (token ids must be real ids, so text models are timed on a real example)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:1].expand(batch, *inputs.shape[1:]).contiguous()
    return torch.randn(batch, *inputs, generator=torch.Generator().manual_seed(0))


def timing_inputs(data) -> Inputs:
    """What latency is measured on for a DataSplits: random inputs of the example shape, or a real test example for
    token ids (they must be real ids)."""
    return data.test.x[:1] if data.is_text else data.input_shape


def torch_timer(model: nn.Module, inputs: Inputs) -> Timer:
    """batch -> a call of ``model`` (eval mode) on a batch of that size (see example_batch)."""
    model = model.eval()

    def at(batch: int) -> Call:
        x = example_batch(inputs, batch)
        return lambda: model(x)
    return at


def ort_timer(session: Any, inputs: Inputs) -> Timer:
    """batch -> a run of an ONNX Runtime session on a batch of that size (see example_batch)."""
    name = session.get_inputs()[0].name

    def at(batch: int) -> Call:
        x = example_batch(inputs, batch).numpy()
        return lambda: session.run(None, {name: x})
    return at


# ---------------------------------------------------------------- recording and statistics (pure)
def split_calls(total: int, rounds: int) -> list[int]:
    """``total`` timed calls spread over ``rounds`` as evenly as possible, at least one in each round."""
    return [max(1, total // rounds + (r < total % rounds)) for r in range(rounds)]


def settle_threads(max_s: float = SETTLE_MAX_S, step_s: float = 0.002) -> None:
    """Sleep until this process's idle runtime threads stop spinning (the process uses under a quarter of a CPU over
    ``step_s``), at most ``max_s``: ONNX Runtime's workers spin for tens of milliseconds after a run, and on a machine
    with as many cores as threads they would slow the next stage down (3x for a PyTorch CNN at batch 32 here)."""
    end = time.perf_counter() + max_s
    while time.perf_counter() < end:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(step_s)
        if time.process_time() - cpu < 0.25 * (time.perf_counter() - wall):
            return


def record(stages: Mapping[str, Call], calls: Sequence[int], warmup: int, settle: Callable[[], None] = settle_threads,
           clock: Callable[[], float] = time.perf_counter, prime: bool = True) -> dict[str, Rounds]:
    """Warm every stage up, then one round per entry of ``calls``: each stage in turn, after ``settle()`` (the previous
    stage's threads stop spinning) and, with ``prime``, one untimed call (this stage's threads wake up; not worth a
    call that takes seconds, like generating text), ``calls[r]`` timed calls. Returns stage -> round -> ms per call."""
    for fn in stages.values():
        for _ in range(warmup):
            fn()
    out: dict[str, Rounds] = {name: [] for name in stages}
    for n in calls:
        for name, fn in stages.items():
            settle()
            if prime:
                fn()
            times = []
            for _ in range(n):
                t0 = clock()
                fn()
                times.append((clock() - t0) * 1e3)
            out[name].append(times)
    return out


def summarize(rounds: Rounds) -> dict[str, Any]:
    """Median, p95 and interquartile range (ms) over all calls of all rounds; spread = IQR / median; per-round medians."""
    x = np.concatenate([np.asarray(r, dtype=float) for r in rounds])
    q1, med, q3, p95 = (float(v) for v in np.percentile(x, [25, 50, 75, 95]))
    return {"median": med, "p95": p95, "iqr": q3 - q1, "spread": (q3 - q1) / med if med > 0 else 0.0,
            "round_medians": [float(np.median(r)) for r in rounds], "calls": int(x.size)}


def paired_ratio(num: Rounds, den: Rounds) -> float:
    """Median over rounds of median(num in round r) / median(den in round r): a ratio from the same moments."""
    return float(np.median([np.median(a) / np.median(b) for a, b in zip(num, den)]))


# ---------------------------------------------------------------- how busy the machine was
def proc_stat_times(path: str = "/proc/stat") -> Optional[CpuTimes]:
    """(busy, total) CPU seconds of all CPUs since boot from /proc/stat's first line; busy counts user, nice, system,
    irq, softirq and steal (a hypervisor's other guests); None where there is no /proc/stat."""
    try:
        with open(path) as f:
            head = f.readline().split()
    except OSError:
        return None
    if len(head) < 5 or head[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = ([float(v) for v in head[1:9]] + [0.0] * 8)[:8]
    busy, tick = user + nice + system + irq + softirq + steal, float(os.sysconf("SC_CLK_TCK"))
    return busy / tick, (busy + idle + iowait) / tick


def other_share(before: CpuTimes, after: CpuTimes, own_seconds: float) -> Optional[float]:
    """Share of all CPUs' time that processes other than this one used between two /proc/stat readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return None
    return min(1.0, max(0.0, (busy - own_seconds) / total))


def load_verdict(share: Optional[float], resolution: float, loadavg: Optional[float], cpus: int,
                 max_other_share: float = MAX_OTHER_SHARE) -> dict[str, Any]:
    """Busy when other processes used more than ``max_other_share`` of the CPU beyond the probe's resolution (one
    clock tick per CPU); without /proc/stat, or over a window too short for it to tell, when the 1-minute load
    average is above the number of cores."""
    if share is not None and resolution <= max_other_share:
        busy = share - resolution > max_other_share
        reason = f"machine busy: other processes used {share:.0%} of the CPU while measuring"
    else:
        busy = loadavg is not None and loadavg > cpus
        reason = f"machine busy: load average {loadavg or 0:.1f} above its {cpus} cores"
    return {"other_share": share, "resolution": resolution, "loadavg_1min": loadavg, "cpus": cpus,
            "busy": busy, "reason": reason if busy else None}


def _loadavg() -> Optional[float]:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


class LoadProbe:
    """Around a block: /proc/stat busy time of all CPUs minus this process's own CPU time (time.process_time counts
    all its threads) gives the share other processes used; ``result`` (see load_verdict) is set on exit."""

    def __init__(self, read_stat: StatReader = proc_stat_times, max_other_share: float = MAX_OTHER_SHARE):
        self.read_stat, self.max_other_share = read_stat, max_other_share
        self.result: dict[str, Any] = {}

    def __enter__(self) -> "LoadProbe":
        self._stat, self._own, self._wall = self.read_stat(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        stat, own = self.read_stat(), time.process_time() - self._own
        cpus = os.cpu_count() or 1
        share = other_share(self._stat, stat, own) if self._stat and stat else None
        total = stat[1] - self._stat[1] if share is not None else 0.0
        resolution = cpus / float(os.sysconf("SC_CLK_TCK")) / total if total > 0 else 0.0
        self.result = {**load_verdict(share, min(resolution, 1.0), _loadavg(), cpus, self.max_other_share),
                       "seconds": time.perf_counter() - self._wall}


# ---------------------------------------------------------------- one interleaved measurement
@dataclass
class Measurement:
    """What one interleaved measurement recorded (stage -> round -> ms), the load probe's result, and verdicts."""

    samples: dict[str, Rounds]
    load: dict[str, Any]
    max_spread: float = MAX_SPREAD

    def stats(self, name: str) -> dict[str, Any]:
        """summarize() of one stage plus ``reliable`` and the ``reasons`` when it is not."""
        s = summarize(self.samples[name])
        reasons = [self.load["reason"]] if self.load.get("busy") else []
        if s["spread"] > self.max_spread:
            reasons.append(f"spread {s['spread']:.0%} of the median")
        return {**s, "reliable": not reasons, "reasons": reasons}

    def ratio(self, num: str, den: str) -> tuple[float, bool]:
        """paired_ratio of two stages, and whether both figures are reliable."""
        ok = self.stats(num)["reliable"] and self.stats(den)["reliable"]
        return paired_ratio(self.samples[num], self.samples[den]), ok


def measure(stages: Mapping[str, Call], rounds: int, total_calls: int, warmup: int, threads: int,
            read_stat: StatReader = proc_stat_times, settle: Callable[[], None] = settle_threads,
            prime: bool = True) -> Measurement:
    """Time every stage in ``rounds`` interleaved rounds (``total_calls`` per stage in all, at least one per round;
    see record), with ``threads`` PyTorch threads, under a load probe."""
    with torch_threads(threads), torch.no_grad(), LoadProbe(read_stat) as probe:
        samples = record(stages, split_calls(total_calls, rounds), warmup, settle, prime=prime)
    return Measurement(samples, probe.result)


# ---------------------------------------------------------------- report fields
def stage_fields(measurements: Mapping[str, Measurement], name: str) -> dict[str, Any]:
    """A stage's report keys for each measurement label (b1, b32): median, _p95, _iqr, and latency_<label>_reliable."""
    out: dict[str, Any] = {}
    for label, m in measurements.items():
        if name in m.samples:
            s = m.stats(name)
            out.update({f"latency_ms_{label}": s["median"], f"latency_ms_{label}_p95": s["p95"],
                        f"latency_ms_{label}_iqr": s["iqr"], f"latency_{label}_reliable": s["reliable"]})
    return out


def latency_section(measurements: Mapping[str, Measurement], **settings: Any) -> dict[str, Any]:
    """The report's "latency" section: settings, each measurement's calls, load and per-round medians, and whether
    every figure is reliable, with the reasons ("b1 teacher: spread 38% of the median")."""
    out: dict[str, Any] = {"method": "interleaved rounds: every stage in turn, then again; median and p95 over all "
                                     "calls; ratios are the median of per-round ratios",
                           **settings, "max_spread": MAX_SPREAD, "max_other_share": MAX_OTHER_SHARE}
    reasons = []
    for label, m in measurements.items():
        stats = {name: m.stats(name) for name in m.samples}
        out[label] = {"calls_per_stage": next(iter(stats.values()))["calls"] if stats else 0, "load": m.load,
                      "round_medians_ms": {n: s["round_medians"] for n, s in stats.items()},
                      "spread": {n: s["spread"] for n, s in stats.items()}}
        if m.load.get("busy"):
            reasons.append(f"{label}: {m.load['reason']}")
        reasons += [f"{label} {n}: {r}" for n, s in stats.items() for r in s["reasons"] if not r.startswith("machine busy")]
    return {**out, "reliable": not reasons, "reasons": reasons}


def _p50_p95(stage: Call, repeats: int, warmup: int) -> dict[str, float]:
    """One stage alone (after the previous one's threads settle): p50 and p95 ms of ``repeats`` calls."""
    s = summarize(record({"stage": stage}, [repeats], warmup)["stage"])
    return {"p50": s["median"], "p95": s["p95"]}


def torch_latency(model: nn.Module, inputs: Inputs, batch: int, threads: int, warmup: int = 5,
                  repeats: int = 30) -> dict[str, float]:
    """p50 / p95 ms of ``model`` alone on a batch of ``batch`` (see example_batch for ``inputs``)."""
    with torch_threads(threads), torch.no_grad():
        return _p50_p95(torch_timer(model, inputs)(batch), repeats, warmup)


def ort_latency(path: Path, inputs: Inputs, batch: int, threads: int, warmup: int = 5,
                repeats: int = 30) -> dict[str, float]:
    """p50 / p95 ms of one ONNX file alone in ONNX Runtime on a batch of ``batch``."""

    return _p50_p95(ort_timer(ort_session(path, threads), inputs)(batch), repeats, warmup)
