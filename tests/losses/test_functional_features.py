"""Exact tests of the feature (FitNets, AT) and relational (RKD, SP) loss functions."""
import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from protege.losses import functional as LF


D64 = torch.float64
g = torch.Generator().manual_seed(0)
S4, T4 = torch.randn(3, 4, 6, 6, generator=g, dtype=D64), torch.randn(3, 8, 6, 6, generator=g, dtype=D64)
E = torch.randn(5, 4, generator=g, dtype=D64)  # student embeddings, B=5, D=4
Q = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=D64))[0][:4]  # (4, 7), orthonormal rows
RELATIONAL = [LF.rkd_distance, LF.rkd_angle, LF.similarity_preserving]
ZERO = torch.zeros((), dtype=D64)


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


@pytest.mark.parametrize("fn", [LF.hint_mse, LF.attention_transfer, *RELATIONAL])
def test_zero_on_identical_inputs(fn):
    x = S4 if fn in (LF.hint_mse, LF.attention_transfer) else E
    assert_close(fn(x, x.clone()), ZERO)


@pytest.mark.parametrize("fn", [LF.hint_mse, LF.attention_transfer, *RELATIONAL])
def test_loss_is_positive_on_different_inputs(fn):
    s, t = (S4, T4[:, :4]) if fn in (LF.hint_mse, LF.attention_transfer) else (E, E.flip(0).cos())
    assert float(fn(s, t)) > 1e-6


@pytest.mark.parametrize("fn", RELATIONAL)
def test_relational_zero_under_orthogonal_map_to_wider_teacher(fn):
    # <xQ, yQ> = <x, y> when Q Q^T = I: distances, angles and inner products are preserved.
    assert_close(fn(E, E @ Q), ZERO)
    assert_close(fn(E.reshape(5, 2, 2), (E @ Q).reshape(5, 7, 1)), ZERO)  # flattened per sample


@pytest.mark.parametrize("fn", [LF.rkd_distance, LF.rkd_angle])
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e3])
def test_rkd_invariant_to_scale_and_translation(fn, scale):
    t = torch.randn(5, 3, generator=g, dtype=D64)
    shift = torch.randn(1, 4, generator=g, dtype=D64) * 10
    assert_close(fn(E * scale, t), fn(E, t))
    assert_close(fn(E + shift, t), fn(E, t))
    assert_close(fn(E * scale + shift, t * 3 - 1), fn(E, t))


def test_sp_invariant_to_global_scale_only():
    t = torch.randn(5, 6, generator=g, dtype=D64)
    for scale in (1e-3, 0.5, 1e3):
        assert_close(LF.similarity_preserving(E * scale, t), LF.similarity_preserving(E, t))
    # Row normalisation removes the row's own scale, not the other samples' (columns): not invariant.
    per_sample = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]], dtype=D64)
    assert float(LF.similarity_preserving(E * per_sample, E)) > 1e-3


def test_hint_mse_closed_form_and_shape_mismatch():
    s, t = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=D64), torch.zeros(2, 2, dtype=D64)
    assert_close(LF.hint_mse(s, t), torch.tensor(5.0 / 4, dtype=D64))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        LF.hint_mse(torch.zeros(2, 3), torch.zeros(2, 4))
    for a, b in (((2, 3), (3, 2)), ((2, 3), (1, 3))):  # same numel / broadcastable shapes still raise
        with pytest.raises(ValueError):
            LF.hint_mse(torch.zeros(a), torch.zeros(b))


def test_attention_map_by_hand():
    f = torch.tensor([[[[1.0, 0.0], [0.0, -2.0]], [[0.0, 1.0], [2.0, 0.0]]]], dtype=D64)  # (1, 2, 2, 2)
    # p=2: sum over channels of f^2 = [[1, 1], [4, 4]], norm sqrt(34)
    assert_close(LF.attention_map(f), torch.tensor([[1.0, 1.0, 4.0, 4.0]], dtype=D64) / math.sqrt(34))
    # p=1: sum of |f| = [[1, 1], [2, 2]], norm sqrt(10)
    assert_close(LF.attention_map(f, p=1.0), torch.tensor([[1.0, 1.0, 2.0, 2.0]], dtype=D64) / math.sqrt(10))
    tokens = torch.tensor([[[3.0, -4.0], [0.0, 2.0]]], dtype=D64)  # (1, N=2, D=2): mean f^2 = 12.5, 2
    assert_close(LF.attention_map(tokens), torch.tensor([[12.5, 2.0]], dtype=D64) / math.sqrt(12.5**2 + 4))
    for bad in (torch.zeros(2, 3), torch.zeros(2), torch.zeros(1, 1, 1, 1, 1)):
        with pytest.raises(ValueError, match="spatial or token"):
            LF.attention_map(bad)


def test_attention_transfer_closed_form():
    # maps [1, 0] and [0, 1]: squared distance 2 for sample 0; identical maps for sample 1 -> mean 1
    s = torch.tensor([[[[3.0, 0.0]]], [[[1.0, 1.0]]]], dtype=D64)  # (2, 1, 1, 2)
    t = torch.tensor([[[[0.0, 5.0]], [[0.0, 1.0]]], [[[2.0, 2.0]], [[2.0, -2.0]]]], dtype=D64)  # (2, 2, 1, 2)
    assert_close(LF.attention_transfer(s, t), torch.tensor(1.0, dtype=D64))
    # equals 2 - 2 cos per sample, with the same value for 3-D token features
    qs, qt = LF.attention_map(S4), LF.attention_map(T4)
    assert_close(LF.attention_transfer(S4, T4), (2 - 2 * (qs * qt).sum(1)).mean())
    tok_s, tok_t = S4.flatten(2).transpose(1, 2), T4.flatten(2).transpose(1, 2)  # (B, HW, C)
    assert_close(LF.attention_transfer(tok_s, tok_t), LF.attention_transfer(S4, T4))


def test_attention_transfer_channels_may_differ():
    assert_close(LF.attention_transfer(S4, torch.cat([S4, S4, -S4], 1)), ZERO)  # same map, 3x the channels
    assert_close(LF.attention_transfer(S4, torch.cat([S4, torch.zeros_like(S4)], 1)), ZERO)


def test_attention_transfer_pools_larger_spatial_size():
    s, t = torch.randn(2, 3, 4, 4, generator=g, dtype=D64), torch.randn(2, 5, 8, 12, generator=g, dtype=D64)
    t_pooled = t.reshape(2, 5, 4, 2, 4, 3).mean((3, 5))  # manual 2x3 average pooling -> (2, 5, 4, 4)
    expected = LF.attention_transfer(s, t_pooled)
    assert_close(LF.attention_transfer(s, t), expected)
    assert_close(LF.attention_transfer(t, s), expected)  # symmetric: the larger side is pooled either way
    assert float(expected) > 1e-3
    # student taller, teacher wider: both pooled to (2, 2)
    a, b = torch.randn(1, 2, 4, 2, generator=g, dtype=D64), torch.randn(1, 3, 2, 4, generator=g, dtype=D64)
    manual = LF.attention_transfer(a.reshape(1, 2, 2, 2, 2, 1).mean((3, 5)), b.reshape(1, 3, 2, 1, 2, 2).mean((3, 5)))
    assert_close(LF.attention_transfer(a, b), manual)


def test_attention_transfer_rejects_incompatible_shapes():
    with pytest.raises(ValueError):
        LF.attention_transfer(torch.zeros(2, 5, 4), torch.zeros(2, 6, 4))  # token counts differ
    with pytest.raises(ValueError):
        LF.attention_transfer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 16, 3))  # 4-D vs 3-D
    with pytest.raises(ValueError):
        LF.attention_transfer(torch.zeros(1, 3, 4, 4), torch.zeros(2, 3, 4, 4))  # batch differs
    with pytest.raises(ValueError, match="spatial or token"):
        LF.attention_transfer(torch.zeros(2, 3), torch.zeros(2, 3))


def test_rkd_distance_closed_form():
    # 3-4-5 triangle: mean distance 4, normalised (3/4, 1, 5/4); equilateral teacher: all 1.
    s = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=D64)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=D64)
    assert_close(LF.rkd_distance(s, t), torch.tensor(4 * huber(0.25) / 9, dtype=D64))  # = 1/72
    # 1-D points with one far outlier exercise both Huber branches; teacher: simplex, all distances equal.
    pts = [0.0, 1.0, 2.0, 3.0, 40.0]
    pairs = list(itertools.combinations(pts, 2))
    mu = sum(abs(a - b) for a, b in pairs) / len(pairs)
    expected = 2 * sum(huber(abs(a - b) / mu - 1) for a, b in pairs) / 25
    got = LF.rkd_distance(torch.tensor(pts, dtype=D64)[:, None], torch.eye(5, dtype=D64))
    assert_close(got, torch.tensor(expected, dtype=D64))
    assert max(abs(a - b) / mu - 1 for a, b in pairs) > 1  # the linear branch is really used


def test_rkd_distance_batch_of_two_is_always_zero():
    assert_close(LF.rkd_distance(E[:2], torch.randn(2, 9, generator=g, dtype=D64)), ZERO)


def test_rkd_angle_closed_form():
    equilateral = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=D64)  # all cos 1/2
    # Per vertex j only A[j, i, k] and A[j, k, i] (i, k the other two) differ from the teacher's.
    # Right isosceles triangle: cos 0 at the right angle, cos(45 deg) at the other two vertices.
    right = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=D64)
    expected = 2 * (huber(0 - 0.5) + 2 * huber(math.sqrt(0.5) - 0.5)) / 27
    assert_close(LF.rkd_angle(right, equilateral), torch.tensor(expected, dtype=D64))
    # Collinear 0, 1, 2: cos -1 at the middle vertex (|diff| 1.5, linear branch), cos 1 at the ends.
    line = torch.tensor([[0.0], [1.0], [2.0]], dtype=D64)
    expected = 2 * (huber(-1.5) + 2 * huber(0.5)) / 27
    assert_close(LF.rkd_angle(line, equilateral), torch.tensor(expected, dtype=D64))


def test_sp_closed_form():
    # Student G = I; teacher two equal samples: G = all ones, rows normalised to 1/sqrt(2).
    s, t = torch.eye(2, dtype=D64), torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=D64)
    assert_close(LF.similarity_preserving(s, t), torch.tensor(1 - math.sqrt(2) / 2, dtype=D64))


@pytest.mark.parametrize("fn,min_batch", [(LF.rkd_distance, 2), (LF.rkd_angle, 3)])
def test_rkd_batch_too_small_raises(fn, min_batch):
    with pytest.raises(ValueError, match=f"at least {min_batch}"):
        fn(E[:min_batch - 1], E[:min_batch - 1])
    fn(E[:min_batch], E[:min_batch])
    with pytest.raises(ValueError, match="batch"):
        fn(E[:4], E[:3])


@pytest.mark.parametrize("fn", [LF.hint_mse, LF.attention_transfer, *RELATIONAL])
def test_gradients_flow_to_student(fn):
    s, t = (S4[:, :4], T4[:, :4]) if fn in (LF.hint_mse, LF.attention_transfer) else (E, E.flip(0).sin())
    s = s.clone().requires_grad_(True)
    fn(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("fn", RELATIONAL)
def test_degenerate_student_gives_finite_loss_and_gradient(fn):
    s = E.clone()
    s[1] = s[0]  # two coincident samples
    for x in (s, torch.zeros_like(E) + 1.0):  # ... and a fully collapsed batch
        x = x.clone().requires_grad_(True)
        loss = fn(x, E)
        loss.backward()
        assert torch.isfinite(loss) and x.grad.abs().max() < 1e3  # no 1/eps blow-up


# Transformer terms: attention-map KL (TinyBERT / MiniLM) and the hidden-state cosine loss (DistilBERT).

def _attn(b=2, h=2, n=4, seed=0):
    return torch.softmax(torch.randn(b, h, n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), -1)


def test_attention_kl_zero_on_identical_and_closed_form():
    a = _attn()
    assert float(LF.attention_kl(a, a)) == pytest.approx(0.0, abs=1e-12)
    s, t = _attn(seed=1), _attn(seed=2)
    expected = (t * (t.log() - s.log())).sum(-1).mean()  # every row real: the mean of the per-row KLs
    assert float(LF.attention_kl(s, t)) == pytest.approx(float(expected), rel=1e-10)


def test_attention_kl_skips_padded_query_rows_and_averages_heads_when_counts_differ():
    s, t = _attn(seed=1), _attn(seed=2)
    t_pad, s_pad = t.clone(), s.clone()
    t_pad[:, :, -1] = 0  # the last query is padding (zeroed by the text models)
    s_pad[:, :, -1] = 0
    expected = (t[:, :, :-1] * (t[:, :, :-1].log() - s[:, :, :-1].log())).sum(-1).mean()
    assert float(LF.attention_kl(s_pad, t_pad)) == pytest.approx(float(expected), rel=1e-10)
    one_head = _attn(h=1, seed=3)
    tm = t.mean(1, keepdim=True)
    expected = (tm * (tm.log() - one_head.log())).sum(-1).mean()
    assert float(LF.attention_kl(one_head, t)) == pytest.approx(float(expected), rel=1e-10)
    with pytest.raises(ValueError, match="same B and L"):
        LF.attention_kl(_attn(n=4), _attn(n=5))


def test_hidden_cosine_closed_form_scale_invariance_and_padding():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])  # token 3 is padding (all zero): skipped
    assert float(LF.hidden_cosine(s, t)) == pytest.approx((1.0 + 0.0) / 2)
    assert float(LF.hidden_cosine(3 * s, t)) == pytest.approx(float(LF.hidden_cosine(s, t)))
    assert float(LF.hidden_cosine(t, t)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="adapt"):
        LF.hidden_cosine(torch.randn(1, 3, 4), torch.randn(1, 3, 2))
