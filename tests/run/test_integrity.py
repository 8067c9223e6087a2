"""Damaged files protege wrote: a truncated checkpoint falls back to the previous one (also when a run resumes), a
teacher cache whose values were overwritten is rebuilt, a truncated weights or ONNX file of a run is a one-line
error naming the file."""
import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import protege
from protege.errors import ModelError, StorageError
from protege.recipe import parse_recipe

from ..conftest import PROTEGE, TINY
from ..log_capture import logged
from ..helpers import truncate_file as _truncate, scribble_file as _scribble


def _tiny() -> dict:
    r = copy.deepcopy(TINY)
    r["teacher"]["train"]["epochs"] = 2
    r["eval"].update(repeats_b1=1, repeats_b32=1)
    return r


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (exported, not evaluated) and its recipe; tests work on copies of it."""
    recipe = parse_recipe(_tiny())
    out = tmp_path_factory.mktemp("integrity") / "run"
    protege.distill(recipe, out, evaluate_=False)
    return recipe, out


def _copy(finished, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished[1], dst)
    return dst


def _student_epochs(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch"] for r in rows if r["stage"] == "student"]


# --- checkpoints ---------------------------------------------------------------------------------------------

def _trainables():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return model, opt, sched


def _train_and_save(folder: Path, epochs: int) -> dict[int, dict[str, torch.Tensor]]:
    """Save a checkpoint after each of ``epochs`` steps; the model's weights at each epoch."""
    from protege.train.checkpoint import save_checkpoint

    model, opt, sched = _trainables()
    weights = {}
    for epoch in range(1, epochs + 1):
        loss = model(torch.randn(16, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        save_checkpoint(folder / "last.safetensors", model, opt, sched, {"epoch": epoch, "history": []})
        weights[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


@pytest.mark.parametrize("damage", ["truncated", "scribbled", "missing"])
def test_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    from protege.train.checkpoint import load_checkpoint

    weights = _train_and_save(tmp_path, 3)
    last, prev = tmp_path / "last.safetensors", tmp_path / "last.prev.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.safetensors", "last.safetensors"]  # no temporaries
    if damage == "truncated":
        _truncate(last)
    elif damage == "scribbled":  # the header still parses: only the checksum can tell
        _scribble(last, last.stat().st_size - 64)
    else:
        last.unlink()
    said: list[str] = []
    model, opt, sched = _trainables()
    with logged(said):
        loop = load_checkpoint(last, model, opt, sched)
    assert loop["epoch"] == 2
    _assert_same(model.state_dict(), weights[2])
    assert opt.state_dict()["state"] and sched.last_epoch == 2
    assert len(said) == 1 and "previous" in said[0] and str(prev) in said[0] and str(last) in said[0]


def test_checkpoint_undamaged_loads_silently_and_previous_is_one_epoch_older(tmp_path):
    from protege.train.checkpoint import _epoch_of, load_checkpoint

    weights = _train_and_save(tmp_path, 3)
    said: list[str] = []
    model, opt, sched = _trainables()
    with logged(said):
        assert load_checkpoint(tmp_path / "last.safetensors", model, opt, sched)["epoch"] == 3
    _assert_same(model.state_dict(), weights[3])
    assert said == [] and _epoch_of(tmp_path / "last.prev.safetensors") == 2


def test_checkpoint_both_damaged_is_one_line_naming_both(tmp_path):
    from protege.train.checkpoint import load_checkpoint

    _train_and_save(tmp_path, 2)
    last, prev = tmp_path / "last.safetensors", tmp_path / "last.prev.safetensors"
    _truncate(last)
    prev.write_bytes(b"\x00" * 100)
    with pytest.raises(StorageError) as e:
        load_checkpoint(last, *_trainables())
    msg = str(e.value)
    assert "\n" not in msg and str(last) in msg and str(prev) in msg and "--overwrite" in msg


def test_a_resumed_checkpoint_never_keeps_a_stale_or_damaged_previous(tmp_path):
    """Resuming from the previous file after the last was damaged: the next save keeps that previous file (the
    new checkpoint's predecessor), not the damaged one; a fresh start drops a stale one from other training."""
    from protege.train.checkpoint import _epoch_of, save_checkpoint

    _train_and_save(tmp_path, 3)
    last, prev = tmp_path / "last.safetensors", tmp_path / "last.prev.safetensors"
    _truncate(last)
    model, opt, sched = _trainables()
    save_checkpoint(last, model, opt, sched, {"epoch": 3, "history": []})  # epoch 3 again, after the fall-back
    assert _epoch_of(last) == 3 and _epoch_of(prev) == 2
    save_checkpoint(last, model, opt, sched, {"epoch": 1, "history": []})  # training started again from scratch
    assert _epoch_of(last) == 1 and not prev.exists()


def test_truncated_last_checkpoint_resume_falls_back_and_finishes(finished, tmp_path, capsys):
    recipe, ref = finished
    run = _copy(finished, tmp_path)
    last = run / "student" / "checkpoints" / "last.safetensors"
    _truncate(last)
    with logged([]) as lines:
        protege.distill(recipe, run, resume=True, export=False, evaluate_=False)
    out = "\n".join(lines)
    said = [ln for ln in out.splitlines() if str(last) in ln]
    assert len(said) == 1 and "resuming from the previous one" in said[0] and "last.prev.safetensors" in said[0], out
    _assert_same(_state(run / "student" / "model.safetensors"), _state(ref / "student" / "model.safetensors"))
    _assert_same(_state(last), _state(ref / "student" / "checkpoints" / "last.safetensors"))
    assert _student_epochs(run) == list(range(1, recipe.train.epochs + 1))


def test_scribbled_cache_is_rebuilt_and_the_student_matches_a_clean_run(finished, tmp_path, capsys):
    recipe, ref = finished
    run = _copy(finished, tmp_path)
    cache = run / "teacher_cache" / "t0"
    meta = json.loads((cache / "meta.json").read_text())
    _scribble(cache / meta["entries"]["logits"]["file"], 128)
    for name in ("checkpoints/last.safetensors", "checkpoints/last.prev.safetensors", "checkpoints/best.safetensors",
                 "model.safetensors", "config.json"):  # the student stage trains again, from the cache
        (run / "student" / name).unlink()
    with logged([]) as lines:
        protege.distill(recipe, run, resume=True, export=False, evaluate_=False)
    out = "\n".join(lines)
    assert "does not match its checksum" in out and "rebuilding" in out, out
    _assert_same(_state(run / "student" / "model.safetensors"), _state(ref / "student" / "model.safetensors"))
    assert np.array_equal(np.load(cache / meta["entries"]["logits"]["file"]),
                          np.load(ref / "teacher_cache" / "t0" / meta["entries"]["logits"]["file"]))


# --- weights and ONNX read back ------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROTEGE, *args], capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def test_truncated_student_onnx_is_one_line_error(finished, tmp_path):
    run = _copy(finished, tmp_path)
    _truncate(run / "student.onnx")
    last = _one_line_error(_cli("evaluate", str(run)), str(run / "student.onnx"), f"protege export {run}")
    assert "truncated or damaged" in last


def test_truncated_student_weights_is_one_line_error(finished, tmp_path):
    run = _copy(finished, tmp_path)
    weights = run / "student" / "model.safetensors"
    _truncate(weights)
    before = (run / "student.onnx").read_bytes()
    last = _one_line_error(_cli("export", str(run)), str(weights), "--resume")
    assert "truncated or damaged" in last
    assert (run / "student.onnx").read_bytes() == before  # the deployed file is untouched


def test_damaged_run_files_in_process(finished, tmp_path):
    from protege.export.onnx import ort_session
    from protege.models.loading import read_state_dict

    run = _copy(finished, tmp_path)
    teacher = run / "teacher" / "model.safetensors"
    _truncate(teacher, 0.01)
    with pytest.raises(StorageError, match="delete it and continue with `protege distill RECIPE --out .* --resume`"):
        read_state_dict(teacher)
    best = run / "student" / "checkpoints" / "best.safetensors"
    best.write_bytes(b"garbage")
    with pytest.raises(StorageError, match="that stage trains again"):
        read_state_dict(best)
    (run / "student.onnx").write_bytes(os.urandom(2000))
    with pytest.raises(StorageError, match=f"protege export {run}"):
        ort_session(run / "student.onnx")
    (run / "student.onnx").unlink()
    with pytest.raises(ModelError, match="not found"):
        ort_session(run / "student.onnx")
    user = tmp_path / "mine.safetensors"  # not a file of a run: the fix is the user's own
    shutil.copy(run / "student" / "model.safetensors", user)
    _truncate(user)
    with pytest.raises(ModelError, match="re-save the weights") as e:
        read_state_dict(user)
    assert not isinstance(e.value, StorageError)
    elsewhere = tmp_path / "model.onnx"
    elsewhere.write_bytes(b"not protobuf at all")
    with pytest.raises(StorageError, match="export the model to ONNX again"):
        ort_session(elsewhere)
