"""Focused tests of protege.evaluate.profile: interleaved rounds, medians and paired ratios, the reliability verdicts,
the report keys, and the timers for PyTorch models and ONNX Runtime sessions. Nothing here depends on how fast
anything runs: calls are counted, and the clock is a fake one that each stage advances by a known amount."""
from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from protege.evaluate import profile
from protege.evaluate.profile import (MAX_SPREAD, LoadProbe, Measurement, example_batch, latency_section, load_verdict,
                                      measure, ort_latency, ort_timer, other_share, paired_ratio, proc_stat_times,
                                      record, settle_threads, split_calls, stage_fields, summarize, torch_latency,
                                      torch_threads, torch_timer)
from protege.export.onnx import ort_session

QUIET = {"other_share": 0.0, "resolution": 0.001, "loadavg_1min": 0.1, "cpus": 2, "busy": False, "reason": None}
BUSY = {**QUIET, "other_share": 0.6, "busy": True, "reason": "machine busy: other processes used 60% of the CPU while measuring"}
STAT_KEYS = {"median", "p95", "iqr", "spread", "round_medians", "calls", "reliable", "reasons"}


class FakeClock:
    """A clock that only moves when a stage runs: ``stage(name, s)`` is a call taking exactly ``s`` seconds (or the next
    of a list). Durations are sums of powers of two, so the milliseconds record() computes are exact."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def stage(self, name: str, s):
        durations = iter(s) if isinstance(s, (list, tuple)) else None

        def call():
            self.calls.append(name)
            self.now += next(durations) if durations is not None else s
        return call


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)
        self.calls: list[tuple[int, ...]] = []
        self.grad_enabled: list[bool] = []
        self.threads: list[int] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        self.grad_enabled.append(torch.is_grad_enabled())
        self.threads.append(torch.get_num_threads())
        return self.drop(self.lin(x))


class FakeSession:
    """What ort_timer and ort_latency use of an ONNX Runtime session."""

    class _Input:
        name = "pixels"

    def __init__(self):
        self.feeds: list[dict] = []

    def get_inputs(self):
        return [self._Input()]

    def run(self, outputs, feeds):
        assert outputs is None
        self.feeds.append(feeds)
        return [np.zeros((len(next(iter(feeds.values()))), 2), np.float32)]


def _onnx_doubler(tmp_path):
    """A real ONNX file: logits = 2 * input, dynamic batch, 3 features."""
    graph = helper.make_graph([helper.make_node("Mul", ["input", "two"], ["logits"])], "doubler",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "doubler.onnx"
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------- inputs and timers
def test_example_batch_from_a_shape_is_seeded_random_normal():
    a, b = example_batch((3, 4), 5), example_batch([3, 4], 5)
    assert a.shape == (5, 3, 4) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.std() > 0.3 and not torch.equal(a[0], a[1])


def test_example_batch_from_a_tensor_repeats_its_first_example():
    ids = torch.tensor([[5, 6, 7], [1, 2, 3]])
    batch = example_batch(ids, 4)
    assert batch.shape == (4, 3) and batch.dtype == torch.int64 and batch.is_contiguous()
    assert (batch == ids[0]).all()


def test_torch_timer_makes_one_call_per_invocation_in_eval_mode():
    model = Counting().train()
    at = torch_timer(model, (3,))
    assert not model.training
    call = at(4)
    assert model.calls == []  # building the call runs nothing
    out1, out2 = call(), call()
    assert model.calls == [(4, 3), (4, 3)] and out1.shape == (4, 2)
    assert torch.equal(out1, out2)  # eval mode (no dropout) and the same batch each time
    at(1)()
    assert model.calls[-1] == (1, 3)


def test_ort_timer_feeds_the_session_input_a_float_batch():
    session = FakeSession()
    call = ort_timer(session, (3, 2))(5)
    assert session.feeds == []
    call()
    call()
    assert len(session.feeds) == 2 and list(session.feeds[0]) == ["pixels"]
    x = session.feeds[0]["pixels"]
    assert isinstance(x, np.ndarray) and x.shape == (5, 3, 2) and x.dtype == np.float32
    assert np.array_equal(x, session.feeds[1]["pixels"])


def test_ort_timer_runs_a_real_session(tmp_path):
    session = ort_session(_onnx_doubler(tmp_path), threads=1)
    for batch in (1, 3):
        (out,) = ort_timer(session, (3,))(batch)()
        assert out.shape == (batch, 3)
        assert np.allclose(out, 2 * example_batch((3,), batch).numpy())


# ---------------------------------------------------------------- recording
@pytest.mark.parametrize("total, rounds", [(t, r) for t in (1, 2, 5, 7, 30, 31) for r in (1, 2, 3, 5)])
def test_split_calls_sums_to_the_total_and_is_even(total, rounds):
    calls = split_calls(total, rounds)
    assert len(calls) == rounds and min(calls) >= 1 and max(calls) - min(calls) <= (1 if total >= rounds else 0)
    assert sum(calls) == max(total, rounds)
    assert calls == sorted(calls, reverse=True)  # the remainder goes to the first rounds


def test_record_counts_warmup_priming_and_timed_calls_and_measures_with_the_clock():
    clock = FakeClock()
    settles: list[int] = []
    stages = {"teacher": clock.stage("teacher", 0.5), "student": clock.stage("student", 0.125)}
    samples = record(stages, [3, 2], warmup=2, settle=lambda: settles.append(len(clock.calls)), clock=clock)
    # 2 warm-up calls each, then per round and stage: one untimed call, then the timed ones
    assert clock.calls.count("teacher") == 2 + (1 + 3) + (1 + 2) and clock.calls.count("student") == 2 + 4 + 3
    assert clock.calls[:4] == ["teacher", "teacher", "student", "student"]
    assert len(settles) == 4  # once before each stage in each round, after the warm-up
    assert samples["teacher"] == [[500.0] * 3, [500.0] * 2] and samples["student"] == [[125.0] * 3, [125.0] * 2]


def test_record_interleaves_the_stages_round_by_round():
    clock = FakeClock()
    stages = {n: clock.stage(n, 0.5) for n in ("a", "b", "c")}
    record(stages, [1, 1, 1], warmup=0, settle=lambda: None, clock=clock, prime=False)
    assert clock.calls == ["a", "b", "c"] * 3


def test_record_keeps_each_call_time_in_its_round():
    # with priming, each round's first call is untimed: 8 s then 0.5, 0.25 in round 1; 2 s then 0.125, 1 in round 2
    clock = FakeClock()
    samples = record({"s": clock.stage("s", [8.0, 0.5, 0.25, 2.0, 0.125, 1.0])}, [2, 2], warmup=0, settle=lambda: None,
                     clock=clock, prime=True)
    assert samples == {"s": [[500.0, 250.0], [125.0, 1000.0]]}
    clock = FakeClock()
    samples = record({"s": clock.stage("s", [8.0, 0.5, 0.25])}, [1, 2], warmup=0, settle=lambda: None, clock=clock,
                     prime=False)
    assert samples == {"s": [[8000.0], [500.0, 250.0]]}


def test_measure_uses_the_threads_and_no_grad_then_restores_them(monkeypatch):
    monkeypatch.setattr(profile, "_loadavg", lambda: 0.0)  # no /proc/stat reading and an idle load average: quiet
    model = Counting()
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    m = measure({"m": torch_timer(model, (3,))(2)}, rounds=3, total_calls=7, warmup=1, threads=wanted,
                read_stat=lambda: None, settle=lambda: None)
    assert len(model.calls) == 1 + 3 + 7  # warm-up, one untimed call per round, the timed calls
    assert set(model.threads) == {wanted} and not any(model.grad_enabled)
    assert torch.get_num_threads() == before and torch.is_grad_enabled()
    assert [len(r) for r in m.samples["m"]] == [3, 2, 2] and m.load["busy"] is False and "seconds" in m.load


def test_measure_without_priming():
    clock = FakeClock()
    m = measure({"x": clock.stage("x", 0.5)}, rounds=2, total_calls=2, warmup=0, threads=1, read_stat=lambda: None,
                settle=lambda: None, prime=False)
    assert clock.calls == ["x", "x"] and [len(r) for r in m.samples["x"]] == [1, 1]


def test_torch_threads_restores_the_count_even_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------- statistics
def test_summarize_on_controlled_samples():
    s = summarize([[1.0, 2.0, 3.0], [4.0, 5.0]])
    assert s["median"] == 3.0 and s["iqr"] == 2.0 and s["spread"] == pytest.approx(2 / 3)
    assert s["p95"] == pytest.approx(4.8) and s["round_medians"] == [2.0, 4.5] and s["calls"] == 5
    assert isinstance(s["calls"], int) and all(isinstance(s[k], float) for k in ("median", "p95", "iqr", "spread"))


def test_summarize_of_a_constant_stage_and_of_zeros():
    assert summarize([[2.0] * 4, [2.0]])["spread"] == 0.0
    z = summarize([[0.0, 0.0]])
    assert z["median"] == 0.0 and z["spread"] == 0.0  # no division by a zero median


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # the machine slows down in round 2: both stages are 10x slower there
    num = [[2.0, 2.0, 2.0], [20.0, 20.0], [2.0]]
    den = [[1.0, 1.0, 1.0], [10.0, 10.0], [1.0]]
    assert paired_ratio(num, den) == 2.0
    # not the ratio of the overall medians, which compares different moments:
    num, den = [[3.0], [30.0], [30.0]], [[1.0], [20.0], [1.0]]
    assert paired_ratio(num, den) == 3.0  # per round 3, 1.5, 30 -> 3
    assert float(np.median(sum(num, [])) / np.median(sum(den, []))) == 30.0


def test_paired_ratio_uses_the_median_of_each_round():
    num = [[1.0, 3.0, 100.0], [4.0, 4.0, 4.0]]  # the outlier does not move round 1's median (3)
    den = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert paired_ratio(num, den) == pytest.approx((3.0 + 2.0) / 2)  # two rounds: the mean of 3 and 2


def test_measurement_stats_keys_and_reliability():
    m = Measurement({"tight": [[10.0, 10.0, 11.0, 10.0]], "wide": [[1.0, 1.0, 10.0, 10.0]]}, QUIET)
    tight, wide = m.stats("tight"), m.stats("wide")
    assert set(tight) == STAT_KEYS and set(wide) == STAT_KEYS
    assert tight["reliable"] and tight["reasons"] == []
    assert not wide["reliable"] and wide["spread"] > MAX_SPREAD
    assert wide["reasons"] == [f"spread {wide['spread']:.0%} of the median"]
    lenient = Measurement(m.samples, QUIET, max_spread=10.0)
    assert lenient.stats("wide")["reliable"]


def test_a_busy_machine_makes_every_stage_unreliable_with_its_reason_first():
    m = Measurement({"tight": [[10.0, 10.0]], "wide": [[1.0, 1.0, 10.0, 10.0]]}, BUSY)
    assert m.stats("tight")["reasons"] == [BUSY["reason"]]
    wide = m.stats("wide")
    assert wide["reasons"][0] == BUSY["reason"] and len(wide["reasons"]) == 2 and not wide["reliable"]


def test_ratio_pairs_rounds_and_is_reliable_only_when_both_stages_are():
    # the machine is slower in round 2 (the teacher 2x, the student 1.5x)
    samples = {"teacher": [[8.0, 8.0], [16.0, 16.0], [8.0, 8.0]], "student": [[2.0, 2.0], [3.0, 3.0], [2.0, 2.0]],
               "noisy": [[1.0, 1.0, 9.0, 9.0], [1.0, 9.0], [1.0, 9.0]]}
    m = Measurement(samples, QUIET)
    assert m.stats("teacher")["reliable"] and m.stats("student")["reliable"] and not m.stats("noisy")["reliable"]
    assert m.ratio("teacher", "student") == (4.0, True)  # per round: 4, 5.33, 4 -> 4
    assert m.ratio("student", "teacher") == (0.25, True)
    value, ok = m.ratio("teacher", "noisy")
    assert value == pytest.approx(1.6) and ok is False  # round medians 8, 16, 8 over 5, 5, 5: 1.6, 3.2, 1.6 -> 1.6
    assert m.ratio("noisy", "student")[1] is False
    assert Measurement(samples, BUSY).ratio("teacher", "student") == (4.0, False)


# ---------------------------------------------------------------- machine load
def test_other_share_and_load_verdict_arithmetic():
    assert other_share((100.0, 1000.0), (150.0, 1100.0), own_seconds=10.0) == pytest.approx(0.4)
    assert other_share((0.0, 0.0), (5.0, 10.0), own_seconds=9.0) == 0.0  # clamped below
    assert other_share((0.0, 0.0), (5.0, 0.0), own_seconds=0.0) is None  # no time passed
    assert load_verdict(0.05, 0.01, 9.0, 2)["busy"] is False  # the probe decides, not the load average
    busy = load_verdict(0.5, 0.01, 0.1, 2)
    assert busy["busy"] and busy["reason"] == "machine busy: other processes used 50% of the CPU while measuring"
    assert load_verdict(0.105, 0.01, 0.1, 2)["busy"] is False  # within the probe's resolution of the limit
    assert load_verdict(None, 0.0, 3.0, 2)["busy"] and not load_verdict(None, 0.0, 1.5, 2)["busy"]
    assert load_verdict(0.9, 0.5, 1.0, 2)["busy"] is False  # too coarse a window: the load average (1 < 2) decides


def test_load_probe_with_a_fake_proc_stat():
    readings = iter([(1000.0, 2000.0), (1060.0, 2100.0)])  # 60 of 100 CPU seconds busy meanwhile
    with LoadProbe(lambda: next(readings)) as probe:
        pass
    r = probe.result
    assert r["busy"] is True and 0.55 < r["other_share"] <= 0.6 and r["seconds"] >= 0
    assert set(r) == {"other_share", "resolution", "loadavg_1min", "cpus", "busy", "reason", "seconds"}

def test_load_probe_without_proc_stat_decides_by_the_load_average(monkeypatch):
    for loadavg, busy in ((0.0, False), (1e6, True)):  # 1e6: above any number of cores
        monkeypatch.setattr(profile, "_loadavg", lambda: loadavg)
        with LoadProbe(lambda: None) as probe:
            pass
        assert probe.result["other_share"] is None and probe.result["busy"] is busy
        assert probe.result["loadavg_1min"] == loadavg


def test_measure_under_a_faked_busy_machine_makes_every_ratio_unreliable():
    readings = iter([(0.0, 0.0), (80.0, 100.0)])
    ran: list[str] = []
    m = measure({"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}, rounds=2, total_calls=2, warmup=0,
                threads=1, read_stat=lambda: next(readings), settle=lambda: None)
    assert ran == ["a", "a", "b", "b"] * 2
    assert m.load["busy"] and m.ratio("a", "b")[1] is False and not m.stats("a")["reliable"]


# ---------------------------------------------------------------- report fields
def test_stage_fields_has_the_keys_of_each_measurement_holding_the_stage():
    b1 = Measurement({"teacher": [[2.0, 4.0]], "student": [[1.0, 1.0]]}, QUIET)
    b32 = Measurement({"teacher": [[20.0, 20.0]]}, QUIET)
    assert stage_fields({"b1": b1, "b32": b32}, "student") == {
        "latency_ms_b1": 1.0, "latency_ms_b1_p95": 1.0, "latency_ms_b1_iqr": 0.0, "latency_b1_reliable": True}
    teacher = stage_fields({"b1": b1, "b32": b32}, "teacher")
    assert set(teacher) == {f"latency_ms_{l}{s}" for l in ("b1", "b32") for s in ("", "_p95", "_iqr")} | \
        {"latency_b1_reliable", "latency_b32_reliable"}
    assert teacher["latency_ms_b1"] == 3.0 and teacher["latency_ms_b32"] == 20.0
    assert stage_fields({"b1": b1}, "int8") == {}


def test_latency_section_lists_calls_rounds_and_reasons():
    b1 = Measurement({"teacher": [[2.0, 2.0], [3.0, 3.0]], "student": [[1.0, 1.0, 10.0, 10.0], [1.0, 1.0]]}, QUIET)
    b32 = Measurement({"teacher": [[20.0], [20.0]]}, BUSY)
    section = latency_section({"b1": b1, "b32": b32}, rounds=2, threads=1)
    assert section["rounds"] == 2 and section["threads"] == 1 and section["max_spread"] == MAX_SPREAD
    assert section["b1"]["calls_per_stage"] == 4 and section["b32"]["calls_per_stage"] == 2
    assert section["b1"]["round_medians_ms"] == {"teacher": [2.0, 3.0], "student": [5.5, 1.0]}
    assert section["b32"]["load"] == BUSY
    student_spread = b1.stats("student")["spread"]
    assert section["reliable"] is False
    # the busy machine is one reason for its label (not repeated for each of its stages), then each wide stage
    assert section["reasons"] == [f"b1 student: spread {student_spread:.0%} of the median", f"b32: {BUSY['reason']}"]
    quiet = latency_section({"b1": Measurement({"t": [[1.0, 1.0]]}, QUIET)})
    assert quiet["reliable"] is True and quiet["reasons"] == []


# ---------------------------------------------------------------- one stage alone
def test_torch_latency_counts_and_keys(monkeypatch):
    monkeypatch.setattr(profile, "settle_threads", lambda *a, **k: None)
    model = Counting()
    before = torch.get_num_threads()
    out = torch_latency(model, (3,), batch=4, threads=1, warmup=2, repeats=5)
    assert set(out) == {"p50", "p95"} and 0 <= out["p50"] <= out["p95"]
    assert model.calls == [(4, 3)] * (2 + 1 + 5)  # warm-up, one untimed call, the timed repeats
    assert set(model.threads) == {1} and not any(model.grad_enabled) and torch.get_num_threads() == before


def test_ort_latency_opens_a_session_with_the_threads_and_counts_runs(monkeypatch, tmp_path):
    import importlib

    profile_module = importlib.import_module("protege.evaluate.profile")
    session, opened = FakeSession(), []
    monkeypatch.setattr(profile_module, "ort_session", lambda path, threads: opened.append((path, threads)) or session)
    out = ort_latency(tmp_path / "m.onnx", (3,), batch=2, threads=1, warmup=1, repeats=4)
    assert opened == [(tmp_path / "m.onnx", 1)] and set(out) == {"p50", "p95"} and out["p50"] <= out["p95"]
    assert len(session.feeds) == 1 + 1 + 4 and all(f["pixels"].shape == (2, 3) for f in session.feeds)


def test_ort_latency_on_a_real_file(tmp_path):
    out = ort_latency(_onnx_doubler(tmp_path), (3,), batch=2, threads=1, warmup=1, repeats=3)
    assert set(out) == {"p50", "p95"} and all(math.isfinite(v) and v >= 0 for v in out.values())


# ---------------------------------------------------------------- waiting for spinning threads
class FakeTime:
    """perf_counter / process_time / sleep for settle_threads: the process uses ``cpu_per_s`` CPU seconds per second."""

    def __init__(self, cpu_per_s: float):
        self.wall = self.cpu = 0.0
        self.cpu_per_s = cpu_per_s
        self.sleeps: list[float] = []

    def perf_counter(self):
        return self.wall

    def process_time(self):
        return self.cpu

    def sleep(self, s):
        self.sleeps.append(s)
        self.wall += s
        self.cpu += s * self.cpu_per_s


@pytest.mark.parametrize("cpu_per_s, sleeps", [(0.0, 1), (0.2, 1), (0.5, 50), (1.0, 50)])
def test_settle_threads_returns_once_the_process_is_idle_or_after_max_s(monkeypatch, cpu_per_s, sleeps):
    fake = FakeTime(cpu_per_s)
    monkeypatch.setattr(profile, "time", fake)
    settle_threads(max_s=0.1, step_s=0.002)
    assert len(fake.sleeps) == pytest.approx(sleeps, abs=1) and set(fake.sleeps) == {0.002}
    assert fake.wall <= 0.1 + 0.002 + 1e-9


# ---------------------------------------------------------------- recording
@pytest.mark.parametrize("total, rounds, expected", [(50, 5, [10] * 5), (10, 5, [2] * 5), (7, 5, [2, 2, 1, 1, 1]),
                                                     (3, 5, [1] * 5), (1, 1, [1])])
def test_split_calls_spreads_the_total_over_the_rounds_at_least_one_each(total, rounds, expected):
    assert split_calls(total, rounds) == expected


def test_record_warms_up_each_stage_then_calls_them_round_robin():
    calls: list[str] = []
    stages = {n: (lambda n=n: calls.append(n)) for n in ("teacher", "student", "int8")}
    ticks = itertools.count()
    samples = record(stages, [2, 1], warmup=1, settle=lambda: calls.append("settle"), clock=lambda: float(next(ticks)))
    # each stage in a round: wait for the previous one's threads to settle, one untimed call, then the timed calls
    assert calls == ["teacher", "student", "int8",                                                       # warm-up
                     "settle", "teacher", "teacher", "teacher", "settle", "student", "student", "student",
                     "settle", "int8", "int8", "int8",                                                 # round 1
                     "settle", "teacher", "teacher", "settle", "student", "student", "settle", "int8", "int8"]  # round 2
    assert samples == {n: [[1e3, 1e3], [1e3]] for n in stages}  # milliseconds, grouped by round


def test_record_without_priming_makes_no_untimed_calls():
    """Slow calls (text generation, seconds each) are not primed: every call after the warm-up is timed."""
    calls: list[str] = []
    stages = {n: (lambda n=n: calls.append(n)) for n in ("teacher", "student")}
    ticks = itertools.count()
    samples = record(stages, [1, 1], warmup=0, settle=lambda: None, clock=lambda: float(next(ticks)), prime=False)
    assert calls == ["teacher", "student", "teacher", "student"] and samples == {n: [[1e3], [1e3]] for n in stages}


def test_measure_times_every_stage_in_every_round_and_probes_the_load():
    calls: list[str] = []
    m = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, total_calls=3, warmup=0,
                threads=1, read_stat=lambda: None, settle=lambda: None)
    assert calls == ["a", "a", "b", "b"] * 3  # each round: one untimed call after the switch, one timed
    assert [len(r) for r in m.samples["a"]] == [1, 1, 1] and "busy" in m.load and "seconds" in m.load


# ---------------------------------------------------------------- statistics
def test_summarize_median_quartiles_p95_spread_and_round_medians():
    s = summarize([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    assert s["median"] == pytest.approx(4.5)
    assert s["iqr"] == pytest.approx(6.25 - 2.75)            # linear-interpolated quartiles of 1..8
    assert s["spread"] == pytest.approx(3.5 / 4.5)
    assert s["p95"] == pytest.approx(7.65)
    assert s["round_medians"] == [2.5, 6.5] and s["calls"] == 8


def test_ratio_is_paired_by_round_not_a_ratio_of_medians_taken_at_different_moments():
    teacher = [[10.0], [20.0], [30.0]]
    student = [[1.0], [4.0], [5.0]]
    assert paired_ratio(teacher, student) == pytest.approx(6.0)   # median of 10, 5, 6 (ratio of medians: 20 / 4 = 5)
    # a slow moment of the machine hits every stage in that round alike, and the paired ratio does not move
    assert paired_ratio([[1.0], [100.0], [1.0]], [[0.1], [10.0], [0.1]]) == pytest.approx(10.0)


# ---------------------------------------------------------------- the load probe
def test_proc_stat_times_reads_busy_and_total_including_steal(tmp_path):
    f = tmp_path / "stat"
    f.write_text("cpu  100 10 50 800 20 3 5 12 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    tick = profile.os.sysconf("SC_CLK_TCK")
    busy, total = proc_stat_times(str(f))
    assert busy == pytest.approx((100 + 10 + 50 + 3 + 5 + 12) / tick)     # user nice system irq softirq steal
    assert total == pytest.approx((100 + 10 + 50 + 800 + 20 + 3 + 5 + 12) / tick)
    assert proc_stat_times(str(tmp_path / "missing")) is None


def test_other_share_subtracts_this_process_and_clamps():
    assert other_share((10.0, 100.0), (15.0, 110.0), own_seconds=1.0) == pytest.approx(0.4)
    assert other_share((10.0, 100.0), (15.0, 110.0), own_seconds=9.0) == 0.0
    assert other_share((10.0, 100.0), (10.0, 100.0), own_seconds=0.0) is None


def _fake_stat(after_busy: float):
    readings = iter([(100.0, 1000.0), (100.0 + after_busy, 1020.0)])  # 20 s of all CPUs' time between the two
    return lambda: next(readings)


def test_load_probe_with_a_faked_busy_proc_stat_marks_the_machine_busy():
    with LoadProbe(_fake_stat(8.6)) as probe:
        pass
    assert probe.result["busy"] and probe.result["other_share"] == pytest.approx(0.43, abs=0.01)
    assert probe.result["reason"] == "machine busy: other processes used 43% of the CPU while measuring"
    with LoadProbe(_fake_stat(0.2)) as quiet:
        pass
    assert not quiet.result["busy"] and quiet.result["reason"] is None


def test_measure_under_a_faked_busy_machine_marks_every_stage_and_the_section():
    m = measure({"teacher": lambda: None, "student": lambda: None}, rounds=2, total_calls=2, warmup=0, threads=1,
                read_stat=_fake_stat(8.6), settle=lambda: None)
    fields = stage_fields({"b1": m}, "teacher")
    assert set(fields) == {"latency_ms_b1", "latency_ms_b1_p95", "latency_ms_b1_iqr", "latency_b1_reliable"}
    assert fields["latency_b1_reliable"] is False
    section = latency_section({"b1": m}, rounds=2)
    assert section["reliable"] is False and section["rounds"] == 2 and section["b1"]["calls_per_stage"] == 2
    assert section["reasons"][0] == "b1: machine busy: other processes used 43% of the CPU while measuring"


def test_without_proc_stat_the_load_average_against_the_cores_decides(monkeypatch):
    monkeypatch.setattr(profile, "_loadavg", lambda: 5.0)
    with LoadProbe(lambda: None) as probe:
        pass
    assert probe.result["busy"] and "load average 5.0 above its" in probe.result["reason"]
    assert not load_verdict(None, 0.0, 0.5, 2)["busy"]
    assert load_verdict(0.9, 0.5, 5.0, 2)["busy"]    # a window too short for /proc/stat: the load average decides


class _FakeTime:
    """time for settle_threads: sleeping advances the wall clock, and this process's CPU time by ``spinning`` CPUs."""

    def __init__(self, spinning: float):
        self.wall = self.cpu = 0.0
        self.spinning, self.sleeps = spinning, 0

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu

    def sleep(self, s: float) -> None:
        self.wall, self.cpu, self.sleeps = self.wall + s, self.cpu + self.spinning * s, self.sleeps + 1


@pytest.mark.parametrize("spinning, sleeps", [(0.0, 1), (0.1, 1), (1.0, 50), (2.0, 50)])
def test_settle_threads_waits_while_the_process_spins_at_most_max_s(monkeypatch, spinning, sleeps):
    fake = _FakeTime(spinning)
    monkeypatch.setattr(profile, "time", fake)
    profile.settle_threads(max_s=0.1, step_s=0.002)
    assert fake.sleeps == sleeps  # quiet: one short sleep; a thread still spinning: waited for, up to max_s
