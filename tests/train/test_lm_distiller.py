"""The token-level distiller (protege.train.lm_distiller): the pure loss, the prompt masked, on-policy text."""
import pytest
import torch

from protege.losses import token as T
from protege.recipe import parse_recipe

from ..helpers import lm_recipe as _recipe, lm_teacher_and_data as _teacher_and_data


def test_the_lm_distiller_matches_the_pure_loss_and_masks_the_prompt_on_policy(lm, monkeypatch):
    from protege.train.lm_distiller import LMDistiller
    from protege.models import build_model

    teacher, d = _teacher_and_data(lm)
    r = parse_recipe(_recipe(lm, distill={"response": "reverse_kl", "alpha": 0.3}))
    student = build_model(r.student, d.input_shape, d.num_classes, d.model_args)  # random weights: KD is not 0
    x, idx = d.train.x[:4], torch.arange(4)
    out = {k: float(v.detach()) for k, v in LMDistiller(r.distill, teacher, None)(student, x, x, idx).items()}
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert out["kd"] == pytest.approx(float(T.token_kd(s, t, "reverse_kl")), rel=1e-5) and out["kd"] > 0.01
    assert out["kd"] != pytest.approx(float(T.token_kd(s, t, "forward_kl")), rel=1e-3)  # the direction matters
    assert out["loss"] == pytest.approx(0.3 * out["ce"] + 0.7 * out["kd"], rel=1e-5)
    # on-policy: the student's continuation after the prompt, scored by the teacher on generated positions only
    on = parse_recipe(_recipe(lm, distill={"on_policy": 1.0, "prompt_tokens": 8}))
    generated = torch.randint(0, d.num_classes, x.shape)
    generated[:, :8] = x[:, :8]
    monkeypatch.setattr(type(student), "generate", lambda self, prompt, n, sample=True: generated)
    res = LMDistiller(on.distill, teacher, None)(student, x, x, idx)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, 7:-1] = True
    with torch.no_grad():
        expected = T.token_kd(student(generated), teacher(generated), "forward_kl", mask=mask)
    assert float(res["on_policy"]) == 1.0 and float(res["kd"].detach()) == pytest.approx(float(expected), rel=1e-5)
    off = parse_recipe(_recipe(lm, distill={"on_policy": 0.5}))
    share = sum(LMDistiller(off.distill, teacher, None).on_policy_step(torch.tensor([i, i + 1])) for i in range(400)) / 400
    assert 0.4 < share < 0.6  # about half the batches, the same ones on every run (a function of seed and batch)
