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


# Feature and relational losses. Shapes: features (B, ...); the relational losses (RKD, SP) flatten
# each sample to a vector (B, D), so student and teacher may differ in everything but the batch.

_EPS = 1e-12


def hint_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al. 2015): squared error averaged over all elements.

    The student feature must already be adapted (e.g. by a 1x1 conv regressor) to the teacher's shape.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hint_mse: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}; "
                         "adapt the student feature to the teacher's shape first")
    return (student - teacher).pow(2).mean()


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention map (Zagoruyko & Komodakis 2017): (B, C, H, W) -> (B, H*W), or (B, N, D) -> (B, N) for tokens.

    sum_c |f_c|^p over channels (for tokens the mean over D of |f|^p; sum and mean differ by a constant
    factor that the normalisation removes), flattened and L2-normalised per sample.
    """
    if feature.dim() == 4:
        q = feature.abs().pow(p).sum(1).flatten(1)  # (B, H*W)
    elif feature.dim() == 3:
        q = feature.abs().pow(p).mean(-1)  # (B, N)
    else:
        raise ValueError(f"attention_map: expected (B, C, H, W) or (B, N, D) features, got shape "
                         f"{tuple(feature.shape)}; attention transfer needs spatial or token positions")
    return F.normalize(q, dim=1)


def attention_transfer(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017, eq. 2, squared 2-norm): mean_b ||Q_s - Q_t||_2^2.

    Q = attention_map(., p), a non-negative unit vector per sample, so each term is 2 - 2 cos(Q_s, Q_t),
    in [0, 2] whatever H*W (the authors' code uses ((Q_s - Q_t)^2).mean(), i.e. this divided by H*W).
    Channels may differ. If the spatial sizes of 4-D features differ, each feature is adaptive-average-pooled
    to (min H, min W) first (so only the larger one changes); token counts of 3-D features must match.
    """
    if student.dim() != teacher.dim() or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"attention_transfer: incompatible shapes {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
        size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
        student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
    elif student.dim() == 3 and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"attention_transfer: token counts differ, {tuple(student.shape)} and {tuple(teacher.shape)}")
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).sum(1).mean()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) between self-attention distributions (B, heads, L, L), per query row.

    Attention-based distillation of transformers (TinyBERT, Jiao et al. 2020; KL as in MiniLM, Wang et al.
    2020). Averaged over heads and over the query rows that exist: an all-zero row (a padded query, as the
    text models here zero them) is skipped. If the head counts differ, each side is averaged over its heads first.
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise ValueError(f"attention_kl: expected attention maps (B, heads, L, L) with the same B and L, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    rows = teacher.sum(-1) > 0  # (B, H, L)
    log_p = teacher.clamp_min(_EPS).log()
    log_q = student.clamp_min(_EPS).log()
    per_row = (teacher * (log_p - log_q)).sum(-1)  # (B, H, L); 0 where the teacher's row is 0
    return per_row.sum() / rows.sum().clamp_min(1)


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, teacher) per token, averaged over real tokens (DistilBERT's cosine loss, Sanh et al. 2019).

    Features (B, L, D) or (B, D) of equal shape (adapt a narrower student first); a token whose teacher vector is
    all zero (a padded position) is skipped.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hidden_cosine: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}; "
                         "adapt the student feature to the teacher's shape first")
    keep = teacher.abs().sum(-1) > 0
    cos = F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return ((1 - cos) * keep).sum() / keep.sum().clamp_min(1)


def _flat_batch(student: torch.Tensor, teacher: torch.Tensor, min_batch: int,
                name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) -> (B, D) for both; the batch sizes must match and be at least min_batch."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}")
    if student.shape[0] < min_batch:
        raise ValueError(f"{name}: needs a batch of at least {min_batch}, got {student.shape[0]}")
    return student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, D) -> (B, B) with a zero diagonal.

    Squared distances are clamped to >= eps before the square root, keeping gradients finite for
    coincident points; centring first makes the Gram-matrix form exact under translation.
    """
    e = e - e.mean(0)
    sq = e.pow(2).sum(1)  # (B,)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp_min(_EPS)
    return d2.sqrt() * (1 - torch.eye(e.shape[0], dtype=e.dtype, device=e.device))


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance loss (Park et al. 2019): Huber(delta=1) between normalised distance matrices.

    Each (B, B) matrix of pairwise Euclidean distances is divided by the mean of its B(B-1) off-diagonal
    entries; the Huber loss is averaged over all B*B entries (the diagonal contributes 0). Invariant to
    translating, rotating and positively scaling either side. Needs B >= 2 (with B = 2 the normalised
    matrices are always equal, so the loss is 0: use B >= 3 for a training signal).
    """
    s, t = _flat_batch(student, teacher, 2, "rkd_distance")
    n_pairs = s.shape[0] * (s.shape[0] - 1)
    ds, dt = _pairwise_distances(s), _pairwise_distances(t)  # (B, B)
    ds = ds / (ds.sum() / n_pairs).clamp_min(_EPS)
    dt = dt / (dt.sum() / n_pairs).clamp_min(_EPS)
    return F.smooth_l1_loss(ds, dt, beta=1.0)


def _unit_differences(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B, D), [j, i] = (e_i - e_j) / ||e_i - e_j||; zero (with zero gradient) where e_i == e_j."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # [j, i] = e_i - e_j
    norm = diff.norm(dim=-1, keepdim=True)
    return torch.where(norm > _EPS, diff / norm.clamp_min(_EPS), torch.zeros_like(diff))


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD angle loss (Park et al. 2019): Huber(delta=1) between the (B, B, B) angle tensors.

    A[j, i, k] = <u_ji, u_jk>, u_ji the unit vector from e_j to e_i: the cosine of the angle at vertex j
    (0 where i == j or k == j, 1 where i == k != j). The Huber loss is averaged over all B^3 entries.
    Needs B >= 3: with two points every angle is degenerate and the loss is always 0. Memory O(B^2 D).
    """
    s, t = _flat_batch(student, teacher, 3, "rkd_angle")
    us, ut = _unit_differences(s), _unit_differences(t)  # (B, B, D)
    return F.smooth_l1_loss(us @ us.transpose(1, 2), ut @ ut.transpose(1, 2), beta=1.0)


def similarity_preserving(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ||G~_s - G~_t||_F^2 / B^2.

    G = F F^T (B, B) on flattened features, each row L2-normalised. Invariant to scaling either side by
    one positive factor (not per sample: that rescales the columns) and to orthogonal maps of features.
    """
    s, t = _flat_batch(student, teacher, 1, "similarity_preserving")
    gs, gt = F.normalize(s @ s.t(), dim=1), F.normalize(t @ t.t(), dim=1)  # (B, B)
    return (gs - gt).pow(2).sum() / s.shape[0] ** 2


def combine_teachers(logits: torch.Tensor, weights: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One soft target from K teachers: logits (B, K, C), weights (K,) or (B, K) -> logits (B, C).

    The result's softmax at ``temperature`` is the weighted mixture sum_k w_k softmax(z_k / T) (weights
    normalised to sum to 1), so KL(mixture || student) has the same student gradient as the weighted sum
    of the per-teacher KL terms (Hinton et al. 2015 average the teachers' distributions the same way).
    """
    w = weights if weights.ndim == 2 else weights.expand(logits.shape[0], -1)  # (B, K)
    w = w / w.sum(-1, keepdim=True)
    log_mix = torch.logsumexp(F.log_softmax(logits / temperature, dim=-1) + w.clamp_min(1e-30).log().unsqueeze(-1), dim=1)
    return log_mix * temperature


def confidence_weights(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample teacher weights from their confidence in the true label: logits (B, K, C), target (B,) -> (B, K).

    w_k = softmax_k(-CE_k): a teacher that is more certain of the right class counts more, and a teacher that
    is wrong on a sample barely counts for it (the confidence-aware weighting of Zhang et al. 2022, CA-MKD).
    """
    ce = -F.log_softmax(logits, dim=-1).gather(-1, target[:, None, None].expand(-1, logits.shape[1], 1)).squeeze(-1)  # (B, K)
    return F.softmax(-ce, dim=-1)
