"""The README's data-source examples run as written: examples/make_data.py writes their data, and every recipe in
examples/ distils (trimmed to one epoch here) from it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import protege

from .conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def example_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("example_data")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "make_data.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_there_is_an_example_for_each_source_of_your_own_data():
    sources = {protege.load_recipe(p).data.source for p in EXAMPLES}
    assert {"images", "arrays", "csv", "hf_dataset"} <= sources


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipe_runs(path, example_data, tmp_path):
    recipe = protege.load_recipe(path)
    if recipe.data.source == "hf_dataset":
        pytest.importorskip("datasets")
    moved = str(example_data / Path(recipe.data.path).name)  # examples/data/<name> -> the data written here
    recipe = protege.load_recipe(path, [f"data.path={moved}", "train.epochs=1", "teacher.train.epochs=1"])
    run = protege.distill(recipe, tmp_path / path.stem)
    assert run.report.student_onnx.accuracy == pytest.approx(run.report.student.accuracy)
    assert run.report.test_examples > 0
