from __future__ import annotations

import copy
import logging
import os
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
