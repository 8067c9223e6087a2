"""Data read on demand (protege.data.stream; data.stream): streamed splits hold the same numbers as in-memory ones,
images are decoded once into a memory-mapped cache, the fit loop reads batches through a DataLoader with workers,
and each process of a multi-process run reads only its shard."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from protege.data import load_data
from protege.data import images as images_module
from protege.data.stream import Rows, batches
from protege.recipe import DataConfig
from protege.train.distiller import label_loss
from protege.train.fit import TrainConfig, _epoch_batches, fit

from .test_images import _folders


def _both(root, **kw):
    cfg = dict(source="images", path=str(root), **kw)
    return load_data(DataConfig(**cfg, stream=False), 0), load_data(DataConfig(**cfg, stream=True, workers=0), 0)


def test_streamed_images_hold_the_same_numbers_as_in_memory_ones(tmp_path):
    mem, streamed = _both(_folders(tmp_path / "imgs"))
    assert not mem.streamed and streamed.streamed and isinstance(streamed.train.x, Rows)
    for a, b in ((mem.train, streamed.train), (mem.val, streamed.val), (mem.test, streamed.test)):
        assert b.x.shape == a.x.shape and b.x.dtype == a.x.dtype
        assert torch.equal(b.x[:], a.x) and torch.equal(b.y, a.y)
    idx = torch.tensor([5, 0, 17, 3])  # any order, as a shuffled batch asks
    assert torch.equal(streamed.train.x[idx], mem.train.x[idx]) and torch.equal(streamed.train.x[2], mem.train.x[2])
    assert "streamed from a memory-mapped file" in streamed.description and "in memory" in mem.description
    assert streamed.preprocessing["streamed"] is True
    for x in (mem.train.x, streamed.train.x[idx], mem.train.x[idx]):  # one channel: channels-last strides, same bytes
        assert x.stride()[1] == 1 and x.is_contiguous(memory_format=torch.channels_last)


def test_minmax_arrays_streamed_from_a_npy_file(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(120, 2, 3, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(120) % 3)
    cfg = dict(source="arrays", path=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy"), scaling="minmax", shape=[2, 9])
    mem, streamed = (load_data(DataConfig(**cfg, stream=s, workers=0), 1) for s in (False, True))
    assert torch.equal(streamed.val.x[:], mem.val.x) and streamed.input_shape == (2, 9)
    assert streamed.fingerprint() == load_data(DataConfig(**cfg, stream=True), 1).fingerprint()
    assert streamed.fingerprint() != load_data(DataConfig(**cfg, stream=True), 2).fingerprint()  # other training rows


def test_images_are_decoded_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    root = _folders(tmp_path / "imgs", per_class=12)
    calls = []
    real = images_module.each_image
    monkeypatch.setattr(images_module, "each_image", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    first = load_data(DataConfig(source="images", path=str(root)), 0)
    again = load_data(DataConfig(source="images", path=str(root)), 0)
    assert len(calls) == 1 and torch.equal(first.train.x, again.train.x)
    f = root / "one" / "0.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # a file edited since: decode again
    load_data(DataConfig(source="images", path=str(root)), 0)
    load_data(DataConfig(source="images", path=str(root), image_size=[6, 6]), 0)  # another size: another cache
    assert len(calls) == 3


def test_a_worker_reopens_the_file_instead_of_copying_it(tmp_path):
    streamed = load_data(DataConfig(source="images", path=str(_folders(tmp_path / "imgs")), stream=True), 0)
    blob = pickle.dumps(streamed.train.x)
    assert len(blob) < 4096  # the row numbers and the file's name, not its images
    assert torch.equal(pickle.loads(blob)[:], streamed.train.x[:])


def test_the_dataloader_with_workers_gives_the_batches_direct_indexing_gives(tmp_path):
    mem, streamed = _both(_folders(tmp_path / "imgs"))
    streamed.train.x.workers = 2
    order = _epoch_batches(len(mem.train), 16, seed=3, epoch=1, rank=0, world=1)
    got = list(batches(streamed.train.x, streamed.train.y, order))
    want = list(batches(mem.train.x, mem.train.y, order))
    assert len(got) == len(want) == len(order)
    for (xa, ya, ia), (xb, yb, ib) in zip(got, want):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)


class _Spy(Rows):
    """Rows that remember which training rows were read."""

    def __init__(self, rows: Rows):
        self.__dict__.update(rows.__dict__)
        self.read: list[int] = []

    def __getitem__(self, key):
        self.read += np.atleast_1d(self.index[key.numpy() if isinstance(key, torch.Tensor) else key]).tolist()
        return super().__getitem__(key)


class _Process(SimpleNamespace):
    """What fit asks of Accelerate, for process ``process_index`` of ``num_processes`` (no communication)."""

    device = torch.device("cpu")
    prepare = staticmethod(lambda *a: a)
    unwrap_model = staticmethod(lambda m: m)
    backward = staticmethod(lambda loss: loss.backward())
    wait_for_everyone = staticmethod(lambda: None)
    trackers = ()  # (no train.log_with)

    @property
    def is_main_process(self):
        return self.process_index == 0


def test_each_process_reads_only_its_shard_of_the_training_rows(tmp_path):
    d = load_data(DataConfig(source="images", path=str(_folders(tmp_path / "imgs")), stream=True, workers=0), 0)
    cfg = TrainConfig(epochs=2, batch_size=8)
    read = []
    for rank in (0, 1):
        spy = _Spy(d.train.x)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
        fit(model, label_loss(), d.train.__class__(spy, d.train.y), d.val, cfg, seed=0, ckpt_dir=tmp_path / f"c{rank}",
            metrics_path=None, stage="student", accelerator=_Process(process_index=rank, num_processes=2))
        read.append(spy.read)
    n = len(d.train)
    for rank in (0, 1):
        shard = np.concatenate([torch.cat(_epoch_batches(n, 8, 0, e, rank, 2)).numpy() for e in (0, 1)])
        assert read[rank] == d.train.x.index[shard].tolist()  # its own batches, nothing else, once each per epoch
    per_epoch = [set(read[r][: len(read[r]) // 2]) for r in (0, 1)]
    assert len(per_epoch[0] & per_epoch[1]) <= 1 and len(per_epoch[0] | per_epoch[1]) == n  # disjoint shards (n odd: one row padded)


def test_two_processes_on_streamed_images_train_the_student_one_process_trains(tmp_path):
    """Two processes with batches of 32 each take the steps one process takes with batches of 64 (the same rows,
    gradients averaged); the teacher cache is written by both, the images decoded by one (the other waits)."""
    import json
    import subprocess
    import sys

    import pytest
    import yaml
    from safetensors.torch import load_file

    import protege
    from protege.recipe import parse_recipe

    from ..test_cli import _free_port

    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("accelerate CLI not installed")
    root = _folders(tmp_path / "imgs", per_class=60)
    recipe = {"name": "two", "seed": 0, "data": {"source": "images", "path": str(root), "stream": True, "workers": 1,
                                 "limit": 128},  # whole batches: no process pads its shard
              "teacher": {"model": "mlp", "kwargs": {"hidden": [32]}, "train": {"epochs": 3, "batch_size": 32}},
              "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
              "distill": {"temperature": 2.0, "alpha": 0.5}, "train": {"epochs": 3, "batch_size": 32, "lr": 0.01},
              "eval": {"warmup": 1, "repeats_b1": 2, "repeats_b32": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "protege.cli", "distill",
           str(tmp_path / "r.yaml"), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recipe["teacher"]["train"]["batch_size"] = recipe["train"]["batch_size"] = 64
    one = protege.distill(parse_recipe(recipe), tmp_path / "one", export=False, evaluate_=False)
    for model in ("teacher", "student"):
        two_w, one_w = (load_file(p / model / "model.safetensors") for p in (tmp_path / "two", one.path))
        assert two_w.keys() == one_w.keys()
        for k in one_w:
            torch.testing.assert_close(two_w[k], one_w[k], atol=1e-5, rtol=1e-5)  # measured: 1.5e-8
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["student"]["accuracy"] > 0.5
