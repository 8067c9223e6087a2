"""Token-level LM distillation losses: closed forms, limits, masking, and the top-k cache representation."""
import math

import pytest
import torch
import torch.nn.functional as F

from protege.losses import token as T


def _logs(*ps):
    return [torch.tensor(p, dtype=torch.float64).log() for p in ps]


P, Q = [0.5, 0.5], [0.25, 0.75]  # teacher, student


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_forward_and_reverse_kl_closed_form():
    log_p, log_q = _logs(P, Q)
    assert float(T.forward_kl(log_q, log_p)) == pytest.approx(_kl(P, Q), abs=1e-12)
    assert float(T.reverse_kl(log_q, log_p)) == pytest.approx(_kl(Q, P), abs=1e-12)
    assert _kl(P, Q) != pytest.approx(_kl(Q, P))  # the two directions really differ here


def test_every_loss_is_zero_on_identical_distributions():
    log_p = F.log_softmax(torch.randn(3, 5, 11, dtype=torch.float64), -1)
    for name in T.TOKEN_LOSSES:
        assert torch.allclose(T.divergence(name, log_p, log_p, beta=0.3, skew=0.2), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12), name


def test_jsd_closed_form_and_endpoints():
    log_p, log_q = _logs(P, Q)
    for beta in (0.2, 0.5, 0.9):
        m = [beta * a + (1 - beta) * b for a, b in zip(P, Q)]
        expected = beta * _kl(P, m) + (1 - beta) * _kl(Q, m)
        assert float(T.generalized_jsd(log_q, log_p, beta)) == pytest.approx(expected, abs=1e-12)
    assert float(T.generalized_jsd(log_q, log_p, 0.0)) == pytest.approx(_kl(P, Q), abs=1e-12)
    assert float(T.generalized_jsd(log_q, log_p, 1.0)) == pytest.approx(_kl(Q, P), abs=1e-12)
    # the endpoints are the limits of JSD / beta and JSD / (1 - beta)
    assert float(T.generalized_jsd(log_q, log_p, 1e-6)) / 1e-6 == pytest.approx(_kl(P, Q), rel=1e-4)
    assert float(T.generalized_jsd(log_q, log_p, 1 - 1e-6)) / 1e-6 == pytest.approx(_kl(Q, P), rel=1e-4)


def test_jsd_half_is_symmetric_and_bounded_by_log2():
    log_p = F.log_softmax(torch.randn(50, 7, dtype=torch.float64) * 5, -1)
    log_q = F.log_softmax(torch.randn(50, 7, dtype=torch.float64) * 5, -1)
    a, b = T.generalized_jsd(log_q, log_p, 0.5), T.generalized_jsd(log_p, log_q, 0.5)
    assert torch.allclose(a, b, atol=1e-12)
    assert float(a.max()) <= math.log(2) + 1e-12
    one_hot_p, one_hot_q = _logs([1.0, 0.0], [0.0, 1.0])  # disjoint supports: exactly log 2, finite
    assert float(T.generalized_jsd(one_hot_q, one_hot_p, 0.5)) == pytest.approx(math.log(2), abs=1e-12)


def test_skew_kls_closed_form_and_limits():
    log_p, log_q = _logs(P, Q)
    a = 0.1
    fwd = _kl(P, [a * x + (1 - a) * y for x, y in zip(P, Q)])
    rev = _kl(Q, [(1 - a) * x + a * y for x, y in zip(P, Q)])
    assert float(T.skew_forward_kl(log_q, log_p, a)) == pytest.approx(fwd, abs=1e-12)
    assert float(T.skew_reverse_kl(log_q, log_p, a)) == pytest.approx(rev, abs=1e-12)
    assert float(T.skew_forward_kl(log_q, log_p, 0.0)) == pytest.approx(_kl(P, Q), abs=1e-12)
    assert float(T.skew_reverse_kl(log_q, log_p, 0.0)) == pytest.approx(_kl(Q, P), abs=1e-12)
    assert float(T.skew_forward_kl(log_q, log_p, 1.0)) == 0.0 and float(T.skew_reverse_kl(log_q, log_p, 1.0)) == 0.0
    # skewing bounds the loss where the student has no mass on a teacher token: KL is infinite, SKL is not
    zero_q = torch.tensor([1.0, 0.0], dtype=torch.float64).log()
    assert math.isinf(float(T.forward_kl(zero_q, log_p)))
    assert float(T.skew_forward_kl(zero_q, log_p, a)) == pytest.approx(_kl(P, [a * 0.5 + 0.9, a * 0.5]), abs=1e-12)


def test_bad_beta_and_alpha_are_refused():
    log_p, log_q = _logs(P, Q)
    with pytest.raises(ValueError, match="beta"):
        T.generalized_jsd(log_q, log_p, 1.5)
    with pytest.raises(ValueError, match="alpha"):
        T.skew_forward_kl(log_q, log_p, -0.1)
    with pytest.raises(ValueError, match="allowed"):
        T.divergence("kl_both", log_q, log_p)


def test_masked_mean_ignores_padding_and_prompt_positions():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(T.masked_mean(values, mask)) == pytest.approx(2.0)
    assert float(T.masked_mean(values, torch.zeros_like(mask))) == 0.0  # nothing counts: 0, not NaN


def test_token_kd_temperature_squared_and_masking():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    per_pos = T.forward_kl(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1))
    expected = per_pos[mask].mean() * 4
    assert float(T.token_kd(s, t, "forward_kl", temperature=2.0, mask=mask)) == pytest.approx(float(expected), rel=1e-6)
    t2 = t.clone()
    t2[~mask] = 1e3  # what a padded position holds cannot change the loss
    assert float(T.token_kd(s, t2, "forward_kl", temperature=2.0, mask=mask)) == pytest.approx(float(expected), rel=1e-6)
    with pytest.raises(ValueError, match="tokenizer"):
        T.token_kd(s, torch.randn(2, 4, 10))
    ids, buckets = _topk_cache(t, 3, 1.0)
    with pytest.raises(ValueError, match="do not line up"):  # a cache made for blocks of another length
        T.token_kd_topk(torch.randn(2, 8, 9), ids, buckets)


def _topk_cache(teacher_logits: torch.Tensor, k: int, temperature: float):
    """(ids, teacher bucket log-probabilities) as the top-k cache gives them."""
    vals, ids = teacher_logits.topk(k, dim=-1)
    return ids, T.teacher_topk_log_probs(vals, torch.logsumexp(teacher_logits / temperature, dim=-1), temperature)


def test_topk_with_the_whole_vocabulary_equals_the_full_loss():
    torch.manual_seed(1)
    s, t = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    for name in T.TOKEN_LOSSES:
        full = T.token_kd(s, t, name, temperature=1.5)
        sparse = T.token_kd_topk(s, *_topk_cache(t, 8, 1.5), name, temperature=1.5)
        assert float(sparse) == pytest.approx(float(full), abs=2e-6), name  # computed in float32


def test_topk_tail_bucket_holds_the_exact_remaining_mass():
    torch.manual_seed(2)
    t = torch.randn(5, 30, dtype=torch.float64)
    ids, log_buckets = _topk_cache(t, 4, 2.0)
    buckets = log_buckets.exp()  # (5, 5)
    full = F.softmax(t / 2.0, -1)
    assert torch.allclose(buckets[:, :4], full.gather(-1, ids), atol=1e-12)
    assert torch.allclose(buckets[:, 4], 1 - full.gather(-1, ids).sum(-1), atol=1e-12)
    assert torch.allclose(buckets.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-12)


def test_topk_loss_is_a_lower_bound_of_forward_kl_and_gradients_stay_finite():
    torch.manual_seed(3)
    s = torch.randn(2, 6, 40, requires_grad=True)
    t = torch.randn(2, 6, 40) * 3
    full = T.token_kd(s, t, "forward_kl")
    sparse = T.token_kd_topk(s, *_topk_cache(t, 5, 1.0), "forward_kl")
    assert float(sparse.detach()) <= float(full.detach()) + 1e-6  # merging outcomes never increases a KL (data processing)
    sparse.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_losses_have_finite_gradients_with_zero_probability_tokens():
    log_p = torch.tensor([[0.0, float("-inf"), float("-inf")]])  # a one-hot teacher
    q = torch.randn(1, 3, requires_grad=True)
    for name in ("forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"):
        q.grad = None
        T.divergence(name, F.log_softmax(q, -1), log_p).sum().backward()
        assert torch.isfinite(q.grad).all(), name
    # reverse KL is truly infinite when the student puts mass where the teacher has none (the skew fixes that)
    assert math.isinf(float(T.reverse_kl(F.log_softmax(q.detach(), -1), log_p)))


def test_causal_lm_loss_matches_cross_entropy_on_kept_positions():
    torch.manual_seed(4)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    expected = F.cross_entropy(logits[mask], labels[mask])
    assert float(T.causal_lm_loss(logits, labels, mask)) == pytest.approx(float(expected), rel=1e-6)


def test_uld_closed_form_and_its_invariances():
    # teacher [0.5, 0.3, 0.2] over 3 tokens, student [0.1, 0.6, 0.2, 0.1] over 4: sorted 0.5 0.3 0.2 0 vs 0.6 0.2 0.1 0.1
    t, s = torch.tensor([[0.5, 0.3, 0.2]]).log(), torch.tensor([[0.1, 0.6, 0.2, 0.1]]).log()
    assert float(T.uld(s, t)) == pytest.approx(0.1 + 0.1 + 0.1 + 0.1, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 9, generator=g)
    perm = torch.randperm(9, generator=g)
    assert float(T.uld(a, b)) == pytest.approx(float(T.uld(a, b[..., perm])), abs=1e-6)  # token identities do not matter
    assert float(T.uld(a, a[..., torch.randperm(7, generator=g)])) == pytest.approx(0.0, abs=1e-6)
    assert float(T.uld(a, b)) == pytest.approx(float(T.uld(b, a)), abs=1e-6)  # symmetric, and bounded by 2
    assert 0 < float(T.uld(a, b)) <= 2
    # the temperature flattens both sides before sorting: at a high T both approach uniform over their vocabularies,
    # so one vocabulary size gives ~0 and sizes 7 and 9 give the uniforms' distance 2 * (1/7 - 1/9) * 7 = 4/9
    c = torch.randn(2, 5, 7, generator=g)
    assert float(T.uld(a, c, temperature=1e4)) == pytest.approx(0.0, abs=1e-4) and float(T.uld(a, c)) > 0.05
    assert float(T.uld(a, b, temperature=1e4)) == pytest.approx(4 / 9, abs=1e-4)
    # the mask averages over the positions that count
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 2] = True
    one = T.uld(a[:1, 2:3], b[:1, 2:3])
    assert float(T.uld(a, b, mask=mask)) == pytest.approx(float(one), abs=1e-6)
    a.requires_grad_(True)
    T.uld(a, b).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same positions"):
        T.uld(a[:, :4], b)
