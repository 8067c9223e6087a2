"""`timm:<name>` and `torchvision:<name>` models (protege.models.vision.library_model). Their wheels need the
standard torch build, which the test environment does not have, so these tests put small stand-ins for the two
packages in sys.modules (their real entry points: timm.create_model / list_models, torchvision.models.get_model /
list_models) and check what protege asks of them and what it refuses. The real packages were checked by hand in a
separate environment (README)."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from protege.errors import ModelError
from protege.models import build_model
from protege.models.config import ModelSpec
from protege.models.zoo import CNN


def _library(monkeypatch, calls: list) -> None:
    def create_model(name, pretrained, num_classes, in_chans, **kw):
        calls.append(("timm", name, pretrained, num_classes, in_chans, kw))
        return CNN((in_chans, 8, 8), num_classes, channels=(4, 8), depth=1)

    def get_model(name, weights, num_classes, **kw):
        calls.append(("torchvision", name, weights, num_classes, kw))
        if kw:
            raise TypeError(f"__init__() got an unexpected keyword argument '{next(iter(kw))}'")
        return CNN((3, 8, 8), num_classes, channels=(4, 8), depth=1)

    timm = types.ModuleType("timm")
    timm.create_model, timm.list_models = create_model, lambda: ["resnet18", "resnet34", "vit_tiny_patch16_224"]
    tv, tv_models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    tv_models.get_model, tv_models.list_models = get_model, lambda: ["resnet18", "mobilenet_v3_small"]
    tv.models = tv_models
    for name, mod in (("timm", timm), ("torchvision", tv), ("torchvision.models", tv_models)):
        monkeypatch.setitem(sys.modules, name, mod)


def test_models_by_name_with_random_weights_and_the_data_s_classes_and_channels(monkeypatch, tmp_path):
    calls = []
    _library(monkeypatch, calls)
    m = build_model(ModelSpec(model="timm:resnet18", kwargs={"drop_rate": 0.1}), (1, 8, 8), 7)
    assert calls[-1] == ("timm", "resnet18", False, 7, 1, {"drop_rate": 0.1}) and m(torch.zeros(2, 1, 8, 8)).shape == (2, 7)
    build_model(ModelSpec(model="torchvision:resnet18"), (3, 8, 8), 5)
    assert calls[-1] == ("torchvision", "resnet18", None, 5, {})
    from safetensors.torch import save_file

    trained = CNN((3, 8, 8), 5, channels=(4, 8), depth=1)
    save_file(trained.state_dict(), tmp_path / "w.safetensors")  # trained weights come from a file, not a hub
    loaded = build_model(ModelSpec(model="timm:resnet34", weights=str(tmp_path / "w.safetensors")), (3, 8, 8), 5)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))


@pytest.mark.parametrize("ref, shape, words", [
    ("timm:resnet81", (3, 8, 8), "timm has no model 'resnet81'; nearest: resnet18"),
    ("torchvision:resnet18", (1, 8, 8), "takes 3-channel images but the data has 1; set data.channels: 3, or use timm:resnet18"),
    ("timm:resnet18", (64,), "takes images (C, H, W) but the data gives examples of shape [64]"),
])
def test_unknown_names_and_inputs_that_do_not_fit_are_one_line_errors(monkeypatch, ref, shape, words):
    _library(monkeypatch, [])
    with pytest.raises(ModelError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        build_model(ModelSpec(model=ref), shape, 3)
    with pytest.raises(ModelError, match=r"torchvision:resnet18': __init__\(\) got an unexpected keyword argument 'depth'; check its kwargs"):
        build_model(ModelSpec(model="torchvision:resnet18", kwargs={"depth": 3}), (3, 8, 8), 3)


def test_a_missing_package_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ModelError, match=r"model 'timm:resnet18' needs the timm package, which does not load here \(ModuleNotFoundError\); "
                                         r"install it in an environment with the standard torch build: pip install -e '.\[vision\]'"):
        build_model(ModelSpec(model="timm:resnet18"), (3, 8, 8), 3)
