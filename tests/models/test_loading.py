"""Building and loading models (protege.models.loading): user factories, safetensors weights, tied embeddings,
and an ONNX file as the teacher."""
import numpy as np
import onnx
import pytest
import torch

import protege
from protege.data import load_data
from protege.errors import ModelError, RecipeError
from protege.export import export_model_onnx
from protege.models import OnnxModule, build_model, count_params, save_weights
from protege.models.zoo import CNN, MLP
from protege.recipe import ModelSpec, parse_recipe

from ..conftest import HERE
from ..log_capture import logged
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


# ---------------------------------------------------------------- an ONNX teacher's outputs, exactly
def _classifier_onnx(path, w: np.ndarray, b: np.ndarray, label_first: bool = True, features: int | None = None):
    """What skl2onnx writes for a linear classifier (zipmap off): input X (N, features); outputs `label` (int64, the
    predicted class) and `probabilities` (float, softmax of X @ w + b)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["X", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0)]
    outs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", w.shape[1]])]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", features or w.shape[0]])],
                              outs if label_first else outs[::-1],
                              [numpy_helper.from_array(w.astype(np.float32), "W"), numpy_helper.from_array(b.astype(np.float32), "B")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_onnx_teacher_reads_its_float_output_and_turns_probabilities_into_logits(tmp_path):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    path = _classifier_onnx(tmp_path / "clf.onnx", w, b)
    seen = []
    with logged(seen):
        teacher = OnnxModule(path, in_shape=(4,))
        x = torch.randn(6, 4)
        out = teacher(x)
    scores = x.double() @ torch.from_numpy(w) + torch.from_numpy(b)
    assert teacher.output_name == "probabilities" and teacher.probabilities
    assert torch.allclose(out.double(), torch.log_softmax(scores, 1), atol=1e-5)  # log-probabilities: the same distribution
    assert any("reading its output 'probabilities'" in line for line in seen)
    assert any("holds probabilities" in line and "logarithm" in line for line in seen)
    raw = _classifier_onnx(tmp_path / "raw.onnx", w, b, label_first=False)
    assert OnnxModule(raw, output="probabilities").probabilities is None  # undecided until it runs
    logits_file = tmp_path / "logits.onnx"
    export_model_onnx(MLP((4,), 3, (8,)), torch.randn(2, 4), logits_file)
    mlp = OnnxModule(logits_file)
    mlp(torch.randn(3, 4))
    assert mlp.probabilities is False  # logits stay logits


@pytest.mark.parametrize("kwargs, words", [
    ({"output": "scores"}, ["has no output 'scores'", "label (tensor(int64), [N]), probabilities (tensor(float), [N, 3])"]),
    ({"output": "label"}, ["output 'label' is tensor(int64), not scores per class", "zipmap"]),
    ({"in_shape": (5,)}, ["takes input 'X' of shape [N, 4] but the data gives examples of shape [5]", "data.drop"]),
    ({"in_shape": (1, 2, 2)}, ["takes input 'X' of shape [N, 4]", "data.shape"]),
])
def test_an_onnx_teacher_that_does_not_fit_is_a_one_line_error_naming_both_sides(tmp_path, kwargs, words):
    path = _classifier_onnx(tmp_path / "clf.onnx", np.ones((4, 3)), np.zeros(3))
    with pytest.raises(ModelError) as e:
        OnnxModule(path, **kwargs)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_scikit_learn_style_onnx_teacher_on_raw_csv_columns_is_scored_as_the_file_scores(tmp_path, tiny):
    """A teacher with its own scaling inside, fitted on raw features, on a CSV with an ID column it never saw: with
    data.drop and data.scaling: none, protege feeds it what it was made for, and its accuracy in the report is the
    file's own accuracy on the raw test rows."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    iris = load_iris()
    clf = LogisticRegression(max_iter=1000).fit(iris.data, iris.target)
    onnx_file = _classifier_onnx(tmp_path / "iris.onnx", clf.coef_.T, clf.intercept_)
    csv = tmp_path / "iris.csv"
    csv.write_text("id,sl,sw,pl,pw,species\n" + "".join(f"{1000 + i},{','.join(map(str, row))},{y}\n"
                                                     for i, (row, y) in enumerate(zip(iris.data, iris.target))))
    recipe = {**tiny, "data": {"source": "csv", "path": str(csv), "target": "species", "drop": ["id"], "scaling": "none"},
              "teacher": {"model": str(onnx_file)}, "student": {"model": "mlp", "kwargs": {"hidden": [8]}}}
    recipe["train"]["epochs"] = 2
    run = protege.distill(parse_recipe(recipe), tmp_path / "run")
    data = load_data(run.recipe.data, run.recipe.seed)
    own = (clf.predict(data.test.x.numpy().astype(np.float64)) == data.test.y.numpy()).mean()
    assert run.report.teacher.accuracy == pytest.approx(own, abs=1e-9) and own > 0.9
    assert "dropped id" in run.report.data and "unscaled" in run.report.data
    with pytest.raises(RecipeError, match="student.output is ignored"):
        parse_recipe({**recipe, "student": {"model": "mlp", "output": "probabilities"}})
