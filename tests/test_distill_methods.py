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
    cnn_recipe["teacher"]["train"]["epochs"] = cnn_recipe["train"]["epochs"] = 5
    run = protege.distill(parse_recipe(cnn_recipe), tmp_path / "r")
    rows = [m for m in _metrics(run) if m["stage"] == "student"]
    assert len(rows) == 5 and rows[-1]["hint0"] > 0 and rows[-1]["rkd_angle1"] > 0
    (folder,) = (run.path / "teacher_cache").glob("t0_*")  # named by the hooked paths' hash
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["paths"] == ["features.1", "pool"] and meta["entries"]["features.1"]["dtype"] == "float16"
    saved = protege.models.loading.read_state_dict(run.student_weights)  # the bare student: no adapter, no prefix
    assert sorted(saved) == sorted(CNN((1, 8, 8), 10, (4, 8)).state_dict())
    assert run.report["student_onnx"]["accuracy"] == pytest.approx(run.report["student"]["accuracy"])
    assert run.report["student"]["accuracy"] > 0.5


def test_two_teachers_with_confidence_weights(tmp_path, cnn_recipe):
    first = protege.distill(parse_recipe(cnn_recipe), tmp_path / "a", export=False, evaluate_=False)
    r = copy.deepcopy(cnn_recipe)
    r["more_teachers"] = [{"model": "cnn", "kwargs": {"channels": [8, 16], "depth": 1}, "weights": str(first.teacher_weights), "weight": 2.0}]
    r["distill"].update(combine="confidence", features=[{"loss": "sp", "student": "features.1", "teacher": "features.1", "teacher_index": 1}])
    run = protege.distill(parse_recipe(r), tmp_path / "b", export=False, evaluate_=False)
    caches = sorted(p.name for p in (run.path / "teacher_cache").iterdir())
    assert caches[0] == "t0" and caches[1].startswith("t1_")  # logits only / with the hooked path
    assert [m for m in _metrics(run) if m["stage"] == "student"][-1]["sp0"] > 0


def test_soft_target_uses_the_teacher_weights_and_the_per_sample_confidence():
    torch.manual_seed(0)
    z = torch.randn(4, 2, 10)
    y = torch.randint(0, 10, (4,))
    touts = [protege.knowledge.ModelOutput(z[:, 0]), protege.knowledge.ModelOutput(z[:, 1])]
    fixed = Distiller([None, None], DistillConfig(temperature=2.0), weights=[1.0, 3.0]).soft_target(touts, y)
    torch.testing.assert_close(fixed, LF.combine_teachers(z, torch.tensor([0.25, 0.75]), 2.0))
    conf = Distiller([None, None], DistillConfig(temperature=2.0, combine="confidence"), weights=[1.0, 3.0]).soft_target(touts, y)
    torch.testing.assert_close(conf, LF.combine_teachers(z, LF.confidence_weights(z, y) * torch.tensor([1.0, 3.0]), 2.0))
    assert not torch.allclose(F.softmax(fixed / 2, -1), F.softmax(conf / 2, -1))
    mse = Distiller([None, None], DistillConfig(response="mse_logits"), weights=[1.0, 3.0]).soft_target(touts, y)
    torch.testing.assert_close(mse, 0.25 * z[:, 0] + 0.75 * z[:, 1])  # logit regression: the mean of the logits


def test_relation_terms_are_zero_on_a_batch_too_small_to_relate():
    torch.manual_seed(0)
    teacher, student = CNN((1, 8, 8), 10, (8, 16)).eval(), CNN((1, 8, 8), 10, (4, 8))
    cfg = DistillConfig(features=[{"loss": "rkd_angle", "student": "pool", "teacher": "pool"}])
    d = Distiller(Teacher(teacher, None, ["pool"]), cfg)
    x, idx = torch.randn(5, 1, 8, 8), torch.arange(5)
    module = d.training_module(student, x, idx)
    assert d(module, x[:2], torch.tensor([0, 1]), idx[:2])["rkd_angle0"] == 0
    assert d(module, x, torch.arange(5), idx)["rkd_angle0"] > 0


def test_ema_update_is_the_running_average():
    from protege.train.distiller import EmaTeacher

    torch.manual_seed(0)
    student = CNN((1, 8, 8), 10, (4, 8))
    ema = EmaTeacher(student, 0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.features[0][1].num_batches_tracked.fill_(7)
    ema.update(student)
    after, now = ema.model.state_dict(), student.state_dict()
    for k in now:
        want = now[k] if not now[k].dtype.is_floating_point else 0.9 * before[k] + 0.1 * now[k]
        torch.testing.assert_close(after[k], want)
    assert not any(p.requires_grad for p in ema.model.parameters())


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
    # generation 2 was taught by generation 1: its cached soft targets are keyed by that file and equal its logits
    from protege.run import file_digest

    meta = json.loads((run.path / "teacher_cache" / "gen2_t0" / "meta.json").read_text())
    assert meta["teacher"] == file_digest(run.path / "student" / "gen1.safetensors")
    data = protege.data.load_data(run.recipe.data, 0)
    g1 = protege.models.build_model(run.recipe.student, data.input_shape, 10)
    protege.models.load_weights(g1, run.path / "student" / "gen1.safetensors")
    import numpy as np

    cached = np.load(run.path / "teacher_cache" / "gen2_t0" / "0.npy")
    torch.testing.assert_close(torch.from_numpy(cached[:50]), protege.knowledge.predict_logits(g1, data.train.x[:50]))


def test_ema_teacher_is_the_students_running_average(tmp_path, cnn_recipe):
    r = copy.deepcopy(cnn_recipe)
    r["teacher"] = {"model": "ema"}
    r["distill"].update(ema_decay=0.9, alpha=0.5)
    run = protege.distill(parse_recipe(r), tmp_path / "r", export=False)
    assert run.report["teacher"]["params"] == run.report["student"]["params"]
    t = protege.models.loading.read_state_dict(run.teacher_weights)
    s = protege.models.loading.read_state_dict(run.student_weights)
    assert any(not torch.equal(t[k], s[k]) for k in s) and not (run.path / "teacher_cache").exists()
    again = protege.distill(parse_recipe(r), tmp_path / "r", resume=True, export=False)  # a finished run: nothing redone
    assert all(torch.equal(t[k], v) for k, v in protege.models.loading.read_state_dict(again.teacher_weights).items())
    assert again.report["teacher"]["accuracy"] == run.report["teacher"]["accuracy"]


def test_student_initialised_from_the_teacher_starts_well_above_chance(tmp_path, tiny):
    """ResNet-14 teacher -> ResNet-8 student by block selection; lr 1e-9, so the score is the initialisation's."""
    r = copy.deepcopy(tiny)
    r["teacher"] = {"model": "resnet", "kwargs": {"depth": 14, "width": 8}, "train": {"epochs": 8, "batch_size": 64}}
    r["student"] = {"model": "resnet", "kwargs": {"depth": 8, "width": 8}}
    r["train"].update(epochs=1, lr=1e-9)
    plain = protege.distill(parse_recipe(r), tmp_path / "plain", export=False)
    r["student"]["init"] = "select"
    init = protege.distill(parse_recipe(r), tmp_path / "init", export=False)
    print("teacher", init.report["teacher"]["accuracy"], "init", init.report["student"]["accuracy"], "plain", plain.report["student"]["accuracy"])
    assert init.report["teacher"]["accuracy"] > 0.9
    assert plain.report["student"]["accuracy"] < 0.3 < 0.6 < init.report["student"]["accuracy"]


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
    r["train"]["epochs"] = 6
    run = protege.distill(parse_recipe(r), tmp_path / "ok", export=False)
    last = [m for m in _metrics(run) if m["stage"] == "student"][-1]
    assert "kd" not in last and last["hint0"] > 0
    assert run.report["teacher"]["accuracy"] is None and "cross-task" in run.report["teacher"]["note"]
    assert "agreement" not in run.report["student"] and run.report["student"]["accuracy"] > 0.5


def test_an_onnx_teacher_and_a_user_module_teacher_join_the_first(tmp_path, cnn_recipe):
    """Teachers of different formats: the recipe's (trained here), an ONNX file, and a user's Python module."""
    from protege.export.onnx import export_model_onnx
    from protege.models import build_model, load_weights
    from protege.recipe import ModelSpec

    first = protege.distill(parse_recipe(cnn_recipe), tmp_path / "a", export=False, evaluate_=False)
    t = build_model(ModelSpec(model="cnn", kwargs={"channels": [8, 16], "depth": 1}), (1, 8, 8), 10)
    load_weights(t, first.teacher_weights)
    export_model_onnx(t.eval(), torch.randn(2, 1, 8, 8), tmp_path / "t.onnx")
    (tmp_path / "mine.py").write_text("from protege.models.zoo import MLP\n\ndef build(in_shape, num_classes):\n"
                                      "    return MLP(in_shape, num_classes, hidden=[32])\n")
    from protege.models import save_weights
    from protege.models.zoo import MLP

    save_weights(MLP((1, 8, 8), 10, hidden=[32]), tmp_path / "mine.safetensors")
    r = copy.deepcopy(cnn_recipe)
    r["more_teachers"] = [{"model": str(tmp_path / "t.onnx"), "weight": 0.5},
                          {"model": f"{tmp_path / 'mine.py'}:build", "weights": str(tmp_path / "mine.safetensors")}]
    r["distill"]["features"] = [{"loss": "rkd_distance", "student": "logits", "teacher": "logits", "teacher_index": 1}]
    run = protege.distill(parse_recipe(r), tmp_path / "b", export=False, evaluate_=False)
    assert sorted(p.name for p in (run.path / "teacher_cache").iterdir()) == ["t0", "t1", "t2"]
    assert json.loads((run.path / "teacher_cache" / "t1" / "meta.json").read_text())["paths"] == []  # `logits` needs no hook
    assert [m for m in _metrics(run) if m["stage"] == "student"][-1]["rkd_distance0"] > 0
