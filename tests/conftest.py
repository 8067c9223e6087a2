from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "2")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROTEGE = str(Path(sys.executable).with_name("protege"))

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {"source": "digits"},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}, "train": {"epochs": 3, "batch_size": 64}},
    "student": {"model": "mlp", "kwargs": {"hidden": [16]}},
    "distill": {"temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.01},
    "eval": {"warmup": 1, "repeats_b1": 3, "repeats_b32": 2},
}


@pytest.fixture(autouse=True)
def _protege_cache(tmp_path, monkeypatch):
    """Tokenisation caches (text and LM corpora) go under each test's own folder, never the user's ~/.cache."""
    monkeypatch.setenv("PROTEGE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _protege_logger():
    """The CLI sets up protege's logger (a handler, no propagation); in-process CLI tests must not leave that behind."""
    logger = logging.getLogger("protege")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def tiny() -> dict:
    """A recipe (as a dict) that runs end to end in a few seconds."""
    return copy.deepcopy(TINY)


@pytest.fixture
def write_recipe(tmp_path):
    def write(data: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


# --- shared fixtures (a test file may define its own of the same name, which then wins) -----------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, made once per module through the command line; tests copy it before changing anything."""
    from .helpers import tiny_recipe_file

    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    proc = subprocess.run([PROTEGE, "distill", str(tiny_recipe_file(tmp)), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny randomly initialised Llama teacher folder and a corpus (tests/text_fixtures.py)."""
    from .text_fixtures import write_corpus, write_llama_folder

    root = tmp_path_factory.mktemp("lm")
    return {"teacher": write_llama_folder(root / "teacher"), "corpus": write_corpus(root / "corpus.jsonl"), "root": root}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny BERT teacher folder and a labelled text set (train .csv, test .jsonl)."""
    from .text_fixtures import write_bert_folder, write_text_data

    root = tmp_path_factory.mktemp("text")
    return {"teacher": write_bert_folder(root / "teacher", layers=4), "data": write_text_data(root / "train.csv", n=320),
            "test": write_text_data(root / "test.jsonl", n=80, seed=1), "root": root}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished tiny run made through the Python API (a Run), once per module."""
    import protege
    from protege.recipe import parse_recipe

    return protege.distill(parse_recipe(dict(TINY)), tmp_path_factory.mktemp("run") / "tiny")
