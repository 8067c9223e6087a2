"""The hook layer (protege.knowledge.features): features by module path, through DDP and torch.compile wrappers,
and the errors for unknown paths and modules that are never called."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from protege.errors import RecipeError
from protege.knowledge import extract, resolve, unwrap
from protege.models.zoo import CNN, ResNet

from ..helpers import assert_clean_error, run_cli
from ..helpers import tiny_recipe_file as _recipe


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


def test_hooking_a_container_that_is_never_called_is_one_line(tmp_path, capsys):
    mod = tmp_path / "staged.py"
    mod.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Staged(nn.Module):
            def __init__(self, in_shape, num_classes):
                super().__init__()
                self.stages = nn.ModuleDict({"a": nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()),
                                             "b": nn.Linear(32, num_classes)})
            def forward(self, x):
                for stage in self.stages.values():
                    x = stage(x)
                return x

        def build(in_shape, num_classes):
            return Staged(in_shape, num_classes)
    """))
    recipe = _recipe(tmp_path, lambda r: (r["student"].update(model=f"{mod}:build", kwargs={}),
                                          r["distill"].update(features=[{"student": "stages", "teacher": "body.0", "loss": "hint"}])))
    code, err = run_cli(["distill", recipe, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "'stages'", "never called", "protege inspect")
