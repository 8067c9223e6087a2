"""report.json and the terminal table."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..files import finite_json, write_atomic


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write report.json atomically; a NaN or inf figure becomes null (strict JSON)."""

    write_atomic(path, json.dumps(finite_json(report), indent=2, allow_nan=False))


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.2f}%"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "kb":
        return f"{v / 1024:.1f} kB"
    return f"{v:.3f}"


def _latency_cell(e: dict[str, Any], label: str) -> str:
    """A p50 with a "?" suffix when the measurement marked it unreliable."""
    text = _fmt(e.get(f"latency_ms_{label}"), "f")
    return text + "?" if e.get(f"latency_{label}_reliable") is False else text


def speedup_text(report: dict[str, Any], key: str) -> str:
    """"12.3x", or "unreliable, 12.3x measured" when the report marks that speedup unreliable; "-" when absent."""
    v = report.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "-"
    return f"unreliable, {v:.1f}x measured" if report.get(f"{key}_reliable") is False else f"{v:.1f}x"


def latency_footnote(report: dict[str, Any]) -> str:
    """Why latency figures are marked "?": the reasons in the report's latency section ("" when all are reliable)."""
    lat = report.get("latency") or {}
    if lat.get("reliable", True):
        return ""
    return "? unreliable latency: " + "; ".join(str(r) for r in lat.get("reasons") or [])


def format_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"protege report: {report.get('name', '')}")
    cols = [("model", None), ("runtime", None), ("accuracy", "pct"), ("macro-F1", "pct"), ("agreement", "pct"),
            ("params", "int"), ("size", "kb"), ("p50 b1 ms", "f"), ("p50 b32 ms", "f")]
    for c, _ in cols:
        table.add_column(c, justify="left" if c in ("model", "runtime") else "right")
    for e in report.get("stages") or [dict(report[k], name=k) for k in ("teacher", "student", "student_onnx") if report.get(k)]:
        vals = [e.get("accuracy"), e.get("macro_f1"), e.get("agreement"), e.get("params"), e.get("bytes")]
        table.add_row(e["name"], e.get("runtime", ""), *(_fmt(v, k) for v, (_, k) in zip(vals, cols[2:])),
                      _latency_cell(e, "b1"), _latency_cell(e, "b32"))
    caption = (f"compression {report.get('compression_ratio', 0):.1f}x params, {report.get('bytes_ratio', 0):.1f}x bytes; "
               f"speedup b1 {speedup_text(report, 'speedup_b1')} ({report.get('deployed', 'student ONNX')} vs teacher); "
               f"ONNX max |diff| {report.get('onnx_max_abs_diff', float('nan')):.2e}")
    note = latency_footnote(report)
    scheme = (report.get("quantization") or {}).get("scheme")
    if isinstance(scheme, dict):
        caption += (f"\nint8: {scheme.get('weights')}: {'portable' if scheme.get('portable') else 'not portable'} "
                    f"({scheme.get('portable_why')})")
    table.caption = caption + ("\n" + note if note else "")
    return table


def print_report(report: dict[str, Any]) -> None:
    import sys

    Console(width=None if sys.stdout.isatty() else 140).print(format_table(report))
