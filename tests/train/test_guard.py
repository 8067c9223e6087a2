"""The divergence guard (protege.train.guard): a NaN loss stops training at once and names the fix, the last
finite checkpoint is kept, and NaN weights are refused by evaluate and export."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ..helpers import assert_clean_error, run_cli
from ..helpers import file_digests as _digests, tiny_recipe_file as _recipe, copy_run as _copy


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# --- divergence --------------------------------------------------------------------------------------------------

POISON = textwrap.dedent("""
    import os
    from protege.models.zoo import MLP

    class Poison(MLP):
        calls = 0
        def forward(self, x):
            out = super().forward(x)
            if self.training:
                Poison.calls += 1
                if Poison.calls > int(os.environ.get("POISON_AFTER", "0")):  # a loss that turns NaN after N batches
                    out = out * float("nan")
            return out

    def build(in_shape, num_classes, hidden=(16,)):
        return Poison(in_shape, num_classes, hidden)
""")


@pytest.mark.parametrize("which,stage,field", [("student", "student epoch 1/2", "train.lr"),
                                               ("teacher", "teacher epoch 1/1", "teacher.train.lr")])
def test_divergence_stops_at_once_and_names_the_fix(tmp_path, capsys, monkeypatch, which, stage, field):
    (tmp_path / "poison.py").write_text(POISON)
    monkeypatch.setenv("POISON_AFTER", "0")
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, lambda r: r[which].update(model=f"{tmp_path / 'poison.py'}:build"))
    code, err = run_cli(["distill", recipe, "--out", out], capsys)
    assert_clean_error(code, err, stage, "step 1:", "loss is nan", "diverged", f"lower {field}", "nothing of this stage was saved")
    rows = _strict_json_lines(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    assert all(r["stage"] != which for r in rows)  # no row of the diverged epoch
    assert not (out / which / "model.safetensors").exists()
    assert not list((out / which / "checkpoints").glob("*.safetensors"))


def test_divergence_later_keeps_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    """Epoch 1 is fine, epoch 2's loss is NaN: epoch 1's checkpoint stays, and is finite."""
    (tmp_path / "poison.py").write_text(POISON)
    monkeypatch.setenv("POISON_AFTER", "21")  # 21 batches of 64 = epoch 1 of the digits training split
    out = tmp_path / "out"
    code, err = run_cli(["distill", _recipe(tmp_path, lambda r: r["student"].update(model=f"{tmp_path / 'poison.py'}:build")),
                         "--out", out], capsys)
    assert_clean_error(code, err, "student epoch 2/2", "loss is nan", "epoch 1", "last.safetensors")
    rows = [r for r in _strict_json_lines(out / "metrics.jsonl") if r["stage"] == "student"]
    assert [r["epoch"] for r in rows] == [1]
    ckpt = load_file(str(out / "student" / "checkpoints" / "last.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in ckpt.items() if k.startswith("model."))


def test_nan_weights_are_refused_by_evaluate_and_export(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path / "run")
    weights = load_file(str(run / "student" / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(run / "student" / "model.safetensors"))
    before = _digests(run)
    for command in ("evaluate", "export"):
        code, err = run_cli([command, run], capsys)
        assert_clean_error(code, err, "model.safetensors", "NaN or inf", "diverged")
        assert _digests(run) == before
