"""The terminal table (protege.evaluate.report.format_table): unreliable latency marked, the speedup not
headlined, and old reports without the latency section."""
from __future__ import annotations

import copy

from rich.console import Console

from protege.evaluate.html import render_html
from protege.evaluate.report import format_table


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


def test_old_reports_without_the_latency_section_still_render():
    old = copy.deepcopy(_report(True))
    del old["latency"]
    for s in old["stages"]:
        del s["latency_b1_reliable"], s["latency_b32_reliable"]
    assert "?" not in _table_text(old) and 'class="unreliable"' not in render_html(old)
