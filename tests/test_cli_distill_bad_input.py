"""`protege distill` on bad input for feature/relation terms, several teachers and self-distillation: one line,
exit 2, nothing written."""
from __future__ import annotations

import copy

import pytest

from .helpers import assert_clean_error, run_cli


CNN_T = {"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1}, "train": {"epochs": 1, "batch_size": 64}}
CNN_S = {"model": "cnn", "kwargs": {"channels": [4, 8], "depth": 1}}


@pytest.fixture
def cnn_cli(tmp_path, tiny, write_recipe, capsys):
    """`protege distill` on a CNN recipe with the given distill section edits; also says whether anything was written."""

    def go(**distill):
        r = copy.deepcopy(tiny)
        r.update(teacher=copy.deepcopy(CNN_T), student=copy.deepcopy(CNN_S))
        more = distill.pop("more_teachers", None)
        if more is not None:
            r["more_teachers"] = more
        r["distill"].update(distill)
        code, err = run_cli(["distill", write_recipe(r), "--out", tmp_path / "out"], capsys)
        written = (tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir())
        return code, err, written

    return go


def test_unknown_module_path_lists_the_nearest(cnn_cli):
    code, err, written = cnn_cli(features=[{"loss": "hint", "student": "features.3", "teacher": "features.1"}])
    assert_clean_error(code, err, "distill.features[0].student", "no module 'features.3'", "nearest valid paths", "protege inspect")
    assert not written


def test_teacher_path_typo(cnn_cli):
    code, err, written = cnn_cli(features=[{"loss": "sp", "student": "features.1", "teacher": "feature.1"}])
    assert_clean_error(code, err, "distill.features[0].teacher", "'feature.1'", "features.1")
    assert not written


def test_shapes_no_adapter_can_bridge(cnn_cli):
    code, err, written = cnn_cli(features=[{"loss": "hint", "student": "head", "teacher": "features.1"}])
    assert_clean_error(code, err, "distill.features[0]", "no adapter can map shape (10,) to (16, 4, 4)")
    assert not written


def test_attention_transfer_on_vectors(cnn_cli):
    code, err, written = cnn_cli(features=[{"loss": "at", "student": "head", "teacher": "head"}])
    assert_clean_error(code, err, "attention transfer needs spatial")
    assert not written


@pytest.mark.parametrize("weight, words", [(-1.0, ["distill.features.0.weight", "greater than or equal to 0"]),
                                            (".nan", ["distill.features.0.weight", "finite number"])])
def test_negative_or_nan_weight(cnn_cli, weight, words):
    import yaml

    w = yaml.safe_load(weight) if isinstance(weight, str) else weight
    code, err, written = cnn_cli(features=[{"loss": "sp", "student": "features.1", "teacher": "features.1", "weight": w}])
    assert_clean_error(code, err, *words)
    assert not written


def test_unknown_loss_name(cnn_cli):
    code, err, _ = cnn_cli(features=[{"loss": "fitnet", "student": "features.1", "teacher": "features.1"}])
    assert_clean_error(code, err, "distill.features.0.loss", "'hint'", "'rkd_angle'")


def test_teachers_disagree_on_the_label_set(cnn_cli, tmp_path):
    from protege.models import save_weights
    from protege.models.zoo import CNN

    five = tmp_path / "five.safetensors"
    save_weights(CNN((1, 8, 8), 5, (8, 16)), five)
    code, err, written = cnn_cli(more_teachers=[{"model": "cnn", "kwargs": {"channels": [8, 16], "num_classes": 5}, "weights": str(five)}])
    assert_clean_error(code, err, "more_teachers[0] scores 5 classes but the data has 10 classes", "response: none")
    assert not written


def test_feature_term_for_a_missing_teacher(cnn_cli):
    code, err, _ = cnn_cli(features=[{"loss": "sp", "student": "features.1", "teacher": "features.1", "teacher_index": 1}])
    assert_clean_error(code, err, "teacher_index is 1 but there are 1 teacher(s)")


def test_response_none_without_features(cnn_cli):
    code, err, _ = cnn_cli(response="none")
    assert_clean_error(code, err, "nothing would be distilled")


def test_onnx_teacher_has_no_hook_points(cnn_cli, tmp_path):
    import torch

    from protege.export.onnx import export_model_onnx
    from protege.models.zoo import CNN

    onnx_file = tmp_path / "t.onnx"
    export_model_onnx(CNN((1, 8, 8), 10, (8, 16)).eval(), torch.randn(2, 1, 8, 8), onnx_file)
    code, err, written = cnn_cli(more_teachers=[{"model": str(onnx_file)}],
                                 features=[{"loss": "sp", "student": "features.1", "teacher": "features.1", "teacher_index": 1}])
    assert_clean_error(code, err, "an ONNX teacher gives its output only", "teacher: logits")
    assert not written


def test_impossible_student_init_fails_before_the_teacher_trains(tmp_path, tiny, write_recipe, capsys):
    r = copy.deepcopy(tiny)
    r.update(teacher=copy.deepcopy(CNN_T), student={"model": "cnn", "kwargs": {"channels": [16, 32], "depth": 1}, "init": "select"})
    code, err = run_cli(["distill", write_recipe(r), "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "init_from_teacher", "16")
    assert not (tmp_path / "out" / "recipe.yaml").exists()


def test_a_teacher_trained_here_must_learn_this_datas_labels(cnn_cli, tmp_path, tiny, write_recipe, capsys):
    r = copy.deepcopy(tiny)
    r.update(teacher={**CNN_T, "kwargs": {"channels": [8, 16], "num_classes": 5}}, student=copy.deepcopy(CNN_S))
    r["distill"].update(response="none", features=[{"loss": "sp", "student": "features.1", "teacher": "features.1"}])
    code, err = run_cli(["distill", write_recipe(r), "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "teacher outputs shape (5,)", "10 classes")
    assert not (tmp_path / "out" / "recipe.yaml").exists()
