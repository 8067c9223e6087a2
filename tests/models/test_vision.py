"""Hugging Face image classifiers from local folders (protege.models.vision): ViT and ResNet as teacher and student,
their input checked against the data, hookable by module path, end to end to ONNX."""
from __future__ import annotations

import pytest
import torch

import protege
from protege.errors import ModelError
from protege.knowledge.features import resolve
from protege.models import build_model
from protege.recipe import ModelSpec, parse_recipe


def _vit(folder, channels: int = 1, size: int = 8):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=size, patch_size=4, num_channels=channels, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=10)
    ViTForImageClassification(cfg).save_pretrained(folder)
    return str(folder)


def _resnet(folder):
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    ResNetForImageClassification(cfg).save_pretrained(folder)
    return str(folder)


def test_a_vit_folder_is_an_image_classifier_with_hookable_modules(tmp_path):
    model = build_model(ModelSpec(model=_vit(tmp_path / "vit")), (1, 8, 8), 10)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert resolve(model, "model.vit.layers.1", "teacher") is not None
    smaller = build_model(ModelSpec(model=str(tmp_path / "vit"), kwargs={"pretrained": False, "num_hidden_layers": 1}),
                          (1, 8, 8), 3)
    assert smaller(torch.randn(2, 1, 8, 8)).shape == (2, 3) and len(smaller.model.vit.layers) == 1


@pytest.mark.parametrize("shape, words", [
    ((3, 8, 8), ["reads images of 1 channel(s) but the data has 3", "data.channels: 1"]),
    ((1, 16, 16), ["reads 8x8 images but the data's are 16x16", "data.image_size: [8, 8]"]),
    ((64,), ["not [channels, height, width]"]),
])
def test_an_image_classifier_that_does_not_fit_the_data_is_refused(tmp_path, shape, words):
    with pytest.raises(ModelError) as e:
        build_model(ModelSpec(model=_vit(tmp_path / "vit")), shape, 10)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_vit_teacher_and_a_resnet_student_from_folders_end_to_end(tmp_path, tiny):
    tiny["teacher"] = {"model": _vit(tmp_path / "vit"), "train": {"epochs": 2}}
    tiny["student"] = {"model": _resnet(tmp_path / "resnet"), "kwargs": {"pretrained": False}}
    tiny["train"]["epochs"] = 1
    tiny["distill"] = {"features": [{"loss": "rkd_distance", "student": "model.resnet.pooler",
                                     "teacher": "model.vit.layernorm", "weight": 0.1}]}
    run = protege.distill(parse_recipe(tiny), tmp_path / "run")
    assert run.report.teacher.accuracy > 0.3  # trained here: far above chance (10%)
    assert run.report.student_onnx.accuracy == pytest.approx(run.report.student.accuracy)
    assert run.onnx_path.is_file()


# ---------------------------------------------------------------- each model's own input normalisation
def test_a_model_normalises_its_own_input_and_its_onnx_file_does_too(tmp_path, tiny):
    torch.manual_seed(0)
    plain = build_model(ModelSpec(model="cnn", kwargs={"channels": [8, 16], "depth": 1}), (1, 8, 8), 10)
    torch.manual_seed(0)
    normed = build_model(ModelSpec(model="cnn", kwargs={"channels": [8, 16], "depth": 1},
                                   normalize={"mean": [0.5], "std": [0.25]}), (1, 8, 8), 10)
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(normed.eval()(x), plain.eval()((x - 0.5) / 0.25), atol=1e-6)
    assert set(normed.state_dict()) == set(plain.state_dict())  # weights files stay the model's own
    with pytest.raises(ModelError, match="gives 3 mean and 3 std values but the data has 1 channel"):
        build_model(ModelSpec(model="cnn", normalize={"mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}), (1, 8, 8), 10)
    tiny["student"]["normalize"] = {"mean": [0.1], "std": [2.0]}
    tiny["train"]["epochs"] = 1
    run = protege.distill(parse_recipe(tiny), tmp_path / "run")
    assert run.report.student_onnx.accuracy == run.report.student.accuracy  # the file normalises inside its graph
    assert run.report.onnx_max_abs_diff < 1e-4


def test_an_image_folder_brings_its_own_normalisation_unless_told_otherwise(tmp_path):
    import json

    from ..log_capture import logged

    folder = _vit(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5], "image_std": [0.5], "do_rescale": True}))
    seen = []
    with logged(seen):
        auto = build_model(ModelSpec(model=folder), (1, 8, 8), 10)
    off = build_model(ModelSpec(model=folder, normalize="none"), (1, 8, 8), 10)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(auto.eval()(x), off.eval()((x - 0.5) / 0.5), atol=1e-5)
    assert any("normalising its input with mean [0.5] and std [0.5]" in line for line in seen)


def test_a_self_normalising_model_on_data_protege_scales_too_is_refused(tmp_path, tiny):
    import numpy as np
    from sklearn.datasets import load_digits

    from protege.errors import RecipeError

    d = load_digits()
    np.savez(tmp_path / "d.npz", x=(d.images[:, None] * 255 / 16).astype(np.uint8), y=d.target)
    tiny["data"] = {"source": "arrays", "path": str(tmp_path / "d.npz")}
    tiny["student"]["normalize"] = {"mean": [0.5], "std": [0.25]}
    with pytest.raises(RecipeError, match=r"the student normalises its own input .* data.scaling is standardize: .* "
                                          r"normalised twice; set data.scaling: none"):
        protege.distill(parse_recipe(tiny), tmp_path / "run")
    assert not (tmp_path / "run").exists()
