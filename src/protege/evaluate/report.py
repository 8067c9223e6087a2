"""report.json and the terminal table."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_report(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


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


def format_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"protege report: {report.get('name', '')}")
    cols = [("model", None), ("runtime", None), ("accuracy", "pct"), ("macro-F1", "pct"), ("agreement", "pct"),
            ("params", "int"), ("size", "kb"), ("p50 b1 ms", "f"), ("p50 b32 ms", "f")]
    for c, _ in cols:
        table.add_column(c, justify="left" if c in ("model", "runtime") else "right")
    for e in report.get("stages") or [dict(report[k], name=k) for k in ("teacher", "student", "student_onnx") if report.get(k)]:
        key = e["name"]
        vals = [e.get("accuracy"), e.get("macro_f1"), e.get("agreement"), e.get("params"), e.get("bytes"),
                e.get("latency_ms_b1"), e.get("latency_ms_b32")]
        table.add_row(key, e.get("runtime", ""), *(_fmt(v, k) for v, (_, k) in zip(vals, cols[2:])))
    table.caption = (f"compression {report.get('compression_ratio', 0):.1f}x params, {report.get('bytes_ratio', 0):.1f}x bytes; "
                     f"speedup b1 {report.get('speedup_b1', 0):.1f}x ({report.get('deployed', 'student ONNX')} vs teacher); "
                     f"ONNX max |diff| {report.get('onnx_max_abs_diff', float('nan')):.2e}")
    return table


def print_report(report: dict[str, Any]) -> None:
    import sys

    Console(width=None if sys.stdout.isatty() else 140).print(format_table(report))
