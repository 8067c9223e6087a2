"""A run killed mid-way and resumed ends with bit-identical weights to an uninterrupted run (CPU)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from .conftest import HERE, PROTEGE, TINY
from .slow_mlp import HOLD


def _recipe(tmp: Path) -> Path:
    """Dropout in both models and augmentation for the student: the random state must resume too."""
    r = json.loads(json.dumps(TINY))
    slow = f"{HERE / 'slow_mlp.py'}:build"
    r["teacher"] = {"model": slow, "kwargs": {"hidden": [64], "dropout": 0.2}, "train": {"epochs": 4, "batch_size": 64}}
    r["student"] = {"model": slow, "kwargs": {"hidden": [32], "dropout": 0.1}}
    r["train"] = {"epochs": 8, "batch_size": 64, "lr": 0.01, "augment": True}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def _epochs(run: Path, stage: str = "student") -> int:
    try:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return 0
    return max([r["epoch"] for r in rows if r["stage"] == stage], default=0)


def _start(recipe: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    # A shell's background job inherits SIGINT ignored; restore the default so Ctrl-C reaches Python.
    return subprocess.Popen([PROTEGE, "distill", str(recipe), "--out", str(out), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = load_file(str(run / "student" / "checkpoints" / "last.safetensors"))
    return {k: v for k, v in ckpt.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    recipe = _recipe(tmp)
    proc = _start(recipe, tmp / "run", "--set", "eval.repeats_b1=1")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return recipe, tmp / "run"


@pytest.mark.parametrize("sig,stage,at", [(signal.SIGKILL, "student", 3), (signal.SIGINT, "student", 3),
                                          (signal.SIGKILL, "teacher", 2)], ids=["kill-9", "ctrl-c", "kill-9-in-teacher"])
def test_killed_run_resumes_bit_identically(tmp_path, reference, sig, stage, at):
    recipe, ref_run = reference
    out = tmp_path / "run"
    # The model stops at the first training batch after epoch `at` of `stage` is logged and checkpointed
    # (slow_mlp.py), and says so through the marker: the signal lands there, however loaded the machine.
    # Only this run gets the variable; the recipe, and so the resumed run, stays the reference's.
    marker = tmp_path / "held"
    hold = {"metrics": str(out / "metrics.jsonl"), "checkpoint": str(out / stage / "checkpoints" / "last.safetensors"),
            "stage": stage, "at": at, "hidden": yaml.safe_load(recipe.read_text())[stage]["kwargs"]["hidden"], "marker": str(marker)}
    proc = _start(recipe, out, "--set", "eval.repeats_b1=1", env={HOLD: json.dumps(hold)})
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        proc.kill()
        err = proc.communicate()[1]
        raise AssertionError(f"the run never held at {stage} epoch {at} (exit code {proc.returncode}, "
                             f"{_epochs(out, stage)} epochs logged): {err[-3000:]}")
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    assert _epochs(out, stage) == at
    if sig == signal.SIGINT:
        err = proc.stderr.read()
        assert code == 130 and "--resume" in err and "Traceback" not in err
    assert not (out / "report.json").exists()

    again = _start(recipe, out, "--set", "eval.repeats_b1=1", "--resume")
    assert again.wait(timeout=600) == 0, again.stderr.read()
    a, b = _weights(out), _weights(ref_run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("student/model.safetensors", "teacher/model.safetensors"):
        fin_a, fin_b = load_file(str(out / name)), load_file(str(ref_run / name))
        assert all(torch.equal(fin_a[k], fin_b[k]) for k in fin_a), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["stage"] == "student"] == list(range(1, 9))


def test_resume_refuses_a_different_recipe(tmp_path, reference):
    recipe, ref_run = reference
    proc = subprocess.run([PROTEGE, "distill", str(recipe), "--out", str(ref_run), "--resume", "--set", "train.lr=0.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "recipe differs" in proc.stderr
