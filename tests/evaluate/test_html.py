"""report.html (protege.evaluate.html): pareto_front, render_html on awkward input, unreliable latency marked,
and the page in a real headless Chromium."""
from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from protege.evaluate.html import pareto_front, render_html as _render, write_html as _write
from protege.evaluate.report import Report

from ..helpers import sample_report as _report


CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _stage(name: str, runtime: str, acc: float, b1: float, size: int, **kw: object) -> dict:
    return {"name": name, "runtime": runtime, "file": f"{name}/model", "accuracy": acc, "macro_f1": acc - 0.001,
            "agreement": kw.pop("agreement", 0.95), "params": size // 4, "bytes": size, "latency_ms_b1": b1,
            "latency_ms_b1_p95": b1 * 1.1, "latency_ms_b32": b1 * 9, "latency_ms_b32_p95": b1 * 10, **kw}


REPORT = {
    "name": "fashion_mnist", "data": "Fashion-MNIST 28x28: 60000 train / 10000 test", "test_examples": 10000,
    "stages": [
        _stage("teacher", "pytorch", 0.9333, 2.63, 1_160_000, agreement=None),
        _stage("student", "pytorch", 0.9101, 0.41, 215_000),
        _stage("student_onnx", "onnxruntime", 0.9101, 0.12, 213_000, note="exported with opset 18"),
        _stage("pruned", "onnxruntime", 0.9050, 0.11, 50_000),
        _stage("quantized (int8 static)", "onnxruntime", 0.9080, 0.09, 60_000),
    ],
    "quantization": {"mode": "auto", "chosen": "static", "reason": "static kept accuracy within 0.5 points",
                     "candidates": [_stage("int8 dynamic", "onnxruntime", 0.9010, 0.10, 61_000),
                                    _stage("int8 static", "onnxruntime", 0.9080, 0.09, 60_000)]},
    "environment": {"cpu": "AMD EPYC 7B13", "threads": 2, "torch": "2.13.0+cpu", "onnxruntime": "1.32.0",
                    "python": "3.11.7"},
    "notes": "Latency measured with 2 threads.",
}
# By hand: on latency, student is beaten by student_onnx (same accuracy, faster) and pruned by the quantized
# model (more accurate, faster); on size, pruned is the smallest so it joins the front.
FRONT_LATENCY = {"teacher", "student_onnx", "quantized (int8 static)"}
FRONT_SIZE = {"teacher", "student_onnx", "pruned", "quantized (int8 static)"}


# ---------------------------------------------------------------- pareto_front
@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(1.0, 0.5)], [0]),
    ([(1.0, 0.9), (2.0, 0.8)], [0]),                   # slower and worse: dominated
    ([(1.0, 0.8), (2.0, 0.9)], [0, 1]),                # a real trade-off: both stay
    ([(1.0, 0.9), (1.0, 0.9)], [0, 1]),                # identical points do not dominate each other
    ([(1.0, 0.9), (1.0, 0.8)], [0]),                   # same x, lower y: dominated
    ([(1.0, 0.9), (2.0, 0.9)], [0]),                   # same y, larger x: dominated
    ([(3.0, 0.95), (1.0, 0.90), (2.0, 0.85), (0.5, 0.80), (2.0, 0.95)], [1, 3, 4]),
])
def test_pareto_front(points: list[tuple[float, float]], expected: list[int]) -> None:
    assert pareto_front(points) == expected


# ---------------------------------------------------------------- render_html
def render_html(report: dict) -> str:
    """The page of a report given as report.json holds it."""
    return _render(Report.model_validate(report))


def write_html(path: Path, report: dict) -> Path:
    return _write(path, Report.model_validate(report))


def _classes(html: str, plot: str) -> list[tuple[str, str]]:
    """(class, data-stage) of each point circle in one plot's svg."""
    svg = re.search(rf'<svg id="{plot}".*?</svg>', html, re.S)
    assert svg, plot
    return re.findall(r'<circle class="(point[^"]*)" data-stage="([^"]*)"', svg.group(0))


def test_render_full_report() -> None:
    html = render_html(REPORT)
    assert "<title>protege report: fashion_mnist</title>" in html
    assert "Fashion-MNIST 28x28" in html and "10,000 test examples" in html
    assert html.count("<tr>") == 1 + 5 + 1 + 2            # header + stages, header + candidates
    assert "93.33" in html and "1,132.8" in html           # accuracy %, 1,160,000 bytes in kB
    assert "AMD EPYC 7B13" in html.split("<footer>")[1] and "2.13.0+cpu" in html.split("<footer>")[1]
    assert "Pareto front" in html and "static kept accuracy" in html
    for plot, front in (("plot-latency", FRONT_LATENCY), ("plot-size", FRONT_SIZE)):
        pts = _classes(html, plot)
        assert sorted(name for _, name in pts) == sorted(s["name"] for s in REPORT["stages"])
        assert {name for cls, name in pts if "pareto" in cls.split()} == front


def test_render_missing_and_null_fields() -> None:
    report = {"name": "sparse", "stages": [
        {"name": "a"},
        {"name": "b", "runtime": None, "accuracy": None, "bytes": None, "latency_ms_b1": float("nan")},
        {"name": "c", "accuracy": 0.4, "latency_ms_b1": 0.0, "bytes": -5},   # not plottable on either axis
        {"name": "d", "accuracy": 0.5, "latency_ms_b1": 1.0},   # only this one can be plotted, on latency
    ]}
    html = render_html(report)
    assert "<td>-</td>" in html
    assert [n for _, n in _classes(html, "plot-latency")] == ["d"]
    assert _classes(html, "plot-size") == [] and "no data to plot" in html
    for bare in ({}, {"stages": None}, {"stages": [{}]}, {"name": "x", "environment": None, "quantization": None}):
        out = render_html(bare)
        assert 'id="plot-latency"' in out and 'id="plot-size"' in out


def test_a_report_with_wrong_types_is_refused_before_rendering() -> None:
    """Values of the wrong type (text for a share, a flag for a count) no longer reach the page: the typed
    report refuses them, naming the field."""
    for stage in ({"name": "c", "accuracy": "n/a"}, {"name": "c", "params": "many"}):
        with pytest.raises(ValueError, match=next(k for k in stage if k != "name")):
            Report.model_validate({"name": "bad", "stages": [stage]})


def test_strings_are_escaped() -> None:
    report = copy.deepcopy(REPORT)
    report["name"] = 'x"><script>alert(1)</script>'
    report["data"] = "<b>bold</b> & more"
    report["stages"][0]["name"] = "<script>alert('stage')</script>"
    report["stages"][1]["note"] = "<img src=x onerror=alert(1)>"
    report["environment"]["cpu"] = "<i>cpu</i>"
    report["quantization"]["reason"] = "</p><script>bad()</script>"
    html = render_html(report)
    assert "<script" not in html and "<img" not in html and "<i>cpu" not in html and "<b>bold" not in html
    assert "&lt;script&gt;alert(&#x27;stage&#x27;)&lt;/script&gt;" in html
    assert 'data-stage="&lt;script&gt;' in html


def test_self_contained() -> None:
    html = render_html(REPORT)
    assert not re.search(r"""(?:src|href|xlink:href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    for external in ("<script", "<link", "@import", "url(", "<img", "<iframe"):
        assert external not in html


def test_write_html_atomic(tmp_path: Path) -> None:
    out = write_html(tmp_path / "report.html", REPORT)
    assert out == tmp_path / "report.html" and out.read_text(encoding="utf-8") == render_html(REPORT)
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


# ---------------------------------------------------------------- real browser
def _need_browser() -> None:
    """Skip without Chromium or playwright, unless PROTEGE_REQUIRE_BROWSER=1 makes that a failure."""
    missing = [what for what, ok in ((CHROMIUM, os.access(CHROMIUM, os.X_OK)),
                                     ("python package playwright", importlib.util.find_spec("playwright") is not None))
               if not ok]
    if missing:
        reason = f"headless browser test needs {', '.join(missing)}"
        if os.environ.get("PROTEGE_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (PROTEGE_REQUIRE_BROWSER=1)")
        pytest.skip(reason)


def test_report_in_headless_chromium(tmp_path: Path) -> None:
    _need_browser()
    from playwright.sync_api import sync_playwright

    page_path = write_html(tmp_path / "report.html", REPORT)
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            tempfile.mkdtemp(dir=tmp_path, prefix="profile-"), executable_path=CHROMIUM, headless=True,
            args=FLAGS, viewport={"width": 1280, "height": 900})
        try:
            page = ctx.new_page()
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            assert page.title() == "protege report: fashion_mnist"
            assert page.locator("table").first.locator("tbody tr").count() == len(REPORT["stages"])
            for plot, front in (("plot-latency", FRONT_LATENCY), ("plot-size", FRONT_SIZE)):
                svg = page.locator(f"svg#{plot}")
                assert svg.count() == 1
                box = svg.bounding_box()
                assert box and box["width"] > 300 and box["height"] > 200
                assert svg.locator(".point").count() == len(REPORT["stages"])
                assert svg.locator(".point.pareto").count() == len(front) >= 1
                names = {svg.locator(".point.pareto").nth(i).get_attribute("data-stage") for i in range(len(front))}
                assert names == front
                # every point is drawn inside the svg
                for i in range(len(REPORT["stages"])):
                    p = svg.locator(".point").nth(i).bounding_box()
                    assert p and box["x"] <= p["x"] and p["x"] + p["width"] <= box["x"] + box["width"]
                    assert box["y"] <= p["y"] and p["y"] + p["height"] <= box["y"] + box["height"]
            assert "AMD EPYC 7B13" in page.locator("footer").inner_text()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            ctx.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:", "about:")) for u in requests), requests
    assert shot.stat().st_size > 10_000
    if os.environ.get("PROTEGE_ARTIFACTS"):
        dest = Path(os.environ["PROTEGE_ARTIFACTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, dest / "html_report.png")
        shutil.copy(page_path, dest / "html_report.html")


# ---------------------------------------------------------------- the mark in the report
def test_report_html_marks_unreliable_latency_with_the_reasons():
    page = render_html(_report(False))
    assert '<td class="unreliable"' in page and "296.0?</td>" in page
    assert 'id="latency-warning"' in page and "machine busy: other processes used 43% of the CPU while measuring" in page
    assert "unreliable, 6319.0x measured" in page and "batch 32 <strong>22.0x</strong>" in page
    clean = render_html(_report(True))
    assert 'class="unreliable"' not in clean and "latency-warning" not in clean and "<strong>6319.0x</strong>" in clean
