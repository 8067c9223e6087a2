"""The Distiller (protege.train.distiller): adapters and feature terms, several teachers' soft target, relation
terms on tiny batches, and the EMA teacher's update."""
import torch
import torch.nn.functional as F

import protege
from protege.knowledge import Teacher
from protege.losses import functional as LF
from protege.models.zoo import CNN
from protege.recipe import DistillConfig
from protege.train.distiller import DistillModule, Distiller


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
