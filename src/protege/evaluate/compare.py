"""Seeds side by side: a distilled student and its matched labels-only baseline, paired by seed (same initial weights,
same data order), summarised as mean +- std for each, the paired difference with its spread and 95% interval, and a
plain verdict; and the page that plots every seed's points (summary.json, report.html of a `--seeds` run)."""
from __future__ import annotations

import math
import statistics
from html import escape
from typing import Optional

from .html import CSS, H, MB, ML, MR, MT, W, _lin_ticks

KINDS = ("distilled", "baseline")
FIGURES = {"val_selected": "validation-selected epoch", "last_epoch": "last epoch"}


def mean_std(xs: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def paired(a: list[float], b: list[float]) -> dict:
    """a - b paired by position: mean, std and the two-sided 95% t interval of the mean (None for one pair)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    out = {**mean_std(diffs), "diffs": diffs, "ci95": None}
    if len(diffs) > 1:
        from scipy.stats import t  # (scipy comes with scikit-learn)

        half = float(t.ppf(0.975, len(diffs) - 1)) * out["std"] / math.sqrt(len(diffs))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def verdict(diff: dict, what: str = "distillation", test_examples: Optional[int] = None) -> str:
    """One sentence on a paired difference of accuracies (fractions): helped, hurt, or no measurable gain. The interval
    covers the spread between seeds on one test set; a mean difference under one test example is no gain either way."""
    m, s, n, ci = 100 * diff["mean"], 100 * diff["std"], diff["n"], diff["ci95"]
    if ci is None:
        return f"one seed: {what} {m:+.2f} points against the baseline; no spread to judge it by (use --seeds 3 or more)"
    lo, hi = 100 * ci[0], 100 * ci[1]
    spread = f"{m:+.2f} ± {s:.2f} points over {n} seeds (paired by seed; 95% interval {lo:+.2f} to {hi:+.2f})"
    if test_examples and abs(diff["mean"]) * test_examples < 1:
        return f"no measurable gain from {what}: {spread}, less than one of {test_examples} test examples"
    if lo > 0:
        return f"{what} helped: {spread}"
    if hi < 0:
        return f"{what} hurt: {spread}"
    return f"no measurable gain from {what}: {spread}"


def summarise(rows: list[dict], test_examples: Optional[int] = None) -> dict:
    """``rows``: one per seed, ``{"seed", "distilled": {...}, "baseline": {...} or None}``, each run holding
    ``test_accuracy`` (validation-selected epoch) and ``last_epoch_test_accuracy``. Returns the figures per kind,
    the paired differences and the verdict (on the validation-selected figures)."""
    out: dict = {"seeds": [r["seed"] for r in rows], "runs": rows}
    keys = {"val_selected": "test_accuracy", "last_epoch": "last_epoch_test_accuracy"}
    for kind in KINDS:
        if all(r.get(kind) for r in rows):
            out[kind] = {fig: mean_std([r[kind][key] for r in rows]) for fig, key in keys.items()}
    if "baseline" in out:
        out["difference"] = {fig: paired([r["distilled"][key] for r in rows], [r["baseline"][key] for r in rows])
                             for fig, key in keys.items()}
        out["verdict"] = verdict(out["difference"]["val_selected"], test_examples=test_examples)
    return out


def _pct(ms: dict) -> str:
    return f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f}"


def _plot(summary: dict) -> str:
    """Test accuracy (%) of every seed's runs, the distilled and the baseline student of one seed joined by a line."""
    rows = summary["runs"]
    pts = [(i, kind, 100 * r[kind]["test_accuracy"]) for i, r in enumerate(rows) for kind in KINDS if r.get(kind)]
    ys = [p[2] for p in pts]
    y0, y1 = min(ys), max(ys)
    pad = max(0.15 * (y1 - y0), 0.25)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda i: ML + (i + 0.5) / len(rows) * (W - ML - MR)  # noqa: E731
    py = lambda v: H - MB - (v - y0) / (y1 - y0) * (H - MT - MB)  # noqa: E731
    out = [f'<svg id="plot-seeds" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="test accuracy per seed">',
           f'<text x="{ML}" y="20" font-size="14" font-weight="600">Test accuracy per seed (validation-selected epoch)</text>']
    for t in _lin_ticks(y0, y1):
        out.append(f'<line class="grid" x1="{ML}" x2="{W - MR}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                   f'<text x="{ML - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for i, r in enumerate(rows):
        out.append(f'<text x="{px(i):.1f}" y="{H - MB + 16}" text-anchor="middle">seed {r["seed"]}</text>')
        if r.get("baseline"):
            a, b = 100 * r["distilled"]["test_accuracy"], 100 * r["baseline"]["test_accuracy"]
            out.append(f'<line class="pair" x1="{px(i):.1f}" x2="{px(i):.1f}" y1="{py(a):.1f}" y2="{py(b):.1f}" stroke="#bbb"/>')
    colour = {"distilled": "#1f6feb", "baseline": "#d97706"}
    for i, kind, y in pts:
        out.append(f'<circle class="seed-point" data-kind="{kind}" data-seed="{rows[i]["seed"]}" cx="{px(i):.1f}" '
                   f'cy="{py(y):.1f}" r="5" fill="{colour[kind]}"><title>seed {rows[i]["seed"]} {kind}: {y:.2f}%</title></circle>')
    out.append(f'<polyline class="axis" fill="none" points="{ML},{MT} {ML},{H - MB} {W - MR},{H - MB}"/>'
               f'<text transform="translate(16 {(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle" '
               f'font-size="12">test accuracy (%)</text>')
    for k, kind in enumerate(kind for kind in KINDS if kind in summary):
        x = ML + 4 + 110 * k
        out.append(f'<circle cx="{x + 5}" cy="38" r="4" fill="{colour[kind]}"/><text x="{x + 14}" y="42">{kind}</text>')
    out.append("</svg>")
    return "".join(out)


def render_seeds_html(name: str, summary: dict, notes: Optional[str] = None) -> str:
    """The `--seeds` page: the verdict, a table of each seed's runs, the figures per kind and the per-seed plot."""
    kinds = [k for k in KINDS if k in summary]
    head = "".join(f'<th>{k}: test acc. (%)</th><th>{k}: last epoch (%)</th><th>{k}: epoch / of</th>' for k in kinds)
    body = []
    for r in summary["runs"]:
        cells = "".join(f'<td>{100 * r[k]["test_accuracy"]:.2f}</td><td>{100 * r[k]["last_epoch_test_accuracy"]:.2f}</td>'
                        f'<td>{r[k]["best_epoch"]} / {r[k]["epochs"]}</td>' for k in kinds)
        body.append(f'<tr><td class="l">{r["seed"]}</td>{cells}</tr>')
    figs = []
    for fig, label in FIGURES.items():
        cells = "".join(f"<td>{_pct(summary[k][fig])}</td>" for k in kinds)
        diff = summary.get("difference", {}).get(fig)
        cells += f"<td>{100 * diff['mean']:+.2f} ± {100 * diff['std']:.2f}</td>" if diff else ""
        figs.append(f'<tr><td class="l">{label}</td>{cells}</tr>')
    diff_head = "<th>paired difference (points)</th>" if "difference" in summary else ""
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>protege seeds: {escape(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>protege seeds: {escape(name)}</h1>",
        f'<p class="sub" id="verdict">{escape(summary.get("verdict", "no baseline was trained (add --baseline)"))}</p>',
        "<h2>Mean ± std over seeds (test accuracy, %)</h2>",
        f'<table><tr><th class="l">figure</th>{"".join(f"<th>{k}</th>" for k in kinds)}{diff_head}</tr>{"".join(figs)}</table>',
        f"<figure>{_plot(summary)}</figure>",
        "<h2>Each seed</h2>", f'<table><tr><th class="l">seed</th>{head}</tr>{"".join(body)}</table>',
        f'<p class="note">{escape(notes)}</p>' if notes else "", "</body></html>", ""])
