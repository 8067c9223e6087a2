"""Helpers that several test files share: run the command line in-process and check a one-line error; the tiny
recipes (digits, causal LM, text) and run folders the tests build on."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from protege.cli import main
from protege.errors import RecipeError


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["protege", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


def assert_clean_error(code: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


# --- recipes and run folders ---------------------------------------------------------------------------------------

def tiny_recipe_file(tmp: Path, edit=None, name: str = "recipe.yaml") -> Path:
    """The tiny digits recipe (conftest.TINY, 1 teacher and 2 student epochs) as a YAML file; ``edit`` changes the dict."""
    from .conftest import TINY

    r = json.loads(json.dumps(TINY))
    r["teacher"]["train"]["epochs"] = 1
    r["train"]["epochs"] = 2
    if edit:
        edit(r)
    path = tmp / name
    path.write_text(yaml.safe_dump(r))
    return path


def file_digests(folder: Path, skip: tuple[str, ...] = (".protege.lock",)) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative path -> digest)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of a run folder to change (without its lock file)."""
    shutil.copytree(run, dst)
    (dst / ".protege.lock").unlink(missing_ok=True)
    return dst


def _merged(r: dict, over: dict) -> dict:
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def lm_recipe(lm: dict, **over) -> dict:
    """A causal-LM recipe on the ``lm`` fixture (a tiny Llama teacher, a corpus); ``over`` merges into its sections."""
    return _merged({"name": "lm", "task": "causal_lm",
                    "data": {"source": "lm_text", "path": str(lm["corpus"]), "block_size": 32, "val_fraction": 0.2,
                             "test_fraction": 0.2},
                    "teacher": {"model": str(lm["teacher"])},
                    "student": {"model": str(lm["teacher"]), "kwargs": {"pretrained": False, "num_hidden_layers": 2}},
                    "distill": {"response": "forward_kl", "temperature": 1.0, "alpha": 0.5},
                    "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3}, "eval": {"threads": 1}}, over)


def lm_teacher_and_data(lm: dict):
    """The ``lm`` fixture's teacher (eval mode) and its data splits."""
    from protege.data import load_data
    from protege.models import build_model
    from protege.recipe import parse_recipe

    r = parse_recipe(lm_recipe(lm))
    d = load_data(r.data, 0)
    return build_model(r.teacher, d.input_shape, d.num_classes, d.model_args).eval(), d


def text_recipe(folders: dict, **over) -> dict:
    """A text-classification recipe on the ``folders`` fixture (a BERT teacher folder, train and test files)."""
    return _merged({"name": "text",
                    "data": {"source": "text", "path": str(folders["data"]), "test_path": str(folders["test"]), "max_length": 16},
                    "teacher": {"model": str(folders["teacher"]), "train": {"epochs": 6, "batch_size": 16, "lr": 3e-3}},
                    "student": {"model": "bilstm", "kwargs": {"hidden": 16, "embed": 16}},
                    "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3}, "distill": {"temperature": 2.0, "alpha": 0.5},
                    "eval": {"warmup": 1, "repeats_b1": 2, "repeats_b32": 1}}, over)


# --- small pieces several files use ----------------------------------------------------------------------------------

def sample_report(reliable: bool) -> dict:
    """A classification report (as report.json holds it) with a teacher and an int8 stage; ``reliable``: whether its
    b1 latency stands."""
    def stage(name: str, runtime: str, b1: float, b32: float) -> dict:
        return {"name": name, "runtime": runtime, "accuracy": 0.9, "params": 100, "bytes": 1000,
                "latency_ms_b1": b1, "latency_ms_b1_p95": b1, "latency_ms_b1_iqr": 0.0, "latency_b1_reliable": reliable,
                "latency_ms_b32": b32, "latency_ms_b32_p95": b32, "latency_ms_b32_iqr": 0.0, "latency_b32_reliable": True}
    reasons = [] if reliable else ["b1: machine busy: other processes used 43% of the CPU while measuring",
                                   "b1 teacher: spread 38% of the median"]
    return {"name": "r", "stages": [stage("teacher", "pytorch", 296.0, 22.0), stage("int8 (static)", "onnxruntime", 0.047, 1.0)],
            "deployed": "int8 (static)", "compression_ratio": 40.0, "bytes_ratio": 10.0, "onnx_max_abs_diff": 1e-6,
            "speedup_b1": 6319.0, "speedup_b1_reliable": reliable, "speedup_b32": 22.0, "speedup_b32_reliable": True,
            "latency": {"rounds": 5, "threads": 2, "b1": {"calls_per_stage": 50}, "b32": {"calls_per_stage": 10},
                        "reliable": reliable, "reasons": reasons}}


def recipe_error(call, *words: str) -> str:
    """``call()`` raises a one-line RecipeError holding every word; returns its message."""
    with pytest.raises(RecipeError) as info:
        call()
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)
    return message


def recipe_file(tmp_path, content, name: str = "mine.yaml"):
    """``content`` (a dict as YAML, text or bytes) written as a recipe file."""
    path = tmp_path / name
    if isinstance(content, dict):
        content = yaml.safe_dump(content)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def truncate_file(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def scribble_file(path: Path, start: int) -> None:
    """Overwrite everything from ``start`` with random bytes: same size, different values."""
    n = path.stat().st_size - start
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())


def jsonl_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def seq_lm(root: Path) -> dict:
    """A tiny Llama teacher folder with a training and a test corpus (sequence-level KD tests)."""
    from .text_fixtures import write_corpus, write_llama_folder

    return {"teacher": write_llama_folder(root / "teacher"), "train": write_corpus(root / "train.jsonl", docs=6, sentences=12),
            "test": write_corpus(root / "test.jsonl", docs=3, sentences=20, seed=1)}
