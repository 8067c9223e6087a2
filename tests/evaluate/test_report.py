"""The terminal table (protege.evaluate.report.format_table): unreliable latency marked, the speedup not
headlined, and old reports without the latency section."""
from __future__ import annotations

import copy

from rich.console import Console

import json

import pytest

from protege.errors import RunError
from protege.evaluate.html import render_html
from protege.evaluate.report import CLASSIFY_COLUMNS, LM_COLUMNS, Report, Stage, cell, format_table, read_report, write_report

from ..helpers import sample_report as _report


# ---------------------------------------------------------------- the mark in the report
def _table_text(report: dict) -> str:
    console = Console(record=True, width=240)
    console.print(format_table(Report.model_validate(report)))
    return " ".join(console.export_text().split())  # the caption wraps at the table's width


def test_terminal_table_marks_unreliable_latency_and_does_not_headline_the_speedup():
    text = _table_text(_report(False))
    assert "296.0?" in text and "22.0?" not in text        # only the unreliable batch size is marked
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
    assert "?" not in _table_text(old) and 'class="unreliable"' not in render_html(Report.model_validate(old))


# ---------------------------------------------------------------- the typed report
def test_report_json_round_trips_and_keeps_only_what_was_measured(tmp_path):
    report = Report.model_validate(_report(False))
    report.stages[0].accuracy = float("nan")          # a figure that could not be measured
    write_report(tmp_path / "report.json", report)
    text = (tmp_path / "report.json").read_text()
    data = json.loads(text)
    assert "NaN" not in text and data["stages"][0]["accuracy"] is None
    assert "agreement" not in data["stages"][0] and "test_ppl" not in data["stages"][0]  # not measured: absent
    back = read_report(tmp_path / "report.json", "fix")
    assert back.stages[1] == report.stages[1] and back.latency.label("b1") == {"calls_per_stage": 50}


@pytest.mark.parametrize("content, words", [
    ("{not json", ["damaged or unreadable", "JSONDecodeError"]),
    ('{"stages": [{"name": "a", "accuracy": "n/a"}]}', ["not a protege report", "stages.0.accuracy"]),
    ('{"name": "x", "unknown_field": 1}', ["not a protege report", "unknown_field"]),
])
def test_a_damaged_or_foreign_report_is_a_one_line_error(tmp_path, content, words):
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(RunError) as info:
        read_report(path, "rewrite it with `protege evaluate RUN`")
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(path) in message and "protege evaluate" in message
    assert all(w in message for w in words), message


def test_one_row_formatter_serves_the_table_and_the_page():
    report = Report.model_validate(_report(False))
    text, page = _table_text(_report(False)), render_html(report)
    for row in report.stages:
        for col in ("accuracy", "params", "latency_ms_b1"):
            shown = cell(row, next(c for c in CLASSIFY_COLUMNS if c.key == col)).text
            assert shown in text and shown in page, (row.name, col, shown)


def test_a_causal_lm_report_renders_its_own_columns():
    lm = Report(name="lm", task="causal_lm", teacher=Stage(test_ppl=27.7, params=38016, bytes=155928, tokens_per_s=503.7,
                                                                   generation_reliable=False),
                student=Stage(test_ppl=14.22, params=19456, bytes=79928, tokens_per_s=766.9, generation_reliable=True),
                compression_ratio=1.954, speedup_generation=1.52, speedup_generation_reliable=False)
    console = Console(record=True, width=240)
    console.print(format_table(lm))
    text = console.export_text()
    assert [r.name for r in lm.rows()] == ["teacher", "student"]
    assert all(c.header in text for c in LM_COLUMNS) and "accuracy" not in text
    assert "27.70" in text and "503.7?" in text and "766.9?" not in text   # the teacher's speed was marked unreliable
    assert "compression 2.0x params" in text and "unreliable, 1.5x measured" in text
