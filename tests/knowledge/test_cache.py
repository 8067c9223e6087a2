"""The teacher cache (protege.knowledge.cache): built once and reused only with a matching fingerprint, fp16
memory-mapped features, checksums, and damaged or old caches rebuilt."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from protege.knowledge import Teacher, load_or_build_cache
from protege.models.zoo import CNN

from ..log_capture import logged
from ..helpers import truncate_file as _truncate, scribble_file as _scribble


def test_cache_reused_only_with_matching_fingerprint(tmp_path):
    from protege.knowledge import load_or_build_cache
    from protege.models.zoo import MLP

    model, x, calls, logs = MLP((4,), 3, hidden=[5]), torch.randn(20, 4), {"n": 0}, []
    model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    key = {"teacher": "aaa", "data": "d"}
    with logged(logs):
        first = load_or_build_cache(tmp_path / "c", key, model, x)
        again = load_or_build_cache(tmp_path / "c", key, model, x)
    idx = torch.tensor([3, 0, 7])
    assert calls["n"] == 1 and torch.equal(first.get(idx).logits, again.get(idx).logits) and len(logs) == 1
    assert torch.allclose(again.get(idx).logits, model(x[idx]))  # (one more forward)
    with logged(logs):
        load_or_build_cache(tmp_path / "c", {"teacher": "bbb", "data": "d"}, model, x)
    assert calls["n"] == 3 and "the teacher weights changed" in logs[1]
    with logged(logs):
        load_or_build_cache(tmp_path / "c", {"teacher": "bbb", "data": "d"}, model, x, ["body.1"])
    assert calls["n"] == 4 and "the hooked feature paths changed" in logs[3]


def _cnn() -> CNN:
    torch.manual_seed(0)
    return CNN((1, 8, 8), 10, channels=(4, 8), depth=1).eval()


def test_feature_cache_is_fp16_memory_mapped_and_matches_live_outputs(tmp_path):
    import numpy as np

    model, x = _cnn(), torch.randn(40, 1, 8, 8)
    cache = load_or_build_cache(tmp_path / "c", {"teacher": "t", "data": "d"}, model, x, ["features.0"])
    assert isinstance(cache.arrays["features.0"], np.memmap) and cache.arrays["features.0"].dtype == np.float16
    assert cache.arrays["logits"].dtype == np.float32
    idx = torch.tensor([5, 1, 39])
    cached = Teacher(model, cache, ["features.0", "logits"])(x[idx], idx)
    live = Teacher(model, None, ["features.0", "logits"])(x[idx], idx)
    torch.testing.assert_close(cached.logits, live.logits)
    torch.testing.assert_close(cached.features["features.0"], live.features["features.0"], atol=1e-2, rtol=1e-3)
    assert cached.features["features.0"].dtype == torch.float32


def test_cache_with_other_paths_is_rebuilt_never_reused(tmp_path):
    model, x, logs = _cnn(), torch.randn(10, 1, 8, 8), []
    with logged(logs):
        load_or_build_cache(tmp_path / "c", {"teacher": "t", "data": "d"}, model, x, ["features.0"])
        again = load_or_build_cache(tmp_path / "c", {"teacher": "t", "data": "d"}, model, x, ["features.1"])
    assert again.paths == ["features.1"] and any("hooked feature paths changed" in m for m in logs)
    assert not (tmp_path / "c.tmp").exists()


def _cache_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    return model, torch.randn(300, 8)


def test_cache_round_trip_and_checksums(tmp_path):
    from protege.knowledge.cache import file_sha256, load_or_build_cache

    model, x = _cache_inputs()
    said: list[str] = []
    with logged(said):
        cache = load_or_build_cache(tmp_path / "c", {"teacher": "t", "data": "d"}, model, x, ["0"])
    with torch.no_grad():
        assert np.array_equal(cache.arrays["logits"], model(x).numpy())
        assert np.array_equal(cache.arrays["0"], model[0](x).numpy().astype(np.float16))
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["format"] == 3
    for e in meta["entries"].values():
        assert e["sha256"] == file_sha256(tmp_path / "c" / e["file"])
    assert not (tmp_path / "c.tmp").exists()
    said.clear()
    with logged(said):
        load_or_build_cache(tmp_path / "c", {"teacher": "t", "data": "d"}, model, x, ["0"])
    assert said == []  # reused


@pytest.mark.parametrize("damage", ["scribbled", "truncated", "old format"])
def test_damaged_or_old_cache_is_rebuilt(tmp_path, damage):
    from protege.knowledge.cache import load_or_build_cache

    model, x = _cache_inputs()
    folder, key = tmp_path / "c", {"teacher": "t", "data": "d"}
    load_or_build_cache(folder, key, model, x)
    meta = json.loads((folder / "meta.json").read_text())
    file = folder / meta["entries"]["logits"]["file"]
    if damage == "scribbled":
        _scribble(file, 128)  # every value, header kept: np.load alone would accept it
        assert np.load(file, mmap_mode="r").shape == (300, 5)
    elif damage == "truncated":
        _truncate(file, 0.9)
    else:  # a cache written before checksums existed
        for e in meta["entries"].values():
            del e["sha256"]
        del meta["format"]
        (folder / "meta.json").write_text(json.dumps(meta))
    said: list[str] = []
    with logged(said):
        cache = load_or_build_cache(folder, key, model, x)
    assert "rebuilding" in said[0] and str(folder) in said[0]
    assert ("older protege" in said[0]) == (damage == "old format")
    assert ("does not match its checksum" in said[0]) == (damage != "old format")
    with torch.no_grad():
        assert np.array_equal(cache.arrays["logits"], model(x).numpy())


def test_two_processes_write_one_cache_in_parallel_equal_to_one_process(tmp_path):
    import copy
    import threading

    from protege.knowledge.cache import Share

    model, x = _cnn(), torch.randn(37, 1, 8, 8)  # 37: the second process's block is the shorter one
    one = load_or_build_cache(tmp_path / "one", {"teacher": "t", "data": "d"}, model, x, ["features.0"])
    barrier, seen, errors = threading.Barrier(2, timeout=60), {}, []

    def process(rank: int) -> None:
        try:
            part = Share(rank, 2, barrier.wait)
            seen[rank] = part.rows(len(x))
            own = copy.deepcopy(model)  # a process's own copy (threads must not share forward hooks)
            load_or_build_cache(tmp_path / "two", {"teacher": "t", "data": "d"}, own, x, ["features.0"], part)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen == {0: range(0, 19), 1: range(19, 37)}
    two = load_or_build_cache(tmp_path / "two", {"teacher": "t", "data": "d"}, model, x, ["features.0"])  # reused: checksums hold
    for name in one.arrays:  # equal up to float rounding (the teacher ran in batches of other sizes)
        np.testing.assert_allclose(two.arrays[name].astype(np.float32), one.arrays[name].astype(np.float32), atol=2e-3, rtol=2e-3)
    assert two.meta["entries"]["logits"]["shape"] == [37, 10] and (np.abs(two.arrays["logits"]).max(axis=1) > 0).all()  # every row written
    assert not (tmp_path / "two.tmp").exists()
