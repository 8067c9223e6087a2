"""The command line end to end: `protege distill/evaluate/export/inspect/generate` run as commands (subprocess or
the CLI's main()), --set overrides, a killed `protege distill` resumed with --resume, Ctrl-C at start-up, and
`accelerate launch` with two processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import protege
from protege.errors import ProtegeError
from protege.recipe import parse_recipe

from .conftest import HERE, PROTEGE, TINY
from .slow_mlp import HOLD
from .helpers import seq_lm, jsonl_rows as _rows


def test_evaluate_and_export_commands_rerun(finished_run):
    before = json.loads(finished_run.report_path.read_text())
    out = subprocess.run([PROTEGE, "export", str(finished_run.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([PROTEGE, "evaluate", str(finished_run.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "student_onnx" in out.stdout and "accuracy" in out.stdout
    after = json.loads(finished_run.report_path.read_text())
    assert after["student"]["accuracy"] == before["student"]["accuracy"]  # same weights, same test set


def test_cli_set_override_is_saved(tmp_path, tiny, write_recipe):
    tiny["train"]["epochs"] = 1
    tiny["teacher"]["train"]["epochs"] = 1
    path = write_recipe(tiny)
    out = subprocess.run([PROTEGE, "distill", str(path), "--out", str(tmp_path / "r"), "--set", "train.epochs=2",
                          "--set", "distill.temperature=3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    saved = yaml.safe_load((tmp_path / "r/recipe.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["distill"]["temperature"] == 3
    assert (tmp_path / "r/report.json").is_file()


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


def test_ctrl_c_while_importing_exits_130_without_traceback():
    """A KeyboardInterrupt raised while the package imports torch (as Ctrl-C at that moment would)."""
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def imp(name, *a, **k):\n    if name == 'torch':\n        raise KeyboardInterrupt\n    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\nsys.argv = ['protege', 'evaluate', 'x']\nimport protege_entry\nprotege_entry.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("after", [0.05, 0.3, 0.8])
def test_real_ctrl_c_early_in_start_up_is_clean(tmp_path, after):
    """A real SIGINT at a few moments of start-up (mostly inside torch's import): never a traceback; "interrupted"
    and exit 130, or, if the command got that far, its own one-line error."""
    proc = subprocess.Popen([PROTEGE, "evaluate", str(tmp_path / "nowhere")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert "Traceback" not in err, err
    assert (code == 130 and "interrupted" in err) or (code == 2 and "not a run folder" in err), (code, err)


def _free_port() -> int:
    """A port nothing listens on now (the OS picks it), so parallel or leftover runs don't collide on a fixed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_into_one_run_folder(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("accelerate CLI not installed")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "runs" / "ddp"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "protege.cli", "distill", str(recipe), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["ddp"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    student = [r for r in rows if r["stage"] == "student"]
    assert [r["epoch"] for r in student] == [1, 2, 3]  # written once, by the main process
    assert all(r["processes"] == 2 for r in rows)
    assert student[-1]["loss"] < student[0]["loss"]  # the two processes' shared updates reduce the loss
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["accuracy"] > 0.2  # trained: well above the 10% of chance on 10 classes


def test_inspect_a_run_and_bad_shapes(tmp_path, tiny):

    tiny["train"]["epochs"] = tiny["teacher"]["train"]["epochs"] = 1
    run = protege.distill(parse_recipe(tiny), tmp_path / "r", export=False, evaluate_=False)
    out = subprocess.run([PROTEGE, "inspect", str(run.path), "--teacher"], capture_output=True, text=True)
    assert out.returncode == 0 and "body.1" in out.stdout and "64" in out.stdout
    bad = subprocess.run([PROTEGE, "inspect", "cnn", "--input-shape", "1,a"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--input-shape '1,a' must be positive integers" in bad.stderr
    with pytest.raises(ProtegeError, match="cannot run on input shape"):
        from protege.api import inspect

        inspect("cnn", [1, 1, 1])  # too small to pool


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return seq_lm(tmp_path_factory.mktemp("seq"))


def test_the_generate_command(lm, tmp_path, capsys):
    from .helpers import assert_clean_error, run_cli

    out = tmp_path / "gen.jsonl"
    code, _ = run_cli(["generate", lm["teacher"], lm["train"], out, "--prompt-tokens", "4", "--new-tokens", "5", "--limit", "3"], capsys)
    assert code == 0 and len(_rows(out)) == 3
    code, err = run_cli(["generate", lm["teacher"], lm["train"], out], capsys)
    assert_clean_error(code, err, "already exists", "--overwrite")
    code, err = run_cli(["generate", lm["teacher"], tmp_path / "none.jsonl", tmp_path / "x.jsonl"], capsys)
    assert_clean_error(code, err, "not found")
    assert len(_rows(out)) == 3
