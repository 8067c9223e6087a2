"""Focused tests of the fit loop (protege.train.fit.fit) on a tiny MLP and a synthetic 3-class problem:
seeded batch order, the optimizers and schedules (checked bit-exactly against a hand-written loop), per-epoch
validation and best-epoch selection and restore, metrics.jsonl rows, checkpoints and exact resume, and the
divergence guard. Each fit takes a few tens of milliseconds."""
from __future__ import annotations

import copy
import importlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors import safe_open
from torch import nn

from protege.data import Split
from protege.recipe import TrainConfig
from protege.train.checkpoint import previous
from protege.train.fit import FitResult, fit
from protege.train.guard import Diverged

fit_module = importlib.import_module("protege.train.fit")  # protege.train.fit is also the function

N_TRAIN, N_VAL, BATCH = 40, 24, 16          # 3 steps per epoch: batches of 16, 16 and 8
STEPS = math.ceil(N_TRAIN / BATCH)


def _split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    w = torch.tensor([[1.0, -1.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.2, 1.0], [0.3, -0.4, 0.2]])
    return Split(x, (x @ w).argmax(-1))


TRAIN, VAL = _split(N_TRAIN, 0), _split(N_VAL, 1)


def _model(dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 8), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, 3))


def ce_loss(model, x, y, idx):
    loss = F.cross_entropy(model(x), y)
    return {"loss": loss, "ce": loss.detach()}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": BATCH, "lr": 0.05, **kw})


def _run(tmp: Path, model: nn.Module, cfg: TrainConfig, *, loss_fn=ce_loss, seed: int = 0, stage: str = "student",
         **kw) -> FitResult:
    return fit(model, loss_fn, TRAIN, VAL, cfg, seed=seed, ckpt_dir=tmp / "ckpt", metrics_path=tmp / "metrics.jsonl",
               stage=stage, accelerator=Accelerator(cpu=True), **kw)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def _ckpt_epoch(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["loop"])["epoch"]


def _ckpt_model(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """best.safetensors: a plain state dict."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _recording(log: list[torch.Tensor], inner=ce_loss):
    def loss_fn(model, x, y, idx):
        assert torch.equal(x, TRAIN.x[idx]) and torch.equal(y, TRAIN.y[idx])  # the batch is the examples idx names
        log.append(idx.clone())
        return inner(model, x, y, idx)
    return loss_fn


# ---------------------------------------------------------------- batches, optimizers, schedules
def test_batch_order_is_a_seeded_permutation_per_epoch(tmp_path):
    def order(seed: int, folder: str) -> list[list[torch.Tensor]]:
        log: list[torch.Tensor] = []
        _run(tmp_path / folder, _model(), _cfg(), loss_fn=_recording(log), seed=seed)
        assert len(log) == 3 * STEPS and [len(i) for i in log[:STEPS]] == [16, 16, 8]
        return [log[e * STEPS:(e + 1) * STEPS] for e in range(3)]

    first, again, other = order(0, "a"), order(0, "b"), order(1, "c")
    for epoch in first:  # every example exactly once per epoch
        assert sorted(torch.cat(epoch).tolist()) == list(range(N_TRAIN))
    cat = [torch.cat(e) for e in first]
    assert not torch.equal(cat[0], cat[1]) and not torch.equal(cat[1], cat[2])  # reshuffled each epoch
    assert all(torch.equal(a, b) for a, b in zip(cat, [torch.cat(e) for e in again]))  # same seed, same order
    assert not torch.equal(cat[0], torch.cat(other[0]))  # another seed, another order


@pytest.mark.parametrize("optimizer, schedule", [("adamw", "cosine"), ("sgd", "constant"), ("sgd", "cosine")])
def test_fit_matches_a_hand_written_loop_bit_for_bit(tmp_path, optimizer, schedule):
    """AdamW / nesterov SGD with the configured lr, weight decay and momentum, stepped once per batch under a cosine
    (to zero at the last step) or constant schedule: replaying fit's batches by hand gives the very same weights."""
    cfg = _cfg(epochs=2, optimizer=optimizer, schedule=schedule, weight_decay=0.01, momentum=0.8)
    model = _model()
    ref = copy.deepcopy(model)
    log: list[torch.Tensor] = []
    scores = iter([1.0, 2.0])  # the last epoch is the best: fit returns the last weights
    result = _run(tmp_path, model, cfg, loss_fn=_recording(log), validate=lambda m, d: {"score": next(scores)})
    assert result.best_epoch == 2 and result.epochs_run == 2

    if optimizer == "sgd":
        opt = torch.optim.SGD(ref.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * STEPS
    factor = (lambda s: 1.0) if schedule == "constant" else (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for idx in log:
        loss = F.cross_entropy(ref(TRAIN.x[idx]), TRAIN.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert _same(_state(model), _state(ref))
    assert not _same(_state(model), _state(_model()))  # it did train


def test_sgd_and_adamw_are_different_optimizers(tmp_path):
    a, s = _model(), _model()
    _run(tmp_path / "a", a, _cfg(epochs=1, optimizer="adamw"), validate=lambda m, d: {"score": 0.0})
    _run(tmp_path / "s", s, _cfg(epochs=1, optimizer="sgd"), validate=lambda m, d: {"score": 0.0})
    assert not _same(_state(a), _state(s))
    with safe_open(str(tmp_path / "s" / "ckpt" / "last.safetensors"), framework="pt") as f:
        group = json.loads(f.metadata()["optim"])["param_groups"][0]
    assert group["nesterov"] is True and group["momentum"] == 0.9 and "betas" not in group
    with safe_open(str(tmp_path / "a" / "ckpt" / "last.safetensors"), framework="pt") as f:
        assert "betas" in json.loads(f.metadata()["optim"])["param_groups"][0]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_the_lr_column_follows_the_schedule(tmp_path, schedule):
    cfg = _cfg(epochs=4, schedule=schedule, lr=0.02)
    result = _run(tmp_path, _model(), cfg)
    lrs = [r["lr"] for r in result.history]
    if schedule == "constant":
        assert lrs == [0.02] * 4
    else:
        expected = [0.02 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(1, 5)]
        assert lrs == pytest.approx(expected, abs=1e-12)
        assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs == sorted(lrs, reverse=True)


# ---------------------------------------------------------------- validation and the best epoch
def test_default_validation_is_accuracy_and_the_best_epoch_is_restored(tmp_path):
    model = _model()
    result = _run(tmp_path, model, _cfg(epochs=4, lr=0.1))
    accs = [r["val_accuracy"] for r in result.history]
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert result.best_val_accuracy == max(accs) and result.best_epoch == accs.index(max(accs)) + 1
    with torch.no_grad():  # the returned model holds the selected epoch's weights
        restored = float((model(VAL.x).argmax(-1) == VAL.y).float().mean())
    assert restored == pytest.approx(result.best_val_accuracy)
    assert result.best_val_accuracy > 0.5  # a separable 3-class problem: training did something


def test_custom_validate_score_selects_and_restores_the_best_epoch(tmp_path):
    scores = [0.2, 0.7, 0.4]
    seen: list[dict[str, torch.Tensor]] = []
    devices: list[torch.device] = []

    def validate(model, device):
        seen.append(_state(model))
        devices.append(device)
        return {"score": scores[len(seen) - 1], "val_custom": 10.0 * len(seen)}

    model = _model()
    result = _run(tmp_path, model, _cfg(), validate=validate)
    assert len(seen) == 3 and all(torch.device(d).type == "cpu" for d in devices)
    assert (result.best_epoch, result.best_val_accuracy, result.epochs_run) == (2, 0.7, 3)
    assert _same(_state(model), seen[1]) and not _same(_state(model), seen[2])  # epoch 2's weights, restored
    assert _same(_weights(tmp_path / "ckpt" / "best.safetensors"), seen[1])
    assert _same(_ckpt_model(tmp_path / "ckpt" / "last.safetensors"), seen[2])  # the checkpoint is the last epoch
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["val_custom"] for r in rows] == [10.0, 20.0, 30.0]
    assert all("score" not in r and "val_accuracy" not in r for r in rows)  # the score selects; it is not a column


def test_a_tie_keeps_the_earlier_epoch(tmp_path):
    seen: list[dict[str, torch.Tensor]] = []
    scores = iter([0.5, 0.5, 0.1])

    def validate(model, device):
        seen.append(_state(model))
        return {"score": next(scores)}

    model = _model()
    result = _run(tmp_path, model, _cfg(), validate=validate)
    assert result.best_epoch == 1 and _same(_state(model), seen[0])


# ---------------------------------------------------------------- metrics.jsonl and checkpoints
def test_one_metrics_row_per_epoch_with_the_batch_means(tmp_path):
    def loss_fn(model, x, y, idx):
        out = ce_loss(model, x, y, idx)
        return {**out, "batch": torch.tensor(float(len(idx)))}

    result = _run(tmp_path, _model(), _cfg(), loss_fn=loss_fn)
    rows = _rows(tmp_path / "metrics.jsonl")
    assert _untimed(rows) == _untimed(result.history)
    assert [(r["stage"], r["epoch"], r["processes"]) for r in rows] == [("student", e, 1) for e in (1, 2, 3)]
    assert set(rows[0]) == {"stage", "epoch", "loss", "ce", "batch", "val_accuracy", "lr", "epoch_time_s", "processes"}
    assert all(r["batch"] == pytest.approx(40 / 3) for r in rows)  # the mean over the epoch's batches (16, 16, 8)
    assert all(r["loss"] == pytest.approx(r["ce"]) and r["epoch_time_s"] >= 0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_checkpoints_are_the_last_epoch_and_the_one_before(tmp_path):
    model = _model()
    _run(tmp_path, model, _cfg(), validate=lambda m, d: {"score": 0.0})  # best stays epoch 1
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.safetensors", "last.prev.safetensors", "last.safetensors"]
    last = ckpt / "last.safetensors"
    assert _ckpt_epoch(last) == 3 and _ckpt_epoch(previous(last)) == 2
    assert _same(_weights(ckpt / "best.safetensors"), _state(model))  # restored to epoch 1 ...
    assert not _same(_ckpt_model(last), _state(model))  # ... which is not the last checkpoint


def test_a_fresh_start_drops_its_stage_old_rows_and_keeps_the_others(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    old = [{"stage": "teacher", "epoch": 1, "loss": 1.0}, {"stage": "student", "epoch": 1, "loss": 9.0},
           {"stage": "student", "epoch": 7, "loss": 9.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in old) + "{not json\n")
    _run(tmp_path, _model(), _cfg(epochs=2))
    rows = _rows(metrics)
    assert rows[0] == old[0]  # another stage's row stays; the damaged line is dropped
    assert [(r["stage"], r["epoch"]) for r in rows] == [("teacher", 1), ("student", 1), ("student", 2)]
    assert rows[1]["loss"] != 9.0


# ---------------------------------------------------------------- exact resume
class Interrupted(Exception):
    pass


def _interrupting(after_calls: int):
    calls = [0]

    def loss_fn(model, x, y, idx):
        calls[0] += 1
        if calls[0] > after_calls:
            raise Interrupted()
        return ce_loss(model, x, y, idx)
    return loss_fn


@pytest.mark.parametrize("k, damage", [(1, None), (2, None), (2, "truncated"), (2, "missing")])
def test_an_interrupted_run_resumes_bit_identically(tmp_path, k, damage):
    """Killed during epoch k+1 (after its first step): the resumed run ends with exactly the weights, history and
    metrics of a run that never stopped, also when the last checkpoint was damaged or lost (it falls back to the
    previous one, one epoch earlier, and redoes that epoch). The model has dropout, so the RNG must be restored."""
    cfg = _cfg(epochs=4, lr=0.05)
    reference = _model(dropout=0.25)
    ref_result = _run(tmp_path / "ref", reference, cfg)

    with pytest.raises(Interrupted):
        _run(tmp_path / "run", _model(dropout=0.25), cfg, loss_fn=_interrupting(k * STEPS + 1))
    last = tmp_path / "run" / "ckpt" / "last.safetensors"
    assert _ckpt_epoch(last) == k
    assert [r["epoch"] for r in _rows(tmp_path / "run" / "metrics.jsonl")] == list(range(1, k + 1))
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:200])
    elif damage == "missing":
        last.unlink()

    torch.manual_seed(12345)
    torch.rand(100)  # whatever ran in between must not matter
    resumed = _model(dropout=0.25, seed=99)  # other initial weights: they come from the checkpoint
    result = _run(tmp_path / "run", resumed, cfg, resume=True)

    assert _same(_state(resumed), _state(reference))
    assert _same(_ckpt_model(last), _ckpt_model(tmp_path / "ref" / "ckpt" / "last.safetensors"))
    assert (result.best_epoch, result.best_val_accuracy, result.epochs_run) == \
           (ref_result.best_epoch, ref_result.best_val_accuracy, 4)
    assert _untimed(result.history) == _untimed(ref_result.history)
    assert _untimed(_rows(tmp_path / "run" / "metrics.jsonl")) == _untimed(_rows(tmp_path / "ref" / "metrics.jsonl"))


def test_resume_drops_a_row_written_for_an_epoch_it_redoes(tmp_path):
    """Metrics are written before the checkpoint: a kill between the two leaves a row for an epoch that the resume
    does again; it must not appear twice."""
    cfg = _cfg(epochs=3)
    ref_result = _run(tmp_path / "ref", _model(), cfg)
    with pytest.raises(Interrupted):
        _run(tmp_path / "run", _model(), cfg, loss_fn=_interrupting(STEPS + 1))
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write(json.dumps({"stage": "student", "epoch": 2, "loss": 123.0}) + "\n")
        f.write(json.dumps({"stage": "teacher", "epoch": 5, "loss": 1.0}) + "\n")
    _run(tmp_path / "run", _model(seed=5), cfg, resume=True)
    rows = _rows(metrics)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("student", 1), ("teacher", 5), ("student", 2), ("student", 3)]
    assert _untimed([r for r in rows if r["stage"] == "student"]) == _untimed(ref_result.history)


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path):
    a, b = _model(), _model()
    ra = _run(tmp_path / "a", a, _cfg(epochs=2))
    rb = _run(tmp_path / "b", b, _cfg(epochs=2), resume=True)
    assert _same(_state(a), _state(b)) and _untimed(ra.history) == _untimed(rb.history)


def test_resuming_a_finished_run_trains_no_more_and_restores_the_best(tmp_path):
    scores = iter([0.9, 0.1])
    model = _model()
    _run(tmp_path, model, _cfg(epochs=2), validate=lambda m, d: {"score": next(scores)})
    calls: list[torch.Tensor] = []
    again = _model(seed=7)
    result = _run(tmp_path, again, _cfg(epochs=2), loss_fn=_recording(calls), resume=True,
                  validate=lambda m, d: pytest.fail("no epoch is left to validate"))
    assert calls == [] and result.epochs_run == 2 and result.best_epoch == 1
    assert _same(_state(again), _state(model))


def test_a_stage_randomness_does_not_depend_on_what_ran_before(tmp_path):
    """Dropout masks come from a seed of (seed, stage), not from the process's RNG state at the call."""
    def train(folder: str, stage: str, noise: int) -> dict[str, torch.Tensor]:
        model = _model(dropout=0.5)
        torch.manual_seed(noise)
        _run(tmp_path / folder, model, _cfg(epochs=1), stage=stage, validate=lambda m, d: {"score": 0.0})
        return _state(model)

    a, b, c = train("a", "student", 1), train("b", "student", 2), train("c", "teacher", 1)
    assert _same(a, b) and not _same(a, c)


def test_augment_applies_to_the_training_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(fit_module, "augment_images", lambda x: x + 100.0)
    seen: list[torch.Tensor] = []

    def loss_fn(model, x, y, idx):
        seen.append(x - TRAIN.x[idx])
        return ce_loss(model, x, y, idx)

    _run(tmp_path / "on", _model(), _cfg(epochs=1), loss_fn=loss_fn, augment=True)
    assert len(seen) == STEPS and all(torch.allclose(d, torch.full_like(d, 100.0)) for d in seen)
    seen.clear()
    _run(tmp_path / "off", _model(), _cfg(epochs=1), loss_fn=loss_fn)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in seen)


# ---------------------------------------------------------------- divergence guard
def _nan_from(call: int):
    calls = [0]

    def loss_fn(model, x, y, idx):
        calls[0] += 1
        out = ce_loss(model, x, y, idx)
        if calls[0] >= call:
            out["loss"] = out["loss"] * float("nan")
        return out
    return loss_fn


def test_a_nan_loss_raises_diverged_naming_the_lr_field_and_keeps_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(Diverged) as e:
        _run(tmp_path, _model(), _cfg(lr=0.05), loss_fn=_nan_from(STEPS + 2), lr_field="student.train.lr")
    msg = str(e.value)
    assert "student.train.lr" in msg and "(now 0.05)" in msg and "epoch 2/3" in msg and "step 2" in msg
    assert "nan" in msg and "\n" not in msg
    last = tmp_path / "ckpt" / "last.safetensors"
    assert f"epoch 1) is kept in {last}" in msg
    assert _ckpt_epoch(last) == 1 and all(torch.isfinite(t).all() for t in _ckpt_model(last).values())
    assert [r["epoch"] for r in _rows(tmp_path / "metrics.jsonl")] == [1]


def test_a_nan_loss_in_the_first_epoch_says_nothing_was_saved(tmp_path):
    with pytest.raises(Diverged) as e:
        _run(tmp_path, _model(), _cfg(), loss_fn=_nan_from(1))
    assert "train.lr" in str(e.value) and "nothing of this stage was saved" in str(e.value)
    assert not (tmp_path / "ckpt" / "last.safetensors").exists()


def test_an_infinite_loss_is_caught_before_the_step(tmp_path):
    model = _model()
    before = _state(model)

    def loss_fn(model, x, y, idx):
        return {"loss": ce_loss(model, x, y, idx)["loss"] * float("inf")}

    with pytest.raises(Diverged, match="inf"):
        _run(tmp_path, model, _cfg(), loss_fn=loss_fn)
    assert _same(_state(model), before)  # no optimizer step was taken with it


def test_non_finite_weights_after_an_epoch_raise_diverged_before_saving(tmp_path):
    calls = [0]

    def loss_fn(model, x, y, idx):
        out = ce_loss(model, x, y, idx)
        calls[0] += 1
        if calls[0] == 2 * STEPS:  # epoch 2's last step: the loss is finite, the weights after it are not
            with torch.no_grad():
                list(model.parameters())[-1].fill_(float("nan"))  # a bias: not saved for backward
        return out

    with pytest.raises(Diverged) as e:
        _run(tmp_path, _model(), _cfg(), loss_fn=loss_fn, lr_field="teacher.train.lr")
    assert "weight tensor(s) hold NaN or inf" in str(e.value) and "teacher.train.lr" in str(e.value)
    assert "epoch 2/3" in str(e.value)
    assert _ckpt_epoch(tmp_path / "ckpt" / "last.safetensors") == 1


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_old_nan_tokens_in_metrics_become_null(tmp_path, capsys):
    """A metrics.jsonl from an older version with bare NaN tokens is rewritten as strict JSON on the next row."""
    from protege.train.fit import _append_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "teacher", "epoch": 1, "loss": NaN}\n{"broken\n')
    _append_metrics(path, "student", 0, {"stage": "student", "epoch": 1, "loss": float("inf")})
    assert _strict_json_lines(path) == [{"stage": "teacher", "epoch": 1, "loss": None}, {"stage": "student", "epoch": 1, "loss": None}]
