"""The bundled demo (protege.demo, `protege demo`) keeps its promises."""
import json
import subprocess

import pytest

from .conftest import PROTEGE


def _demo(folder, *sets: str, floor: float) -> None:
    """`protege demo` (with --set overrides) keeps its promises: a student under a tenth of the teacher, a checked
    ONNX file, a static int8 file, report.html; accuracies above ``floor``."""
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([PROTEGE, "demo", "--out", str(folder), *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((folder / "report.json").read_text())
    assert report["student"]["params"] * 10 <= report["teacher"]["params"]
    assert (folder / "student.onnx").is_file() and report["onnx_max_abs_diff"] <= 1e-4
    assert report["student_onnx"]["accuracy"] > floor  # digits: a working student, not chance (10%)
    assert "student_onnx" in proc.stdout and "compression" in proc.stdout
    int8 = report["stages"][-1]
    assert int8["name"] == "int8 (static)" and (folder / "student.int8.onnx").is_file()
    assert int8["accuracy"] > floor and int8["bytes"] < report["student_onnx"]["bytes"]
    assert "plot-latency" in (folder / "report.html").read_text()


def test_demo_trimmed(tmp_path):
    """The demo's whole path with a few epochs (the full 70-epoch demo is `make test-slow` and `make demo`)."""
    _demo(tmp_path / "demo", "teacher.train.epochs=4", "train.epochs=6", floor=0.9)


@pytest.mark.slow
def test_demo(tmp_path):
    _demo(tmp_path / "demo", floor=0.9)
