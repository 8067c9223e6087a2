"""Trustworthy latency: interleaved rounds, statistics from recorded samples, the load probe, the reliability mark
in report.json, the terminal table and report.html. No test here depends on how fast anything runs."""
from __future__ import annotations

import copy
import itertools

import pytest
from rich.console import Console

from protege.errors import RecipeError
from protege.evaluate import profile
from protege.evaluate.html import render_html
from protege.evaluate.profile import (LoadProbe, Measurement, latency_section, load_verdict, measure, other_share,
                                      paired_ratio, proc_stat_times, record, split_calls, stage_fields, summarize)
from protege.evaluate.report import format_table
from protege.recipe import parse_recipe

QUIET = {"other_share": 0.01, "resolution": 0.001, "loadavg_1min": 0.3, "cpus": 2, "busy": False, "reason": None}
BUSY = load_verdict(0.43, 0.001, 2.5, 2)


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


def test_a_tight_figure_is_reliable_and_a_wide_one_is_not():
    tight, wide = [[1.0, 1.01, 0.99]] * 3, [[1.0, 3.0, 0.3], [0.5, 2.0, 1.0]]
    m = Measurement({"tight": tight, "wide": wide}, dict(QUIET))
    assert m.stats("tight")["reliable"] and m.stats("tight")["reasons"] == []
    bad = m.stats("wide")
    assert not bad["reliable"] and bad["reasons"] == [f"spread {bad['spread']:.0%} of the median"]
    assert m.ratio("tight", "tight")[1] is True
    assert m.ratio("wide", "tight")[1] is False and m.ratio("tight", "wide")[1] is False  # either figure spoils a ratio


def test_a_busy_machine_makes_every_figure_unreliable():
    m = Measurement({"a": [[1.0, 1.0]] * 3, "b": [[2.0, 2.0]] * 3}, BUSY)
    for name in ("a", "b"):
        assert m.stats(name)["reasons"] == ["machine busy: other processes used 43% of the CPU while measuring"]
    assert m.ratio("b", "a") == (pytest.approx(2.0), False)


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


# ---------------------------------------------------------------- the mark in the report
def _report(reliable: bool) -> dict:
    def stage(name: str, runtime: str, b1: float, b32: float) -> dict:
        return {"name": name, "runtime": runtime, "accuracy": 0.9, "params": 100, "bytes": 1000,
                "latency_ms_b1": b1, "latency_ms_b1_p95": b1, "latency_ms_b1_iqr": 0.0, "latency_b1_reliable": reliable,
                "latency_ms_b32": b32, "latency_ms_b32_p95": b32, "latency_ms_b32_iqr": 0.0, "latency_b32_reliable": True}
    reasons = [] if reliable else ["b1: machine busy: other processes used 43% of the CPU while measuring",
                                   "b1 teacher: spread 38% of the median"]
    return {"name": "r", "stages": [stage("teacher", "pytorch", 296.0, 22.0), stage("int8 (static)", "onnxruntime", 0.047, 1.0)],
            "deployed": "int8 (static)", "compression_ratio": 40.0, "bytes_ratio": 10.0, "onnx_max_abs_diff": 1e-6,
            "speedup_b1": 6319.0, "speedup_b1_reliable": reliable, "speedup_b32": 22.0, "speedup_b32_reliable": True,
            "latency": {"rounds": 5, "threads": 2, "b1": {"calls_per_stage": 50}, "b32": {"calls_per_stage": 10},
                        "reliable": reliable, "reasons": reasons}}


def _table_text(report: dict) -> str:
    console = Console(record=True, width=240)
    console.print(format_table(report))
    return console.export_text()


def test_terminal_table_marks_unreliable_latency_and_does_not_headline_the_speedup():
    text = _table_text(_report(False))
    assert "296.000?" in text and "22.000?" not in text        # only the unreliable batch size is marked
    assert "speedup b1 unreliable, 6319.0x measured" in text
    assert "machine busy: other processes used 43% of the CPU while measuring" in text
    assert "spread 38% of the median" in text
    clean = _table_text(_report(True))
    assert "?" not in clean and "speedup b1 6319.0x" in clean and "unreliable" not in clean


def test_report_html_marks_unreliable_latency_with_the_reasons():
    page = render_html(_report(False))
    assert '<td class="unreliable"' in page and "296.0?</td>" in page
    assert 'id="latency-warning"' in page and "machine busy: other processes used 43% of the CPU while measuring" in page
    assert "unreliable, 6319.0x measured" in page and "batch 32 <strong>22.0x</strong>" in page
    clean = render_html(_report(True))
    assert 'class="unreliable"' not in clean and "latency-warning" not in clean and "<strong>6319.0x</strong>" in clean


def test_old_reports_without_the_latency_section_still_render():
    old = copy.deepcopy(_report(True))
    del old["latency"]
    for s in old["stages"]:
        del s["latency_b1_reliable"], s["latency_b32_reliable"]
    assert "?" not in _table_text(old) and 'class="unreliable"' not in render_html(old)


def test_rounds_zero_is_a_recipe_error(tiny):
    tiny["eval"]["rounds"] = 0
    with pytest.raises(RecipeError, match=r"field 'eval.rounds' is 0"):
        parse_recipe(tiny, "r.yaml")
    tiny["eval"]["rounds"] = 3
    assert parse_recipe(tiny).eval.rounds == 3



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
