"""The same recipe under `accelerate launch --multi_gpu --num_processes 2`: on a CPU machine that is two
processes over gloo (accelerate's torchrun launcher). It trains and writes one run folder."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import TINY


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
