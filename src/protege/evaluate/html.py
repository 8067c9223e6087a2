"""report.html: one self-contained page (table, hand-written SVG plots, no scripts, no network)."""
from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Callable

from ..files import write_atomic
from .report import CLASSIFY_COLUMNS, Column, Quantization, Report, Stage, number, cell, columns, fmt, speedup_text

W, H = 560, 380                      # svg size
ML, MR, MT, MB = 62, 20, 52, 52      # margins: left, right, top, bottom

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1200px; padding: 0 16px; color: #222; }
h1 { margin-bottom: 4px; } .sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 12px 0; font-size: 14px; }
th, td { border-bottom: 1px solid #ddd; padding: 5px 10px; text-align: right; white-space: nowrap; }
th { background: #f3f4f6; } td.l, th.l { text-align: left; }
.note { color: #666; font-size: 12px; white-space: normal; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; } figure { margin: 0; }
figcaption { font-size: 13px; color: #555; max-width: 560px; }
svg { background: #fff; border: 1px solid #ddd; font-size: 11px; }
.grid { stroke: #eee; } .axis { stroke: #444; } .front-line { stroke: #1f6feb; stroke-width: 2; fill: none; }
circle.point, circle.legend { fill: #fff; stroke: #888; stroke-width: 1.5; }
circle.pareto, circle.legend-front { fill: #1f6feb; stroke: #1f6feb; }
.unreliable { color: #b45309; } .warn { color: #b45309; }
footer { margin-top: 28px; padding-top: 8px; border-top: 1px solid #ddd; color: #555; font-size: 13px; }
"""


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates; x smaller is better, y larger is better."""
    front = []
    for i, (xi, yi) in enumerate(points):
        if not any(xj <= xi and yj >= yi and (xj < xi or yj > yi) for j, (xj, yj) in enumerate(points) if j != i):
            front.append(i)
    return front


def _cell(row: Stage, col: Column) -> str:
    """One table cell; a latency the measurement marked unreliable gets a "?" and the class "unreliable"."""
    c = cell(row, col)
    if c.unreliable:
        return f'<td class="unreliable" title="unreliable: see the latency note below the table">{escape(c.text)}</td>'
    return f"<td>{escape(c.text)}</td>"


def _latency_note(report: Report) -> str:
    """How latency was measured, the two speedups (or "unreliable"), and why figures marked ? are unreliable."""
    lat = report.latency
    if lat is None:
        return '<p class="note">Latency: wall-clock per batch, p50 and p95.</p>'
    calls = [lat.label(b).get("calls_per_stage", "?") for b in ("b1", "b32")]
    how = (f"Latency: wall-clock per batch in {escape(str(lat.rounds))} interleaved rounds (every stage in turn, "
           f"then again), {escape(str(calls[0]))} calls per stage at batch 1 and {escape(str(calls[1]))} at batch 32, "
           f"{escape(str(lat.threads))} threads; p50 and p95 over all calls. Speedup of the deployed stage over "
           f"the teacher (median of per-round ratios): batch 1 <strong>{escape(speedup_text(report, 'speedup_b1'))}"
           f"</strong>, batch 32 <strong>{escape(speedup_text(report, 'speedup_b32'))}</strong>.")
    out = f'<p class="note">{how}</p>'
    if not lat.reliable:
        out += (f'<p class="warn" id="latency-warning"><strong>Figures marked ? are unreliable</strong>: '
                f"{escape('; '.join(lat.reasons))}. Measure again on a quiet machine (<code>protege evaluate RUN</code>) "
                "before quoting them.</p>")
    return out


def _table(rows: list[Stage], cols: list[Column]) -> str:
    head = '<th class="l">stage</th><th class="l">runtime</th>'
    head += "".join(f"<th>{escape(c.header)}</th>" for c in cols)
    out = []
    for s in rows:
        note = f'<div class="note">{escape(s.note)}</div>' if s.note else ""
        cells = "".join(_cell(s, c) for c in cols)
        out.append(f'<tr><td class="l">{escape(s.name or "?")}{note}</td>'
                   f'<td class="l">{escape(s.runtime or "-")}</td>{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(out)}</tbody></table>"


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade inside [lo, hi] (every integer multiple when that gives fewer than 3)."""
    for mults in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in mults]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 3:
            break
    return ticks


def _lin_ticks(lo: float, hi: float) -> list[float]:
    raw = (hi - lo) / 5
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _plot(pid: str, title: str, xlabel: str, stages: list[Stage], xof: Callable[[Stage], float | None]) -> str:
    """Accuracy (%) against a positive x on a log axis; the Pareto front filled and joined by a step line."""
    pts = [(x, 100 * a, s.name or "?") for s in stages
           if (x := xof(s)) is not None and x > 0 and (a := number(s.accuracy)) is not None]
    out = [f'<svg id="{pid}" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
           f'<text x="{ML}" y="20" font-size="14" font-weight="600">{escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data to plot</text></svg>')
        return "".join(out)
    lx = [math.log10(p[0]) for p in pts]
    x0, x1 = min(lx), max(lx)
    pad = max(0.12 * (x1 - x0), 0.15)
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    ypad = max(0.1 * (y1 - y0), 0.5)
    y0, y1 = y0 - ypad, y1 + ypad
    px = lambda v: ML + (math.log10(v) - x0) / (x1 - x0) * (W - ML - MR)  # noqa: E731
    py = lambda v: H - MB - (v - y0) / (y1 - y0) * (H - MT - MB)  # noqa: E731
    for t in _log_ticks(10 ** x0, 10 ** x1):
        out.append(f'<line class="grid" x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{MT}" y2="{H - MB}"/>'
                   f'<text x="{px(t):.1f}" y="{H - MB + 16}" text-anchor="middle">{t:g}</text>')
    for t in _lin_ticks(y0, y1):
        out.append(f'<line class="grid" x1="{ML}" x2="{W - MR}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                   f'<text x="{ML - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    out.append(f'<polyline class="axis" fill="none" points="{ML},{MT} {ML},{H - MB} {W - MR},{H - MB}"/>'
               f'<text x="{(ML + W - MR) / 2}" y="{H - 14}" text-anchor="middle" font-size="12">{escape(xlabel)}</text>'
               f'<text transform="translate(16 {(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">accuracy (%)</text>')
    front = set(pareto_front([(p[0], p[1]) for p in pts]))
    steps = sorted((pts[i] for i in front), key=lambda p: (p[0], p[1]))
    if len(steps) > 1:
        path = [f"{px(steps[0][0]):.1f},{py(steps[0][1]):.1f}"]
        for a, b in zip(steps, steps[1:]):
            path += [f"{px(b[0]):.1f},{py(a[1]):.1f}", f"{px(b[0]):.1f},{py(b[1]):.1f}"]
        out.append(f'<polyline class="front-line" points="{" ".join(path)}"/>')
    placed: list[tuple[float, float, float]] = []   # label boxes: x-left, y-baseline, width
    for i, (x, y, name) in sorted(enumerate(pts), key=lambda e: py(e[1][1])):
        cx, cy = px(x), py(y)
        cls = "point pareto" if i in front else "point"
        out.append(f'<circle class="{cls}" data-stage="{escape(name)}" cx="{cx:.1f}" cy="{cy:.1f}" r="5">'
                   f'<title>{escape(name)}: {y:.2f}% at {x:g}</title></circle>')
        w = 6.2 * len(name)
        lx0, anchor = (cx + 8, "start") if cx + 8 + w <= W - MR else (cx - 8 - w, "end")
        ly = cy - 7
        while any(abs(ly - b) < 12 and lx0 < a + bw and a < lx0 + w for a, b, bw in placed):
            ly += 13
        placed.append((lx0, ly, w))
        tx = lx0 if anchor == "start" else lx0 + w
        out.append(f'<text x="{tx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{escape(name)}</text>')
    lgx, lgy = ML + 4, 38   # legend in the top margin, clear of the data
    out.append(f'<line class="front-line" x1="{lgx}" x2="{lgx + 18}" y1="{lgy}" y2="{lgy}"/>'
               f'<circle class="legend legend-front" cx="{lgx + 9}" cy="{lgy}" r="4"/>'
               f'<text x="{lgx + 24}" y="{lgy + 4}">Pareto front</text>'
               f'<circle class="legend" cx="{lgx + 119}" cy="{lgy}" r="4"/>'
               f'<text x="{lgx + 128}" y="{lgy + 4}">dominated</text></svg>')
    return "".join(out)


def _quantization(q: Quantization) -> str:
    nested = ("candidates", "scheme", "verification", "config", "failed")
    facts = ", ".join(f"{escape(str(k))}: <strong>{escape(str(v))}</strong>" for k, v in q.model_dump().items()
                      if k not in nested and v is not None)
    table = _table([Stage.of(c) for c in q.candidates], CLASSIFY_COLUMNS) if q.candidates else ""
    return f"<h2>Quantization</h2><p>{facts}</p>{_int8_file(q)}{table}"


def _int8_file(q: Quantization) -> str:
    """The deployed int8 file's scheme, whether it is portable, and the CPU its kernels were checked on."""
    sch, ver = q.scheme, q.verification
    if not isinstance(sch, dict):
        return ""
    mark = "portable" if sch.get("portable") else "not portable"
    out = (f'<p class="int8">int8 file: {escape(str(sch.get("mode")))}, {escape(str(sch.get("weights")))}, uint8 activations: '
           f'<strong>{mark}</strong> ({escape(str(sch.get("portable_why")))}).')
    if isinstance(ver, dict):
        q_err = number(ver.get("max_abs_diff_fp32"))
        out += (f" Its int8 kernels were checked against the exact arithmetic of its QDQ graph on {escape(str(ver.get('cpu')))} "
                f"({escape(' '.join(map(str, ver.get('cpu_flags') or [])))}; {escape(str(ver.get('int8_kernels')))}): "
                f"{ver.get('predictions_changed')} of {ver.get('predictions')} validation predictions changed, largest output "
                f"difference {fmt(ver.get('max_abs_diff'), 'ms')}" + (f" (its quantization error: {fmt(q_err, 'ms')})" if q_err is not None else "") + ".")
    return out + "</p>"


def render_html(report: Report) -> str:
    """The whole report as one HTML page with no external resources."""
    name = escape(report.name)
    stages = report.rows()
    n = report.test_examples
    sub = escape(report.data or "") + (f" &middot; {n:,} test examples" if n is not None else "")
    plots = (_plot("plot-latency", "Accuracy vs batch-1 latency", "batch-1 latency p50 (ms, log scale)", stages,
                   lambda s: number(s.latency_ms_b1)),
             _plot("plot-size", "Accuracy vs size", "size (kB, log scale)", stages,
                   lambda s: None if (b := number(s.bytes)) is None else b / 1024))
    q, notes = report.quantization, report.notes
    env = report.environment.model_dump(exclude_unset=True) if report.environment else {}
    env_txt = " &middot; ".join(f"{escape(str(k))}: {escape(str(v))}" for k, v in env.items()) or "-"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>protege report: {name}</title><style>{CSS}</style></head><body>",
        f"<h1>protege report: {name}</h1>", f'<p class="sub">{sub}</p>',
        "<h2>Stages</h2>", _table(stages, columns(report)),
        '<p class="note">Agreement: share of test examples where the stage predicts the same class as the teacher.</p>',
        _latency_note(report),
        "<h2>Trade-offs</h2>",
        f'<div class="plots"><figure>{plots[0]}</figure><figure>{plots[1]}</figure></div>',
        '<p class="note">Filled points joined by the step line are the Pareto front: no other stage is at least as '
        "accurate and at least as fast (or small), and strictly better in one.</p>",
        _quantization(q) if q is not None else "",
        f"<h2>Notes</h2><p>{escape(str(notes))}</p>" if notes else "",
        f"<footer>Environment: {env_txt}</footer>", "</body></html>", ""])


def write_html(path: Path, report: Report) -> Path:
    """Write render_html(report) to path atomically (a .tmp file, then a rename)."""

    path = Path(path)
    write_atomic(path, render_html(report))
    return path
