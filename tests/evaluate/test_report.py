"""The terminal table (protege.evaluate.report.format_table): unreliable latency marked, the speedup not
headlined, and old reports without the latency section."""
from __future__ import annotations

import copy

from rich.console import Console

from protege.evaluate.html import render_html
from protege.evaluate.report import format_table

from ..helpers import sample_report as _report


# ---------------------------------------------------------------- the mark in the report
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
