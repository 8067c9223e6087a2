"""Distillation losses as pure functions of tensors. Shapes: logits (B, C), target (B,) int64.

Every function returns a scalar averaged over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hard-label cross-entropy."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """KL(p_teacher^T || p_student^T) * T^2 on temperature-softened outputs (Hinton et al. 2015).

    The T^2 factor keeps gradient magnitudes comparable to the hard-label term when T changes.
    With alpha = 0 this is training on the teacher's soft labels alone (it differs from soft-label
    cross-entropy only by the teacher's entropy, a constant).
    """
    t = temperature
    log_p_s = F.log_softmax(student / t, dim=-1)
    log_p_t = F.log_softmax(teacher / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * (t * t)


def mse_prob(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Squared error between class probabilities, summed over classes (Kim et al. 2021, 'MSE vs KL')."""
    t = temperature
    return (F.softmax(student / t, dim=-1) - F.softmax(teacher / t, dim=-1)).pow(2).sum(-1).mean()


def mse_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error between logits, averaged over classes (Ba & Caruana 2014, logit matching)."""
    return (student - teacher).pow(2).mean()


def _binary_kl(log_p_t: torch.Tensor, log_q_t: torch.Tensor, log_p_s: torch.Tensor, log_q_s: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(p_t) || Bernoulli(p_s)) from log p and log(1 - p) of each side; elementwise."""
    return log_p_t.exp() * (log_p_t - log_p_s) + log_q_t.exp() * (log_q_t - log_q_s)


def _log_target_split(z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and log(1 - p(target)) from logits z (B, C), stable when p(target) rounds to 1."""
    lse = torch.logsumexp(z, dim=-1)
    log_p = z[mask] - lse
    log_rest = torch.logsumexp(z.masked_fill(mask, float("-inf")), dim=-1) - lse
    return log_p, log_rest


def dkd(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, times T^2.

    TCKD: binary KL on the target-class probability. NCKD: KL between the distributions over the
    non-target classes only (the target logit removed before the softmax).
    """
    t = temperature
    mask = F.one_hot(target, student.shape[-1]).bool()  # (B, C)
    tckd = _binary_kl(*_log_target_split(teacher / t, mask), *_log_target_split(student / t, mask)).mean()
    neg_inf = torch.finfo(student.dtype).min
    log_q_s = F.log_softmax((student / t).masked_fill(mask, neg_inf), dim=-1)
    log_q_t = F.log_softmax((teacher / t).masked_fill(mask, neg_inf), dim=-1)
    q_t = log_q_t.exp()
    nckd = (q_t * (log_q_t - log_q_s)).masked_fill(mask, 0.0).sum(-1).mean()
    return (alpha * tckd + beta * nckd) * (t * t)
