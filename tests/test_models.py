"""The zoo, user modules, safetensors weights, and an ONNX file as the teacher."""
import pytest
import torch

import protege
from protege.export import export_model_onnx
from protege.models import OnnxModule, build_model, count_params, save_weights
from protege.models.zoo import CNN, MLP, ResNet
from protege.recipe import ModelSpec, parse_recipe

from .conftest import HERE


@pytest.mark.parametrize("depth", [8, 20, 56])
def test_cifar_resnet_depths(depth):
    m = ResNet((3, 32, 32), 10, depth=depth)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    n_blocks = sum(1 for mod in m.modules() if mod.__class__.__name__ == "BasicBlock")
    assert n_blocks == 3 * (depth - 2) // 6


def test_resnet20_has_the_published_size():
    # He et al. 2016, Table 6: ResNet-20 on CIFAR-10 has 0.27M parameters.
    assert 0.26e6 < count_params(ResNet((3, 32, 32), 10, depth=20)) < 0.28e6


def test_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet((3, 32, 32), 10, depth=21)


def test_cnn_width_and_depth_knobs():
    small, deep = CNN((1, 28, 28), 10, (8, 16), 1), CNN((1, 28, 28), 10, (8, 16), 3)
    assert count_params(deep) > count_params(small)
    assert small(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert MLP((5,), 3, hidden=[4])(torch.randn(2, 5)).shape == (2, 3)


def test_user_factory_gets_kwargs_and_data_shape():
    spec = ModelSpec(model=f"{HERE / 'slow_mlp.py'}:build", kwargs={"hidden": [7]})
    m = build_model(spec, (1, 8, 8), 4)
    assert m.head.out_features == 4 and m.head.in_features == 7


def test_safetensors_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    m = MLP((1, 8, 8), 10, hidden=[16])
    save_weights(m, tmp_path / "w.safetensors")
    loaded = build_model(ModelSpec(model="mlp", kwargs={"hidden": [16]}, weights=str(tmp_path / "w.safetensors")), (1, 8, 8), 10)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(m(x), loaded(x))


def test_weights_of_another_shape_are_refused(tmp_path):
    save_weights(MLP((1, 8, 8), 10, hidden=[16]), tmp_path / "w.safetensors")
    with pytest.raises(protege.ProtegeError, match="shape"):
        build_model(ModelSpec(model="mlp", kwargs={"hidden": [32]}, weights=str(tmp_path / "w.safetensors")), (1, 8, 8), 10)


def test_onnx_file_as_teacher(tmp_path, tiny):
    """The route for Keras / TensorFlow / scikit-learn teachers: an ONNX file, run by ONNX Runtime."""
    torch.manual_seed(0)
    net = CNN((1, 8, 8), 10, (16, 32), 1)
    export_model_onnx(net, torch.randn(2, 1, 8, 8), tmp_path / "teacher.onnx")
    teacher = OnnxModule(tmp_path / "teacher.onnx")
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(teacher(x), net.eval()(x), atol=1e-5)
    assert teacher.n_params == pytest.approx(count_params(net), rel=0.05)
    tiny["teacher"] = {"model": str(tmp_path / "teacher.onnx")}
    tiny["train"]["epochs"] = 1
    run = protege.distill(parse_recipe(tiny), tmp_path / "run")
    assert run.report["teacher"]["runtime"] == "onnxruntime"
    assert run.report["student_onnx"]["accuracy"] == run.report["student"]["accuracy"]
