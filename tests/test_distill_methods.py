"""Feature/relation terms in the Distiller and the pipeline, several teachers, self-distillation, cross-task transfer."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import protege
from protege.errors import ProtegeError
from protege.knowledge import Teacher
from protege.losses import functional as LF
from protege.models.zoo import CNN
from protege.recipe import DistillConfig, parse_recipe
from protege.train.distiller import Distiller, DistillModule

CNN_TEACHER = {"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1}, "train": {"epochs": 2, "batch_size": 64}}
CNN_STUDENT = {"model": "cnn", "kwargs": {"channels": [4, 8], "depth": 1}}


@pytest.fixture
def cnn_recipe(tiny) -> dict:
    r = copy.deepcopy(tiny)
    r.update(teacher=copy.deepcopy(CNN_TEACHER), student=copy.deepcopy(CNN_STUDENT))
    r["train"]["epochs"] = 2
    return r


def _metrics(run) -> list[dict]:
    return [json.loads(x) for x in run.metrics_path.read_text().splitlines()]


# ---- multi-teacher combination: pure functions, exact ----

def test_combine_one_teacher_is_that_teacher_and_mixture_is_exact():
    torch.manual_seed(0)
    z = torch.randn(5, 2, 7, dtype=torch.float64)
    for t in (1.0, 4.0):
        one = LF.combine_teachers(z[:, :1], torch.ones(1, dtype=torch.float64), t)
        torch.testing.assert_close(F.softmax(one / t, -1), F.softmax(z[:, 0] / t, -1))
        w = torch.tensor([3.0, 1.0], dtype=torch.float64)
        mix = LF.combine_teachers(z, w, t)
        want = 0.75 * F.softmax(z[:, 0] / t, -1) + 0.25 * F.softmax(z[:, 1] / t, -1)
        torch.testing.assert_close(F.softmax(mix / t, -1), want)


def test_kl_to_the_mixture_has_the_gradient_of_the_weighted_kl_sum():
    torch.manual_seed(1)
    z = torch.randn(4, 3, 6, dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    s1 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    LF.kd_kl(s1, LF.combine_teachers(z, w, 2.0), 2.0).backward()
    sum(w[k] * LF.kd_kl(s2, z[:, k], 2.0) for k in range(3)).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_confidence_weights_follow_the_true_label():
    # teacher 0 puts log-prob -1 on the label, teacher 1 puts -3: weights softmax(-CE) = softmax([-1, -3])
    z = torch.log(torch.tensor([[[0.5, 0.5], [0.1, 0.9]]], dtype=torch.float64))
    w = LF.confidence_weights(z, torch.tensor([0]))
    torch.testing.assert_close(w, torch.tensor([[0.5 / 0.6, 0.1 / 0.6]], dtype=torch.float64))


# ---- the Distiller with feature terms ----

def test_distiller_builds_adapters_only_where_shapes_differ_and_names_each_term():
    torch.manual_seed(0)
    teacher, student = CNN((1, 8, 8), 10, (8, 16)).eval(), CNN((1, 8, 8), 10, (4, 8))
    cfg = DistillConfig(alpha=0.5, features=[
        {"loss": "hint", "student": "features.1", "teacher": "features.1"},   # 8 -> 16 channels: 1x1 conv
        {"loss": "hint", "student": "pool", "teacher": "pool", "weight": 0.0},  # 8 -> 16: also an adapter
        {"loss": "at", "student": "features.0", "teacher": "features.0", "weight": 100},
        {"loss": "rkd_distance", "student": "logits", "teacher": "logits"},
        {"loss": "sp", "student": "features.1", "teacher": "features.1", "weight": 3.0}])
    d = Distiller(Teacher(teacher, None, ["features.1", "pool", "features.0", "logits"]), cfg)
    x, y, idx = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,)), torch.arange(6)
    module = d.training_module(student, x, idx)
    assert isinstance(module, DistillModule) and sorted(module.adapters) == ["term0", "term1"]
    assert module.adapters["term0"][0].weight.shape == (16, 8, 1, 1)
    losses = d(module, x, y, idx)
    assert {"loss", "ce", "kd", "hint0", "hint1", "at2", "rkd_distance3", "sp4"} <= set(losses)
    want = 0.5 * losses["ce"] + 0.5 * losses["kd"] + losses["hint0"] + 100 * losses["at2"] + losses["rkd_distance3"] + 3 * losses["sp4"]
    torch.testing.assert_close(losses["loss"], want)
    losses["loss"].backward()
    assert module.adapters["term0"][0].weight.grad.abs().sum() > 0 and student.features[0][0].weight.grad.abs().sum() > 0
    assert torch.equal(module(x), student(x))  # plain forward is the student's own


# ---- the pipeline ----

def test_feature_distillation_end_to_end_exports_the_bare_student(tmp_path, cnn_recipe):
    cnn_recipe["distill"]["features"] = [{"loss": "hint", "student": "features.1", "teacher": "features.1"},
                                         {"loss": "rkd_angle", "student": "pool", "teacher": "pool", "weight": 2.0}]
    run = protege.distill(parse_recipe(cnn_recipe), tmp_path / "r")
    rows = [m for m in _metrics(run) if m["stage"] == "student"]
    assert len(rows) == 2 and rows[-1]["hint0"] > 0 and rows[-1]["rkd_angle1"] > 0
    meta = json.loads((run.path / "teacher_cache" / "t0" / "meta.json").read_text())
    assert meta["paths"] == ["features.1", "pool"] and meta["entries"]["features.1"]["dtype"] == "float16"
    saved = protege.models.loading.read_state_dict(run.student_weights)  # the bare student: no adapter, no prefix
    assert sorted(saved) == sorted(CNN((1, 8, 8), 10, (4, 8)).state_dict())
    assert run.report["student_onnx"]["accuracy"] == pytest.approx(run.report["student"]["accuracy"])
    assert run.report["student"]["accuracy"] > 0.3


def test_two_teachers_with_confidence_weights(tmp_path, cnn_recipe):
    first = protege.distill(parse_recipe(cnn_recipe), tmp_path / "a", export=False, evaluate_=False)
    r = copy.deepcopy(cnn_recipe)
    r["more_teachers"] = [{"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1}, "weights": str(first.teacher_weights), "weight": 2.0}]
    r["distill"].update(combine="confidence", features=[{"loss": "sp", "student": "features.1", "teacher": "features.1", "teacher_index": 1}])
    run = protege.distill(parse_recipe(r), tmp_path / "b", export=False, evaluate_=False)
    assert (run.path / "teacher_cache" / "t1" / "meta.json").is_file() and (run.path / "teacher_cache" / "t0" / "meta.json").is_file()
    assert [m for m in _metrics(run) if m["stage"] == "student"][-1]["sp0"] >= 0


def test_born_again_generations(tmp_path, cnn_recipe):
    r = copy.deepcopy(cnn_recipe)
    r["distill"]["generations"] = 2
    run = protege.distill(parse_recipe(r), tmp_path / "r", export=False, evaluate_=False)
    stages = {m["stage"] for m in _metrics(run)}
    assert {"teacher", "student", "student_gen2"} <= stages
    assert (run.path / "student" / "gen1.safetensors").is_file()
    gen1 = protege.models.loading.read_state_dict(run.path / "student" / "gen1.safetensors")
    final = protege.models.loading.read_state_dict(run.student_weights)
    assert any(not torch.equal(gen1[k], final[k]) for k in final)


def test_ema_teacher_is_the_students_running_average(tmp_path, cnn_recipe):
    r = copy.deepcopy(cnn_recipe)
    r["teacher"] = {"model": "ema"}
    r["distill"].update(ema_decay=0.9, alpha=0.5)
    run = protege.distill(parse_recipe(r), tmp_path / "r", export=False)
    assert run.report["teacher"]["params"] == run.report["student"]["params"]
    t = protege.models.loading.read_state_dict(run.teacher_weights)
    s = protege.models.loading.read_state_dict(run.student_weights)
    assert any(not torch.equal(t[k], s[k]) for k in s) and not (run.path / "teacher_cache").exists()


def _cross_task_teacher(tmp_path) -> str:
    """A teacher trained on another label set: digits folded to 5 classes (label mod 5)."""
    from protege.data import load_data
    from protege.models import save_weights
    from protege.recipe import DataConfig

    d = load_data(DataConfig(source="digits"), 0)
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 5, (8, 16))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(d.train.x), d.train.y % 5).backward()
        opt.step()
    path = tmp_path / "five.safetensors"
    save_weights(model, path)
    return str(path)


def test_cross_task_teacher_teaches_through_features_only(tmp_path, cnn_recipe):
    r = copy.deepcopy(cnn_recipe)
    r["teacher"] = {"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1, "num_classes": 5}, "weights": _cross_task_teacher(tmp_path)}
    with pytest.raises(ProtegeError, match=r"teacher scores 5 classes but the data has 10 classes: logit KD \(kl\) needs the same label set"):
        protege.distill(parse_recipe(r), tmp_path / "bad")
    assert not (tmp_path / "bad" / "recipe.yaml").exists()
    r["distill"].update(response="none", features=[{"loss": "hint", "student": "features.1", "teacher": "features.1"}])
    run = protege.distill(parse_recipe(r), tmp_path / "ok", export=False, evaluate_=False)
    last = [m for m in _metrics(run) if m["stage"] == "student"][-1]
    assert "kd" not in last and last["hint0"] > 0
