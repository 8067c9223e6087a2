"""The hook layer (module paths under wrappers), adapters, the feature cache, and `protege inspect`."""
import subprocess

import pytest
import torch
from torch import nn

from protege.errors import ProtegeError, RecipeError
from protege.knowledge import Teacher, extract, load_or_build_cache, resolve, unwrap
from protege.models.zoo import CNN, ResNet
from protege.train.adapters import make_adapter

from .conftest import PROTEGE
from .log_capture import logged


def _cnn() -> CNN:
    torch.manual_seed(0)
    return CNN((1, 8, 8), 10, channels=(4, 8), depth=1).eval()


def test_extract_returns_logits_and_the_hooked_features():
    model, x = _cnn(), torch.randn(3, 1, 8, 8)
    out = extract(model, x, ["features.0", "features.1.0", "logits"])
    assert torch.equal(out.logits, model(x))
    assert out.features["features.0"].shape == (3, 4, 4, 4) and out.features["features.1.0"].shape == (3, 8, 4, 4)
    assert torch.equal(out.features["features.0"], model.features[0](x))
    assert out.features["logits"] is out.logits
    assert not model.features[0]._forward_hooks  # hooks are removed after the pass


class _DDPLike(nn.Module):  # the attribute layout of DistributedDataParallel, without a process group
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


_DDPLike.__name__ = "DistributedDataParallel"


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_paths_work_through_ddp_and_compile_wrappers(prefix):
    model, x = _cnn(), torch.randn(2, 1, 8, 8)
    want = model.features[1](model.features[0](x))
    compiled = torch.compile(model, backend="eager")
    wrapped = _DDPLike(compiled)
    for m in (model, compiled, wrapped):
        assert unwrap(m) is model
        out = extract(m, x, [prefix + "features.1"])
        torch.testing.assert_close(out.features[prefix + "features.1"], want)


def test_unknown_path_lists_the_nearest_valid_ones():
    with pytest.raises(RecipeError, match=r"no module 'features.3'.*nearest valid paths: .*features\.\d"):
        resolve(_cnn(), "features.3", "student")
    with pytest.raises(RecipeError, match="layer1.0.conv1"):
        resolve(ResNet((1, 8, 8), 10, depth=8), "layer1.0.conv", "teacher")


def test_adapters_bridge_shapes_and_refuse_what_cannot_be_bridged():
    a = make_adapter((4, 8, 8), (16, 4, 4), "t")
    assert a(torch.randn(2, 4, 8, 8)).shape == (2, 16, 4, 4)
    assert make_adapter((4, 2, 2), (4, 4, 4), "t")(torch.randn(2, 4, 2, 2)).shape == (2, 4, 4, 4)
    assert make_adapter((5,), (9,), "t")(torch.randn(2, 5)).shape == (2, 9)
    assert make_adapter((7, 5), (7, 9), "t")(torch.randn(2, 7, 5)).shape == (2, 7, 9)
    with pytest.raises(RecipeError, match=r"no adapter can map shape \(4, 8, 8\) to \(16,\)"):
        make_adapter((4, 8, 8), (16,), "t")


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


def test_inspect_lists_paths_with_shapes_and_params():
    from protege.api import inspect

    table = inspect("cnn", "1,28,28")
    assert "features.1.0" in table and "32x14x14" in table and "4,608" in table
    assert table.strip().splitlines()[-1].split()[-1] == "24,058"  # the zoo student's parameter count


def test_inspect_a_run_and_bad_shapes(tmp_path, tiny):
    import protege
    from protege.recipe import parse_recipe

    tiny["train"]["epochs"] = tiny["teacher"]["train"]["epochs"] = 1
    run = protege.distill(parse_recipe(tiny), tmp_path / "r", export=False, evaluate_=False)
    out = subprocess.run([PROTEGE, "inspect", str(run.path), "--teacher"], capture_output=True, text=True)
    assert out.returncode == 0 and "body.1" in out.stdout and "64" in out.stdout
    bad = subprocess.run([PROTEGE, "inspect", "cnn", "--input-shape", "1,a"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--input-shape '1,a' must be positive integers" in bad.stderr
    with pytest.raises(ProtegeError, match="cannot run on input shape"):
        from protege.api import inspect

        inspect("cnn", [1, 1, 1])  # too small to pool
