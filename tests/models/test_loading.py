"""Building and loading models (protege.models.loading): user factories, safetensors weights, tied embeddings,
and an ONNX file as the teacher."""
import pytest
import torch

import protege
from protege.export import export_model_onnx
from protege.models import OnnxModule, build_model, count_params, save_weights
from protege.models.zoo import CNN, MLP
from protege.recipe import ModelSpec, parse_recipe

from ..conftest import HERE
from ..helpers import lm_recipe as _recipe, lm_teacher_and_data as _teacher_and_data


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
    assert run.report.teacher.runtime == "onnxruntime"
    assert run.report.student_onnx.accuracy == run.report.student.accuracy


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(lm, tmp_path):
    from safetensors.torch import load_file

    from protege.models import build_model, load_weights, save_weights

    teacher, d = _teacher_and_data(lm)
    save_weights(teacher, tmp_path / "w.safetensors")
    keys = set(load_file(str(tmp_path / "w.safetensors")))
    assert len(keys & {"model.model.embed_tokens.weight", "model.lm_head.weight"}) == 1
    fresh = build_model(parse_recipe(_recipe(lm)).student.model_copy(update={"kwargs": {"pretrained": False}}),
                        d.input_shape, d.num_classes, d.model_args)
    load_weights(fresh, tmp_path / "w.safetensors")
    assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight
    assert torch.equal(fresh.model.lm_head.weight, teacher.model.lm_head.weight)


@pytest.mark.parametrize("kept", ["model.model.embed_tokens.weight", "model.lm_head.weight"])
def test_a_tied_tensor_stored_under_either_key_loads_tied(lm, tmp_path, kept):
    """Weights files written before safetensors' save_model did the saving kept a tied tensor under its first key in
    state-dict order (the input embedding); save_model keeps the first in sorted order (the output layer). Both load,
    tied."""
    from safetensors.torch import save_file

    from protege.models import load_weights

    teacher, d = _teacher_and_data(lm)
    left_out = {"model.model.embed_tokens.weight", "model.lm_head.weight"} - {kept}
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items() if k not in left_out}, str(tmp_path / "w.safetensors"))
    fresh = build_model(parse_recipe(_recipe(lm)).student.model_copy(update={"kwargs": {"pretrained": False}}),
                        d.input_shape, d.num_classes, d.model_args)
    load_weights(fresh, tmp_path / "w.safetensors")
    assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight
    assert torch.equal(fresh.model.lm_head.weight, teacher.model.lm_head.weight)


def test_a_parameter_sliced_from_a_larger_tensor_is_refused_with_the_fix(tmp_path):
    """safetensors stores whole tensors only: a parameter that is a view into a larger tensor gets a clear error."""
    m = torch.nn.Linear(2, 2)
    m.weight = torch.nn.Parameter(torch.randn(10)[:4].view(2, 2))
    with pytest.raises(protege.ProtegeError, match=r"slice of a larger tensor.*\.clone\(\)"):
        save_weights(m, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []
