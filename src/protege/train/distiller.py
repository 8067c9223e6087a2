"""The Distiller: a weighted sum of named loss terms, each a pure function from losses.functional.

loss = alpha * CE(student, labels) + (1 - alpha) * response(student, teachers) + sum_i w_i * term_i

Feature terms read the student's intermediate outputs through forward hooks. Their learned adapters
(when a student feature must be mapped to the teacher's shape) live in a ``DistillModule`` beside the
student, so the fit loop trains them with it and the student itself stays exactly the user's model.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import torch
from pydantic import Field
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ..config import _Strict
from ..errors import RecipeError
from ..knowledge import ModelOutput, Teacher
from ..knowledge.features import extract, unwrap
from ..losses import functional as LF
from ..losses.token import TOKEN_LOSSES, token_kd
from .adapters import check_term_shapes, make_adapter


class FeatureTerm(_Strict):
    """One feature- or relation-based loss term between a student and a teacher module (by module path).

    hint: FitNets (Romero et al. 2015), MSE after a learned adapter when shapes differ; at: attention
    transfer (Zagoruyko & Komodakis 2017); rkd_distance / rkd_angle: relational KD (Park et al. 2019);
    sp: similarity-preserving KD (Tung & Mori 2019); attention_kl: KL between transformer attention maps
    (TinyBERT / MiniLM; paths ``attention.N``); cosine: 1 - cos between hidden states (DistilBERT; ``hidden.N``).
    The path ``logits`` means the model's output.
    """

    loss: Literal["hint", "at", "rkd_distance", "rkd_angle", "sp", "attention_kl", "cosine"]
    student: str
    teacher: str
    weight: float = Field(1.0, ge=0, le=1e6)
    teacher_index: int = Field(0, ge=0)  # 0: `teacher`; 1, 2, ...: the entries of `more_teachers`


class ResponseConfig(_Strict):
    """What every task's ``distill`` section has: the response term's temperature and the label/teacher mix."""

    temperature: float = Field(4.0, gt=0, le=1000)  # far above, the softened targets are uniform (or NaN)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the hard-label cross-entropy; 1 - alpha on the response term
    beta: float = Field(0.5, ge=0, le=1)  # jsd: the mixture weight (0: forward KL, 1: reverse KL)
    skew: float = Field(0.1, ge=0, le=1)  # skew_*_kl: the skew alpha (DistiLLM)


class DistillConfig(ResponseConfig):
    """``distill`` of a classification recipe: loss = alpha * CE(hard labels) + (1 - alpha) * response term + sum of
    weighted feature terms. (A causal LM's section is ``LMDistillConfig``, train/lm_distiller.py.)

    ``response: none`` drops the logit term (loss = CE + feature terms): the way to learn from a teacher
    trained on another label set (cross-task), through features and relations only.
    """

    response: Literal["kl", "mse_prob", "mse_logits", "dkd", "none", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                      "skew_reverse_kl"] = "kl"  # kl = forward_kl; the token losses: losses/token.py
    dkd_alpha: float = Field(1.0, ge=0, le=1e6)  # DKD target-class weight (Zhao et al. 2022)
    dkd_beta: float = Field(8.0, ge=0, le=1e6)  # DKD non-target-class weight
    features: list[FeatureTerm] = Field(default_factory=list)
    combine: Literal["weights", "confidence"] = "weights"  # several teachers: fixed weights or per-sample confidence
    generations: int = Field(1, ge=1, le=100)  # born-again: each further generation is taught by the previous student
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)  # teacher.model: ema only: the running-average decay (default 0.999)
    cache_teacher: bool = True  # compute teacher outputs once when inputs do not change between epochs
    teacher_views: int = Field(0, ge=0, le=1000)  # with train.augment: cache the teacher's outputs on this many fixed
    # augmented views of every training image (epoch e trains on view e mod K; data/views.py); 0: live teacher passes


Losses = dict[str, torch.Tensor]
ResponseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DistillConfig], torch.Tensor]

# The registries at the YAML boundary: recipe name -> pure loss term.
RESPONSE: dict[str, ResponseFn] = {
    "kl": lambda s, t, y, c: LF.kd_kl(s, t, c.temperature),
    "mse_prob": lambda s, t, y, c: LF.mse_prob(s, t, c.temperature),
    "mse_logits": lambda s, t, y, c: LF.mse_logits(s, t),
    "dkd": lambda s, t, y, c: LF.dkd(s, t, y, c.dkd_alpha, c.dkd_beta, c.temperature),
    **{name: (lambda s, t, y, c, name=name: token_kd(s, t, name, temperature=c.temperature, beta=c.beta, skew=c.skew))
       for name in TOKEN_LOSSES},
}
FEATURE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hint": LF.hint_mse,
    "at": LF.attention_transfer,
    "rkd_distance": LF.rkd_distance,
    "rkd_angle": LF.rkd_angle,
    "sp": LF.similarity_preserving,
    "attention_kl": LF.attention_kl,
    "cosine": LF.hidden_cosine,
}
ADAPTED = ("hint", "cosine")  # terms that compare a student feature with the teacher's elementwise: adapted when shapes differ

MIN_BATCH = {"rkd_distance": 3, "rkd_angle": 3, "sp": 2}  # smaller batches carry no relation: the term is 0


def label_loss(label_smoothing: float = 0.0) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], Losses]:
    """Plain supervised training (teachers, and students from scratch)."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Losses:
        ce = LF.cross_entropy(model(x), y, label_smoothing)
        return {"loss": ce, "ce": ce}

    return loss_fn


class DistillModule(nn.Module):
    """The student plus the adapters of its feature terms: what the fit loop trains when there are feature terms.

    ``forward(x)`` is the student's own forward (validation, export); ``forward(x, features=True)`` also
    returns the (adapted) feature of every term, keyed ``term{i}``, all inside one forward so DDP sees it.
    An EMA self-teacher lives here too (frozen, never optimised), so checkpoints save and resume restores it.
    """

    def __init__(self, student: nn.Module, terms: Sequence[FeatureTerm], adapters: dict[str, nn.Module],
                 ema: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        self.terms = list(terms)
        self.adapters = nn.ModuleDict(adapters)
        self.ema = ema

    def forward(self, x: torch.Tensor, features: bool = False):
        if not features:
            return self.student(x)
        out = extract(self.student, x, [t.student for t in self.terms], "student")
        feats = {}
        for i, t in enumerate(self.terms):
            f = out.features[t.student]
            feats[f"term{i}"] = self.adapters[f"term{i}"](f) if f"term{i}" in self.adapters else f
        return out.logits, feats


class Distiller:
    """Named losses from one or several teachers: the hard-label CE, a response term and feature terms.

    Several teachers are combined into one soft target per sample (fixed weights, or per-sample
    confidence in the true label); feature terms name the teacher they read. Returns a dict of named
    losses ('loss' is the total that is optimised) so every term is logged.
    """

    def __init__(self, teacher: Teacher | Sequence[Teacher], cfg: DistillConfig, label_smoothing: float = 0.0,
                 weights: Optional[Sequence[float]] = None, views=None):
        self.teachers = [teacher] if isinstance(teacher, Teacher) else list(teacher)
        self.cfg, self.label_smoothing = cfg, label_smoothing
        self.views = views  # fixed augmented views (data/views.py) its teachers' caches were built on, if any: what the
        # fit loop must apply to the training images
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * len(self.teachers))
        self.response = RESPONSE.get(cfg.response)
        self.ema: Optional[EmaTeacher] = None

    def training_module(self, student: nn.Module, x: torch.Tensor, idx: torch.Tensor, seed: int = 0) -> nn.Module:
        """What fit() should train: the student alone, or a DistillModule with adapters sized by one dry pass
        (initialised from ``seed``, so a resumed run builds the same ones) and the EMA teacher, if any."""
        if not self.cfg.features and self.ema is None:
            return student
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            adapters = feature_adapters(self.cfg.features, student, [t(x, idx) for t in self.teachers], x) if self.cfg.features else {}
        return DistillModule(student, self.cfg.features, adapters, self.ema.model if self.ema is not None else None)

    def soft_target(self, touts: list[ModelOutput], y: torch.Tensor) -> torch.Tensor:
        """The teachers' combined target: the mixture of their softened distributions (as logits), or, for
        ``mse_logits``, the weighted mean of their logits (a mixture has no logits to regress onto)."""
        if len(touts) == 1:
            return touts[0].logits
        logits = torch.stack([t.logits for t in touts], 1)  # (B, K, C)
        w = self.weights.to(logits).expand(logits.shape[0], -1)  # (B, K)
        if self.cfg.combine == "confidence":
            w = LF.confidence_weights(logits, y) * w
        if self.cfg.response == "mse_logits":
            return ((w / w.sum(-1, keepdim=True)).unsqueeze(-1) * logits).sum(1)
        return LF.combine_teachers(logits, w, self.cfg.temperature)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Losses:
        if self.ema is not None:
            self.ema.update(unwrap(model))
        if self.cfg.features:
            logits, feats = model(x, features=True)
        else:
            logits, feats = model(x), {}
        responds = self.response is not None and self.cfg.alpha < 1  # (alpha 1: the response term has no weight)
        touts = [t(x, idx) for t in self.teachers] if responds or self.cfg.features else []
        ce = LF.cross_entropy(logits, y, self.label_smoothing)
        losses: Losses = {"ce": ce}
        if responds:
            kd = self.response(logits, self.soft_target(touts, y), y, self.cfg)
            total = self.cfg.alpha * ce + (1 - self.cfg.alpha) * kd
            losses["kd"] = kd
        else:
            total = ce
        for i, term in enumerate(self.cfg.features):
            if len(x) < MIN_BATCH.get(term.loss, 1):  # e.g. a last batch of 2: no angles to compare
                value = logits.new_zeros(())
            else:
                value = FEATURE[term.loss](feats[f"term{i}"], touts[term.teacher_index].features[term.teacher])
            losses[f"{term.loss}{i}"] = value
            total = total + term.weight * value
        return {"loss": total, **losses}


def feature_adapters(terms: Sequence[FeatureTerm], student: nn.Module, touts: Sequence[ModelOutput],
                     x: torch.Tensor) -> dict[str, nn.Module]:
    """Check every term's two feature shapes (one dry student pass on ``x``) and make the adapters hint terms need."""
    was_training = student.training
    with torch.no_grad():
        s = extract(student.eval(), x, [t.student for t in terms], "student")
    student.train(was_training)
    adapters = {}
    for i, term in enumerate(terms):
        sf, tf = s.features[term.student], touts[term.teacher_index].features[term.teacher]
        where = f"distill.features[{i}] ({term.loss}: student '{term.student}' {tuple(sf.shape[1:])}, " \
                f"teacher '{term.teacher}' {tuple(tf.shape[1:])})"
        check_term_shapes(term.loss, sf.shape, tf.shape, where)
        if term.loss in ADAPTED and sf.shape != tf.shape:
            adapters[f"term{i}"] = make_adapter(tuple(sf.shape[1:]), tuple(tf.shape[1:]), where)
    return adapters


class EmaTeacher(Teacher):
    """Self-distillation from a running average of the student's own weights (mean teacher; Tarvainen & Valpola 2017).

    Updated before every training step from the student's current weights; runs live (it changes every step).
    The average is torch's ``AveragedModel`` with an exponential ``avg_fn``: parameters and float buffers (BatchNorm
    statistics) move by ``decay``, integer buffers are copied; it starts from the student's initial weights.
    """

    def __init__(self, student: nn.Module, decay: float, paths: Sequence[str] = ()):
        def ema(average: torch.Tensor, current: torch.Tensor, _n: torch.Tensor) -> torch.Tensor:
            if not average.dtype.is_floating_point:
                return current
            return average.mul(decay).add(current, alpha=1 - decay)

        self.averaged = AveragedModel(unwrap(student), avg_fn=ema, use_buffers=True)
        self.averaged.n_averaged.fill_(1)  # the copy made here is the first average: the next update is an EMA step
        super().__init__(self.averaged.module, None, paths)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        student = model.student if isinstance(model, DistillModule) else model
        device = next(student.parameters()).device
        if next(self.model.parameters()).device != device:  # fit() moved the student (and, normally, this copy with it)
            self.averaged.to(device)
        self.averaged.update_parameters(student)


def check_no_logit_kd_across_label_sets(cfg: DistillConfig, classes: Sequence[int], data_classes: int) -> None:
    """Logit KD needs every teacher to score the student's label set; cross-task transfer uses features only."""
    bad = [i for i, c in enumerate(classes) if c != data_classes]
    if bad and cfg.response != "none":
        who = "teacher" if bad[0] == 0 else f"more_teachers[{bad[0] - 1}]"
        raise RecipeError(f"{who} scores {classes[bad[0]]} classes but the data has {data_classes} classes: logit KD "
                          f"({cfg.response}) needs the same label set; fix the teacher's num_classes (kwargs) or data.target, or for "
                          f"cross-task transfer set distill.response: none and distil through distill.features (hint, at, rkd_*, sp)")
