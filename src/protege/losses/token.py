"""Token-level distillation losses for language models, as pure functions.

Every divergence takes log-probabilities over the same support in the last dimension, shaped (..., S),
and returns one value per position (...). The support is the whole vocabulary, or the teacher's top-k
tokens plus one tail bucket that holds the remaining mass (see ``topk_log_probs``). ``masked_mean`` then
averages over the positions that count (not padding, not prompt). ``token_kd`` puts it together with a
temperature T and the usual T^2 factor (Hinton et al. 2015).

Conventions: p is the teacher, q the student.
- forward KL(p || q): mass-covering (the classic KD direction);
- reverse KL(q || p): mode-seeking (MiniLLM, Gu et al. 2024);
- generalized JSD with beta (GKD, Agarwal et al. 2024): beta KL(p || m) + (1 - beta) KL(q || m),
  m = beta p + (1 - beta) q. It vanishes at both ends, so, as in GKD's reference code, beta = 0 and
  beta = 1 are defined as the limits of JSD/beta and JSD/(1 - beta): forward KL and reverse KL;
- skew forward KL(p || a p + (1 - a) q) and skew reverse KL(q || (1 - a) p + a q) (DistiLLM, Ko et al.
  2024; a = 0.1 by default): mixing a little of the other distribution in keeps the loss and its gradient
  bounded where one side has almost no mass;
- ULD (``uld``, Boizard et al. 2024): L1 between the two sorted distributions, for two tokenizers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

TOKEN_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl")


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i) over the last dimension; terms with p_i = 0 count 0.

    Both logs are zeroed where p_i = 0 before the product, so a -inf there gives no NaN value or gradient.
    """
    p = log_p.exp()
    keep = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    return (p * (torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero))).sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from log a and log b, for 0 < w < 1."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def forward_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student)."""
    return kl(log_p, log_q)


def reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher)."""
    return kl(log_q, log_p)


def generalized_jsd(log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD); beta 0 / 1 give forward / reverse KL (see the module doc)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(log_q, log_p)
    if beta == 1.0:
        return reverse_kl(log_q, log_p)
    log_m = _mix(log_p, log_q, beta)
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def skew_forward_kl(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(p || alpha p + (1 - alpha) q) (DistiLLM); alpha = 0 is the forward KL, alpha = 1 gives 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew_forward_kl: alpha must be in [0, 1], got {alpha}")
    if alpha in (0.0, 1.0):
        return forward_kl(log_q, log_p) if alpha == 0.0 else torch.zeros_like(log_p[..., 0])
    return kl(log_p, _mix(log_p, log_q, alpha))


def skew_reverse_kl(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(q || (1 - alpha) p + alpha q) (DistiLLM); alpha = 0 is the reverse KL, alpha = 1 gives 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew_reverse_kl: alpha must be in [0, 1], got {alpha}")
    if alpha in (0.0, 1.0):
        return reverse_kl(log_q, log_p) if alpha == 0.0 else torch.zeros_like(log_q[..., 0])
    return kl(log_q, _mix(log_q, log_p, alpha))


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of per-position ``values`` (B, L) over positions where ``mask`` (B, L) is true; 0 if none are."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


TAIL_FLOOR = 1e-12  # the tail bucket's smallest mass: keeps log and gradient finite when the K tokens hold it all


def topk_log_probs(log_probs_k: torch.Tensor) -> torch.Tensor:
    """(..., K) log-probabilities of K tokens -> (..., K + 1): the K, then the tail bucket log(1 - sum).

    1 - sum is computed as -expm1(logsumexp), exact when the K tokens hold little mass or nearly all of it.
    """
    covered = torch.logsumexp(log_probs_k, dim=-1, keepdim=True).clamp(max=0.0)
    tail = (-torch.expm1(covered)).clamp_min(TAIL_FLOOR).log()
    return torch.cat([log_probs_k, tail], dim=-1)


def teacher_topk_log_probs(topk_logits: torch.Tensor, log_z: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's (K + 1)-bucket log-probabilities at T from a top-k cache.

    topk_logits (..., K) are raw logits z; log_z (...) is logsumexp(z / T) over the whole vocabulary,
    stored with the cache for that T, so the K probabilities are exact and the tail is the exact remainder.
    """
    return topk_log_probs(topk_logits / temperature - log_z.unsqueeze(-1))


def student_topk_log_probs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """The student's distribution at T collapsed onto the teacher's K tokens ``ids`` (..., K) plus one tail bucket."""
    log_q = F.log_softmax(logits / temperature, dim=-1)
    return topk_log_probs(log_q.gather(-1, ids.long()))


def divergence(name: str, log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """The divergence a recipe names (one of TOKEN_LOSSES), per position."""
    if name == "forward_kl":
        return forward_kl(log_q, log_p)
    if name == "reverse_kl":
        return reverse_kl(log_q, log_p)
    if name == "jsd":
        return generalized_jsd(log_q, log_p, beta)
    if name == "skew_forward_kl":
        return skew_forward_kl(log_q, log_p, skew)
    if name == "skew_reverse_kl":
        return skew_reverse_kl(log_q, log_p, skew)
    raise ValueError(f"unknown token loss '{name}'; allowed: {', '.join(TOKEN_LOSSES)}")


def token_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, name: str = "forward_kl", *,
             temperature: float = 1.0, mask: Optional[torch.Tensor] = None, beta: float = 0.5,
             skew: float = 0.1) -> torch.Tensor:
    """T^2 * masked mean over positions of divergence(student, teacher) on full-vocabulary logits (B, L, V)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"token_kd: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; logit losses need one tokenizer and vocabulary")
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return masked_mean(divergence(name, log_q, log_p, beta, skew), mask) * (t * t)


def token_kd_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, teacher_log_probs: torch.Tensor,
                  name: str = "forward_kl", *, temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
                  beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """``token_kd`` against a top-k teacher cache: both sides on the teacher's K tokens plus a tail bucket.

    topk_ids (B, L, K); teacher_log_probs (B, L, K + 1) at T (``teacher_topk_log_probs`` builds them from logits).
    This is biased: the tail's inner shape is not matched and which K tokens are kept depends on the teacher
    (Sparse Logit Sampling, Anshumann et al. 2025). With K = V it equals ``token_kd``.
    """
    if topk_ids.shape[:-1] != student_logits.shape[:-1] or teacher_log_probs.shape[-1] != topk_ids.shape[-1] + 1:
        raise ValueError(f"token_kd_topk: student logits {tuple(student_logits.shape)}, top-k ids {tuple(topk_ids.shape)} "
                         f"and teacher buckets {tuple(teacher_log_probs.shape)} do not line up")
    t = temperature
    log_q = student_topk_log_probs(student_logits.float(), topk_ids, t)
    return masked_mean(divergence(name, log_q, teacher_log_probs.float(), beta, skew), mask) * (t * t)


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 1.0,
        mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024), for teacher and student with different vocabularies.

    Per position, both distributions at T are sorted in decreasing order, the shorter padded with zeros, and
    compared by L1: sum_i |q_(i) - p_(i)|, the closed form the paper uses for its Wasserstein distance. Sorting drops
    the token identities, so the two vocabularies need not match; what is matched is the shape of the distribution
    (how peaked or spread the teacher is), not which token it favours. Logits (B, L, Vs) and (B, L, Vt) must be
    aligned position by position by the caller (ULD pairs the i-th positions of the two tokenisations). Returns the
    masked mean over positions (no T^2 factor: the distance is bounded by 2).
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"uld: student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
                         f"must have the same positions")
    q = F.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = F.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q, p = F.pad(q, (0, width - q.shape[-1])), F.pad(p, (0, width - p.shape[-1]))
    return masked_mean((q - p).abs().sum(-1), mask)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position i predict labels (B, L) at i (already shifted)."""
    ce = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    return masked_mean(ce, mask)
