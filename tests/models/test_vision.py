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
