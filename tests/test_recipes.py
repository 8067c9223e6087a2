"""Every shipped recipe loads, and runs end to end on tiny data; the demo meets its promises."""
import json
import subprocess
from pathlib import Path

import pytest

import protege
from protege.data.loaders import FASHION_DIR

from .conftest import PROTEGE, ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
TINY_SETS = ["data.limit=300", "train.epochs=1", "eval.repeats_b1=2", "eval.repeats_b32=1", "eval.warmup=1"]


def tiny_sets(path: Path) -> list[str]:
    import yaml

    trains_teacher = "train" in (yaml.safe_load(path.read_text()).get("teacher") or {})
    return TINY_SETS + (["teacher.train.epochs=1"] if trains_teacher else [])


def test_there_are_shipped_recipes():
    assert {"digits.yaml", "fashion_mnist.yaml", "digits_features.yaml", "digits_self_distill.yaml",
            "digits_born_again.yaml", "reviews_minilm.yaml", "kjv_smollm2.yaml"} <= {p.name for p in RECIPES}


def text_sets(path: Path, tmp: Path) -> list[str]:
    """A text recipe's model folders and files, replaced by tiny offline fixtures with the same columns and depth."""
    import yaml

    from .text_fixtures import write_bert_folder, write_corpus, write_llama_folder, write_text_data

    d = yaml.safe_load(path.read_text())["data"]
    if d.get("source") == "lm_text":  # a Llama deep enough for the recipe's layer selection, a small corpus
        folder = write_llama_folder(tmp / "llama", layers=25, hidden=16)
        return [f"data.path={write_corpus(tmp / 'corpus.jsonl')}", f"teacher.model={folder}", f"student.model={folder}",
                "distill.topk=8"]  # the fixture's vocabulary has 27 tokens
    if d.get("source") != "text":
        return []
    folder = write_bert_folder(tmp / "bert", layers=6)
    cols = {"text_col": d.get("text", "text"), "label_col": d.get("target") or "label"}
    train, test = write_text_data(tmp / "train.csv", n=200, **cols), write_text_data(tmp / "test.csv", n=40, seed=1, **cols)
    return [f"data.path={train}", f"data.test_path={test}", "data.max_length=16", f"teacher.model={folder}",
            f"student.model={folder}"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_runs_tiny(path, tmp_path):
    recipe = protege.load_recipe(path, tiny_sets(path) + text_sets(path, tmp_path))
    if recipe.data.source == "fashion_mnist" and not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    run = protege.distill(recipe, tmp_path / path.stem)
    if recipe.task == "causal_lm":
        assert run.report["student"]["test_ppl"] > 1 and run.report["student"]["params"] < run.report["teacher"]["params"]
        return
    assert run.report["student_onnx"]["accuracy"] == pytest.approx(run.report["student"]["accuracy"])
    assert run.report["student"]["params"] <= run.report["teacher"]["params"]


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
