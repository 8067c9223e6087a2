"""The token-level distillation loss of a causal LM (cached top-k, live, on-policy, ULD across tokenizers)."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import PathStr

from ..knowledge.features import unwrap
from ..knowledge.topk import TopKCache
from ..losses.token import causal_lm_loss, token_kd, token_kd_topk, uld
from .distiller import ResponseConfig

Losses = dict[str, torch.Tensor]


class LMDistillConfig(ResponseConfig):
    """``distill`` of a causal-LM recipe: loss = alpha * next-token CE + (1 - alpha) * a token-level response term
    against the teacher (a top-k cache, the live teacher, on-policy samples, or ULD across tokenizers)."""

    response: Literal["kl", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "uld"] = "kl"  # kl = forward_kl
    topk: Optional[int] = Field(None, ge=1)  # cache the teacher's top-k logits per token (None: full logits, live)
    topk_cache: Optional[PathStr] = None  # a top-k cache folder to reuse (an error if made for another teacher or corpus)
    on_policy: float = Field(0.0, ge=0, le=1)  # share of batches on student-generated text (GKD)
    prompt_tokens: int = Field(16, ge=1, le=1_000_000)  # on-policy: tokens of each training sequence kept as the prompt

    @model_validator(mode="after")
    def _signal_fits(self) -> "LMDistillConfig":
        if self.on_policy and self.alpha == 1.0:
            raise ValueError("on_policy needs a teacher signal: set alpha below 1")
        if self.response == "uld" and (self.topk or self.topk_cache or self.on_policy):
            raise ValueError("response uld runs the teacher live on its own tokenisation of each block; remove topk, "
                             "topk_cache and on_policy")
        return self


class LMDistiller:
    """Named token-level losses for a student LM: ``ce`` on the corpus, ``kd`` against the teacher.

    The teacher signal is a top-k cache indexed by training block, or the teacher run live (needed on
    student-generated text). With ``on_policy`` > 0, that share of steps (seeded) trains on continuations the
    student samples after the block's first ``prompt_tokens`` tokens, scored by the teacher, with the prompt
    masked out (GKD, Agarwal et al. 2024).
    """

    def __init__(self, cfg: LMDistillConfig, teacher: Optional[nn.Module], cache: Optional[TopKCache], seed: int = 0,
                 teacher_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        self.cfg, self.teacher, self.cache, self.seed = cfg, teacher, cache, seed
        self.teacher_ids = teacher_ids  # ULD across tokenizers: each training block in the teacher's ids, and its length
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def _kd(self, logits: torch.Tensor, x: torch.Tensor, idx: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        name = "forward_kl" if c.response == "kl" else c.response
        kw = {"temperature": c.temperature, "mask": mask, "beta": c.beta, "skew": c.skew}
        if self.cache is not None and idx is not None:
            ids, t_log_probs = (t.to(logits.device) for t in self.cache.get(idx))
            return token_kd_topk(logits, ids, t_log_probs, name, **kw)
        with torch.no_grad():
            t_logits = self.teacher(x.to(next(self.teacher.parameters()).device)).to(logits.device)
        return token_kd(logits, t_logits, name, **kw)

    def on_policy_step(self, idx: torch.Tensor) -> bool:
        """Whether this batch trains on generated text: a function of the seed and the batch (so a resumed run
        makes the same choices), true for about ``on_policy`` of the batches."""
        if not self.cfg.on_policy:
            return False
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx[0]) * 7919 + len(idx))
        return float(torch.rand((), generator=g)) < self.cfg.on_policy

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Losses:
        c = self.cfg
        logits = model(x)  # (B, L, V)
        ce = causal_lm_loss(logits[:, :-1], x[:, 1:])
        if c.alpha == 1.0:
            return {"loss": ce, "ce": ce}
        if c.response == "uld":
            kd = self._uld(logits, x, idx)
            return {"loss": c.alpha * ce + (1 - c.alpha) * kd, "ce": ce, "kd": kd}
        if self.on_policy_step(idx):
            kd = self._on_policy(model, x)
            return {"loss": c.alpha * ce + (1 - c.alpha) * kd, "ce": ce, "kd": kd, "on_policy": torch.ones(())}
        kd = self._kd(logits, x, idx, None)
        return {"loss": c.alpha * ce + (1 - c.alpha) * kd, "ce": ce, "kd": kd, "on_policy": torch.zeros(())}

    def _uld(self, logits: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """ULD against the live teacher reading the same block in its own tokenisation: the i-th next-token
        distributions of the two are paired, for the positions where the teacher's text has a next token."""
        if self.teacher_ids is None:
            t_x, t_len = x, torch.full((len(x),), x.shape[1], device=x.device)
        else:
            t_x, t_len = (t[idx.cpu()].to(x.device) for t in self.teacher_ids)
        with torch.no_grad():
            t_logits = self.teacher(t_x.to(next(self.teacher.parameters()).device)).to(logits.device)
        n = min(logits.shape[1], t_logits.shape[1]) - 1
        mask = torch.arange(n, device=x.device).unsqueeze(0) < (t_len - 1).unsqueeze(1)
        return uld(logits[:, :n], t_logits[:, :n], temperature=self.cfg.temperature, mask=mask)

    def _on_policy(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The divergence on a continuation the student samples (in eval mode: no dropout) after the block's first
        ``prompt_tokens`` tokens, scored by the live teacher; only positions that predict generated tokens count."""
        p = min(self.cfg.prompt_tokens, x.shape[1] - 1)
        inner = unwrap(model)
        was_training = inner.training
        inner.eval()
        seq = inner.generate(x[:, :p], x.shape[1] - p, sample=True)[:, : x.shape[1]]
        inner.train(was_training)
        mask = torch.zeros(seq.shape, dtype=torch.bool, device=seq.device)
        mask[:, p - 1:-1] = True  # the positions that predict generated tokens; the prompt is masked out
        return self._kd(model(seq), seq, None, mask)


