"""Focused tests of protege.train.checkpoint: one safetensors file with model, optimizer, scheduler, RNG and loop
state; a sha256 over all of it; the previous checkpoint kept as last.prev and used when the last one is damaged or
missing; one-line StorageErrors naming the files when nothing usable is left or a write fails."""
from __future__ import annotations

import errno
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from protege.errors import ProtegeError, StorageError
from protege.train import checkpoint as ckpt_module
from protege.train.checkpoint import load_checkpoint, previous, save_checkpoint, temporary_files


@pytest.fixture
def said():
    """The messages load_checkpoint logs (it says when it falls back to the previous checkpoint)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger, handler = logging.getLogger(ckpt_module.__name__), Keep(logging.DEBUG)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(old)


def _trainables(optimizer: str = "adamw", seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, 20) / 20)))
    return model, opt, sched


def _step(model, opt, sched, n: int = 1) -> None:
    model.train()
    for _ in range(n):
        x = torch.randn(8, 4)
        loss = model(x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    # JSON keeps no tuples: AdamW's betas come back as a list, which AdamW reads the same way
    groups = [json.loads(json.dumps(s["param_groups"])) for s in (sa, sb)]
    if groups[0] != groups[1] or sa["state"].keys() != sb["state"].keys():
        return False
    for pid in sa["state"]:
        x, y = sa["state"][pid], sb["state"][pid]
        if x.keys() != y.keys():
            return False
        for k in x:
            if isinstance(x[k], torch.Tensor) != isinstance(y[k], torch.Tensor):
                return False
            if isinstance(x[k], torch.Tensor) and not (torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype):
                return False
            if not isinstance(x[k], torch.Tensor) and x[k] != y[k]:
                return False
    return True


def _sched_state(s) -> dict:
    return {k: v for k, v in s.state_dict().items() if k != "lr_lambdas"}


def _epoch(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["loop"])["epoch"]


def _save_epochs(folder: Path, epochs: int, optimizer: str = "adamw") -> dict[int, dict[str, torch.Tensor]]:
    """One training step and a checkpoint per epoch; the weights at each epoch."""
    model, opt, sched = _trainables(optimizer)
    weights = {}
    for epoch in range(1, epochs + 1):
        _step(model, opt, sched)
        save_checkpoint(folder / "last.safetensors", model, opt, sched, {"epoch": epoch, "history": [{"epoch": epoch}]})
        weights[epoch] = _state(model)
    return weights


def _rewrite(path: Path, change) -> None:
    """Read the file's tensors and metadata, let ``change(tensors, meta)`` edit them, write it back as valid safetensors."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


# ---------------------------------------------------------------- names
def test_previous_and_temporary_names():
    last = Path("/runs/x/ckpt/last.safetensors")
    assert previous(last) == Path("/runs/x/ckpt/last.prev.safetensors")
    assert previous(str(last)) == previous(last)
    assert temporary_files(last) == [Path("/runs/x/ckpt/last.tmp"), Path("/runs/x/ckpt/last.prev.tmp")]


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_round_trip_restores_model_optimizer_scheduler_rng_and_loop(tmp_path, optimizer, said):
    model, opt, sched = _trainables(optimizer)
    _step(model, opt, sched, 3)
    loop = {"epoch": 3, "best_val": float("-inf"), "best_epoch": 0,
            "history": [{"stage": "s", "epoch": 1, "loss": 0.25, "val_accuracy": 0.5}]}
    path = tmp_path / "last.safetensors"
    torch.manual_seed(42)
    save_checkpoint(path, model, opt, sched, loop)
    next_draws = torch.rand(5)  # what the RNG gives right after the save

    torch.manual_seed(7)  # the loading process's RNG is elsewhere
    model2, opt2, sched2 = _trainables(optimizer, seed=3)
    got = load_checkpoint(path, model2, opt2, sched2)
    assert torch.equal(torch.rand(5), next_draws)
    assert got == loop and said == []
    assert _same(_state(model2), _state(model))  # parameters and BatchNorm buffers
    assert _same_optimizer(opt2, opt) and opt2.state_dict()["state"]  # moments / momentum buffers, step counts
    assert _sched_state(sched2) == _sched_state(sched) and sched2.last_epoch == 3
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_continues_bit_identically_after_a_load(tmp_path, optimizer):
    model, opt, sched = _trainables(optimizer)
    _step(model, opt, sched, 2)
    save_checkpoint(tmp_path / "last.safetensors", model, opt, sched, {"epoch": 2})
    _step(model, opt, sched, 3)  # draws its inputs from the RNG saved in the checkpoint

    model2, opt2, sched2 = _trainables(optimizer, seed=11)
    load_checkpoint(tmp_path / "last.safetensors", model2, opt2, sched2)
    _step(model2, opt2, sched2, 3)
    assert _same(_state(model2), _state(model))


def test_an_optimizer_that_has_not_stepped_round_trips(tmp_path):
    model, opt, sched = _trainables()
    save_checkpoint(tmp_path / "last.safetensors", model, opt, sched, {"epoch": 0})
    model2, opt2, sched2 = _trainables(seed=1)
    assert load_checkpoint(tmp_path / "last.safetensors", model2, opt2, sched2)["epoch"] == 0
    assert _same(_state(model2), _state(model)) and opt2.state_dict()["state"] == {}


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, opt, sched, {"epoch": 1})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(k for k in f.keys() if k.startswith("model.")) == ["model.emb.weight"]
    torch.manual_seed(1)
    other = Tied()
    opt2 = torch.optim.SGD(other.parameters(), lr=0.1)
    load_checkpoint(path, other, opt2, torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0))
    assert torch.equal(other.head.weight, model.emb.weight) and other.head.weight is other.emb.weight


def test_the_file_holds_the_state_and_a_checksum(tmp_path):
    model, opt, sched = _trainables()
    _step(model, opt, sched)
    path = tmp_path / "last.safetensors"
    save_checkpoint(path, model, opt, sched, {"epoch": 1, "best_epoch": 1})
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert set(meta) == {"loop", "optim", "sched", "sha256"} and len(meta["sha256"]) == 64
    assert json.loads(meta["loop"]) == {"epoch": 1, "best_epoch": 1}
    assert "rng.torch" in keys and {f"model.{k}" for k in model.state_dict()} <= keys
    assert any(k.startswith("optim.0.exp_avg") for k in keys)


# ---------------------------------------------------------------- rotation: last and last.prev
def test_each_save_keeps_the_one_it_replaces_as_previous(tmp_path):
    _save_epochs(tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    (tmp_path / "b").mkdir()
    weights = _save_epochs(tmp_path / "b", 3)
    last = tmp_path / "b" / "last.safetensors"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.prev.safetensors", "last.safetensors"]  # no temporaries
    assert (_epoch(last), _epoch(previous(last))) == (3, 2)
    model, opt, sched = _trainables(seed=5)
    assert load_checkpoint(previous(last), model, opt, sched)["epoch"] == 2
    assert _same(_state(model), weights[2])


def test_a_save_that_is_not_the_next_epoch_drops_a_stale_previous(tmp_path):
    _save_epochs(tmp_path, 3)
    last = tmp_path / "last.safetensors"
    model, opt, sched = _trainables()
    save_checkpoint(last, model, opt, sched, {"epoch": 1})  # training started again from scratch
    assert _epoch(last) == 1 and not previous(last).exists()


# ---------------------------------------------------------------- integrity and fall-back
def _damage(last: Path, how: str) -> None:
    if how == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif how == "missing":
        last.unlink()
    elif how == "garbage":
        last.write_bytes(b"\x00" * 64)
    elif how == "flipped tensor byte":  # the header still parses: only the checksum can tell
        data = bytearray(last.read_bytes())
        data[-3] ^= 0xFF
        last.write_bytes(bytes(data))
    elif how == "edited loop state":  # a valid file whose state no longer matches its checksum
        _rewrite(last, lambda t, m: m.update(loop=json.dumps({"epoch": 3, "history": []})))
    elif how == "edited weight":
        _rewrite(last, lambda t, m: t["model.0.weight"].add_(1e-3))
    elif how == "no rng":  # its checksum is recomputed: only the missing RNG state is wrong
        def drop(t, m):
            del t["rng.torch"]
            m.pop("sha256")
            m["sha256"] = ckpt_module._digest(t, m)
        _rewrite(last, drop)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "missing", "garbage", "flipped tensor byte", "edited loop state",
                                 "edited weight", "no rng"])
def test_a_damaged_or_missing_last_falls_back_to_the_previous_and_says_so(tmp_path, how, said):
    weights = _save_epochs(tmp_path, 3)
    last = tmp_path / "last.safetensors"
    _damage(last, how)
    model, opt, sched = _trainables(seed=9)
    loop = load_checkpoint(last, model, opt, sched)
    assert loop == {"epoch": 2, "history": [{"epoch": 2}]}
    assert _same(_state(model), weights[2]) and sched.last_epoch == 2 and opt.state_dict()["state"]
    assert len(said) == 1 and str(last) in said[0] and str(previous(last)) in said[0] and "(epoch 2)" in said[0]
    if how == "missing":
        assert "(missing)" in said[0]
    if how in ("flipped tensor byte", "edited loop state", "edited weight"):
        assert "checksum" in said[0]
    if how == "no rng":
        assert "RNG" in said[0]


def test_with_no_previous_a_damaged_last_is_a_one_line_storage_error(tmp_path, said):
    _save_epochs(tmp_path, 1)
    last = tmp_path / "last.safetensors"
    _damage(last, "flipped tensor byte")
    with pytest.raises(StorageError) as e:
        load_checkpoint(last, *_trainables())
    assert said == []  # nothing was loaded, so no fall-back was announced
    msg = str(e.value)
    assert "\n" not in msg and str(last) in msg and str(previous(last)) in msg
    assert "checksum" in msg and "(missing)" in msg and "--overwrite" in msg


@pytest.mark.parametrize("prev_damage", ["missing", "garbage", "truncated"])
def test_both_unusable_is_one_storage_error_naming_both(tmp_path, prev_damage):
    _save_epochs(tmp_path, 2)
    last = tmp_path / "last.safetensors"
    _damage(last, "truncated")
    _damage(previous(last), prev_damage)
    with pytest.raises(StorageError) as e:
        load_checkpoint(last, *_trainables())
    msg = str(e.value)
    assert isinstance(e.value, ProtegeError) and "\n" not in msg
    assert msg.startswith(f"cannot resume: the checkpoint {last} is unusable") and str(previous(last)) in msg


def test_nothing_at_all_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match=r"\(missing\).*\(missing\)"):
        load_checkpoint(tmp_path / "last.safetensors", *_trainables())


def test_a_file_without_a_checksum_is_taken_as_it_is(tmp_path, said):
    """Checkpoints written before the checksum existed still load."""
    weights = _save_epochs(tmp_path, 1)
    last = tmp_path / "last.safetensors"
    _rewrite(last, lambda t, m: m.pop("sha256"))
    model, opt, sched = _trainables(seed=4)
    assert load_checkpoint(last, model, opt, sched)["epoch"] == 1 and said == []
    assert _same(_state(model), weights[1])


def test_a_checkpoint_of_another_model_is_not_loaded(tmp_path):
    _save_epochs(tmp_path, 1)
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(wider.parameters())
    with pytest.raises(StorageError):
        load_checkpoint(tmp_path / "last.safetensors", wider, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))


# ---------------------------------------------------------------- failed writes
def test_a_failed_write_is_a_storage_error_and_leaves_the_checkpoints_as_they_were(tmp_path, monkeypatch):
    _save_epochs(tmp_path, 2)
    last = tmp_path / "last.safetensors"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module, "save_file", full_disk)
    model, opt, sched = _trainables()
    with pytest.raises(StorageError) as e:
        save_checkpoint(last, model, opt, sched, {"epoch": 3})
    msg = str(e.value)
    assert "\n" not in msg and str(last) in msg and "No space left on device" in msg and "--resume" in msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries, nothing replaced
