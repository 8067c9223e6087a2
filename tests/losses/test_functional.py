"""Exact tests of the response losses (KD, DKD, MSE, CE) and the multi-teacher combination
(protege.losses.functional)."""
import math

import pytest
import torch
import torch.nn.functional as F

from protege.losses import functional as LF


torch.manual_seed(0)
S, T, Y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))


@pytest.mark.parametrize("fn", [lambda s, t: LF.kd_kl(s, t, 3.0), lambda s, t: LF.mse_prob(s, t, 2.0), LF.mse_logits,
                                lambda s, t: LF.dkd(s, t, Y, 1.0, 8.0, 4.0)])
def test_zero_on_identical_inputs(fn):
    assert float(fn(S, S.clone())) == pytest.approx(0.0, abs=1e-6)


def test_kd_kl_closed_form_two_classes():
    # one example, teacher probs (0.5, 0.5) at T=1, student logits (0, ln 3) -> probs (0.25, 0.75)
    s, t = torch.tensor([[0.0, math.log(3.0)]]), torch.zeros(1, 2)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(LF.kd_kl(s, t, 1.0)) == pytest.approx(expected, rel=1e-6)


def test_kd_kl_has_t_squared_factor():
    for temp in (1.0, 2.0, 5.0):
        plain = F.kl_div(F.log_softmax(S / temp, -1), F.log_softmax(T / temp, -1), log_target=True, reduction="batchmean")
        assert float(LF.kd_kl(S, T, temp)) == pytest.approx(temp**2 * float(plain), rel=1e-5)


def test_kd_kl_is_nonnegative_and_asymmetric():
    assert float(LF.kd_kl(S, T, 2.0)) > 0
    assert float(LF.kd_kl(S, T, 2.0)) != pytest.approx(float(LF.kd_kl(T, S, 2.0)))


def test_mse_prob_and_logits_closed_form():
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]])  # probs (.5,.5) vs (.25,.75)
    assert float(LF.mse_prob(s, t, 1.0)) == pytest.approx(0.25**2 * 2, rel=1e-6)
    assert float(LF.mse_logits(s, t)) == pytest.approx(math.log(3.0) ** 2 / 2, rel=1e-6)


def test_dkd_recovers_classic_kd():
    """Zhao et al. 2022, eq. 4: KD = TCKD + (1 - p_t) NCKD for one example, p_t the teacher's target prob."""
    for i in range(4):
        s, t, y = S[i:i + 1], T[i:i + 1], Y[i:i + 1]
        temp = 2.0
        p_target = float(F.softmax(t / temp, -1)[0, y])
        got = float(LF.dkd(s, t, y, alpha=1.0, beta=1.0 - p_target, temperature=temp))
        assert got == pytest.approx(float(LF.kd_kl(s, t, temp)), rel=1e-4)


def test_dkd_terms_are_separate():
    # Same non-target distribution, different target probability: only TCKD is non-zero.
    s = torch.tensor([[2.0, 0.0, 1.0]])
    t = torch.tensor([[4.0, 0.0, 1.0]])
    y = torch.tensor([0])
    assert float(LF.dkd(s, t, y, alpha=0.0, beta=1.0, temperature=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(LF.dkd(s, t, y, alpha=1.0, beta=0.0, temperature=1.0)) > 0


def test_cross_entropy_matches_torch():
    assert float(LF.cross_entropy(S, Y)) == pytest.approx(float(F.cross_entropy(S, Y)))


def test_losses_have_gradients():
    s = S.clone().requires_grad_(True)
    for loss in (LF.kd_kl(s, T, 2.0), LF.mse_prob(s, T), LF.mse_logits(s, T), LF.dkd(s, T, Y)):
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g).all() and g.abs().sum() > 0


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
