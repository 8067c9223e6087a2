"""The recipe: a typed composition of the configs that live beside their verbs (DataConfig in data/, TrainConfig with
the fit loop, DistillConfig with the Distiller, PruneConfig with prune_, QuantizeConfig with the quantizer, ...),
the teacher and student sections, and the checks that involve several sections."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from ..compress.prune import PruneConfig
from ..compress.quantize import QuantizeConfig
from ..config import (  # noqa: F401 (re-exported)
    MAX_BYTES,
    MAX_DEPTH,
    MAX_VALUES,
    PathStr,
    _is_dir,
    _show,
    _Strict,
    _usable_path,
    _value,
)
from ..data.config import DataConfig
from ..evaluate.profile import EvalConfig
from ..export.onnx import ExportConfig
from ..models.config import ModelSpec
from ..train.distiller import DistillConfig, FeatureTerm, ResponseConfig  # noqa: F401 (re-exported)
from ..train.fit import TrainConfig
from ..tune import TuneConfig
from ..train.lm_distiller import LMDistillConfig  # noqa: F401 (re-exported)


class TeacherConfig(ModelSpec):
    """The teacher: loaded from weights / ONNX, or trained with ``train``."""

    train: Optional[TrainConfig] = None
    weight: float = Field(1.0, gt=0, le=1e6)  # share in the combined soft targets (several teachers)


class StudentConfig(ModelSpec):
    """The student; ``init: select | average`` starts it from the teacher's weights (zoo models of one family)."""

    init: Optional[Literal["select", "average"]] = None  # layer selection / averaging, channels sliced by importance
    init_every: Optional[int] = Field(None, ge=1)  # take every k-th teacher layer (default: teacher depth / student depth)


class Recipe(_Strict):
    """A whole run: data -> teacher -> student -> [prune -> quantize] -> export -> evaluate. The task picks the
    recipe's type (``RECIPES``: one class per task, each with its own ``distill`` config); ``parse_recipe`` reads
    ``task`` first and validates with that class."""

    name: str = "run"
    task: Literal["classify", "causal_lm"] = "classify"  # causal_lm: next-token distillation of a language model
    seed: int = Field(0, ge=0, le=2**32 - 1)  # the range numpy and scikit-learn accept
    seeds: int = Field(1, ge=1, le=100)  # train the student with seeds seed, seed+1, ...: mean +- std (one teacher, one split)
    baseline: bool = False  # also train, for each seed, the student from labels only (same initial weights, same data order)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig
    student: StudentConfig
    distill: ResponseConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    more_teachers: list[TeacherConfig] = Field(default_factory=list)  # several teachers (weights or .onnx each)
    prune: Optional[PruneConfig] = None
    quantize: Optional[QuantizeConfig] = None
    tune: TuneConfig = Field(default_factory=TuneConfig)  # protege tune: trials and search space (used only by tune)

    @model_validator(mode="after")
    def _plain_name(self) -> "Recipe":
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", self.name) or ".." in self.name:
            raise ValueError(f"name {self.name[:60]!r} must be a plain folder name (letters, digits, '.', '_', '-'; at most 100 "
                             f"characters, no '/' or '..'): a run without --out goes to runs/<name>")
        return self

    @property
    def teachers(self) -> list[TeacherConfig]:
        return [self.teacher, *self.more_teachers]

    @property
    def ema_teacher(self) -> bool:
        """Self-distillation from a running average of the student's own weights (``teacher: {model: ema}``)."""
        return self.teacher.model == "ema"

    @model_validator(mode="after")
    def _task_fits(self) -> "Recipe":
        if (self.task == "causal_lm") != (self.data.source == "lm_text"):
            raise ValueError("task: causal_lm goes with data.source: lm_text (a corpus), and lm_text with task: causal_lm")
        return self

    @model_validator(mode="after")
    def _text_has_a_tokenizer(self) -> "Recipe":
        d = self.data
        if d.source == "hf_dataset" and d.tokenizer is None and _is_dir(self.teacher.model):
            d.tokenizer = self.teacher.model  # used only if the dataset's inputs are a text column
        if d.source in ("text", "lm_text") and d.tokenizer is None:
            if not _is_dir(self.teacher.model):
                raise ValueError("data.source is text: set data.tokenizer to a Hugging Face folder holding the tokenizer "
                                 "(it defaults to the teacher's folder only when the teacher is one)")
            d.tokenizer = self.teacher.model
        return self

    @model_validator(mode="after")
    def _teacher_has_a_source(self) -> "Recipe":
        t = self.teacher
        if self.ema_teacher:
            if t.weights or t.train or t.kwargs or self.more_teachers:
                raise ValueError("teacher.model: ema is the student's own running average: give it no weights, train, "
                                 "kwargs or more_teachers")
        elif t.weights is None and t.train is None and not t.model.endswith(".onnx") and not _is_dir(t.model):
            raise ValueError("teacher needs `weights`, an .onnx `model`, a Hugging Face model folder, or a `train` section to train it")
        for i, m in enumerate(self.more_teachers):
            if m.weights is None and not m.model.endswith(".onnx"):
                raise ValueError(f"more_teachers[{i}] needs `weights` or an .onnx `model` (only the first teacher is trained by a recipe)")
        if self.student.init and (self.ema_teacher or self.teacher.model.endswith(".onnx")):
            raise ValueError("student.init copies weights from a PyTorch teacher; it cannot start from an .onnx or ema teacher")
        return self

    @model_validator(mode="after")
    def _nothing_ignored(self) -> "Recipe":
        """Fields the run would silently ignore are errors that say which field to remove."""
        for i, t in enumerate(self.teachers):
            who = "teacher" if i == 0 else f"more_teachers[{i - 1}]"
            if t.model.endswith(".onnx"):
                for field in ("train", "weights", "kwargs"):
                    if getattr(t, field):
                        raise ValueError(f"{who}.{field} is ignored: {who}.model is an .onnx file, run as it is (its own "
                                         f"weights, never trained); remove {who}.{field}")
            elif i > 0 and t.train:
                raise ValueError(f"{who}.train is ignored (only the first teacher is trained by a recipe); remove {who}.train "
                                 f"and give {who}.weights")
        for who, m in (("teacher", self.teacher), *((f"more_teachers[{i}]", t) for i, t in enumerate(self.more_teachers)),
                       ("student", self.student)):
            if m.normalize not in (None, "none") and self.data.source in ("text", "lm_text"):
                raise ValueError(f"{who}.normalize is for image and numeric inputs; a text model reads token ids: remove "
                                 f"{who}.normalize")
            if m.output is not None and not m.model.endswith(".onnx"):
                raise ValueError(f"{who}.output is ignored: it names an output of an .onnx model, and {who}.model is not "
                                 f"one; remove {who}.output")
        for who, t in (("teacher", self.teacher), *((f"more_teachers[{i}]", m) for i, m in enumerate(self.more_teachers))):
            if t.train is not None and t.train.log_with:
                raise ValueError(f"{who}.train.log_with is ignored: trackers are the whole run's; set train.log_with instead")
        if self.teacher.weights and self.teacher.train:
            raise ValueError("teacher.train is ignored when teacher.weights is given (the teacher is loaded, not trained); "
                             "remove teacher.train, or remove teacher.weights to train the teacher here")
        if self.student.model.endswith(".onnx"):
            raise ValueError("student.model is an .onnx file, which cannot be trained; use a zoo name, file.py:factory or "
                             "a Hugging Face model folder")
        if self.student.init_every is not None and self.student.init is None:
            raise ValueError("student.init_every is used only with student.init (select or average); set student.init "
                             "or remove student.init_every")
        return self


class ClassifyRecipe(Recipe):
    """``task: classify``: tables, images and text; every distillation method; pruning and int8."""

    task: Literal["classify"] = "classify"
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _distill_fits(self) -> "ClassifyRecipe":
        d = self.distill
        for i, f in enumerate(d.features):
            if f.teacher_index >= len(self.teachers):
                raise ValueError(f"distill.features[{i}].teacher_index is {f.teacher_index} but there are {len(self.teachers)} "
                                 f"teacher(s); use 0 for `teacher` and 1.. for `more_teachers`")
        if d.response == "none" and not d.features:
            raise ValueError("distill.response is none and there are no distill.features: nothing would be distilled; "
                             "add feature terms or set response: kl")
        if self.ema_teacher and d.generations > 1:
            raise ValueError("teacher.model: ema is the student's own running average: it takes no distill.generations")
        if d.ema_decay is not None and not self.ema_teacher:
            raise ValueError("distill.ema_decay is for `teacher: {model: ema}` only")
        if d.teacher_views:
            if not self.train.augment:
                raise ValueError("distill.teacher_views caches the teacher on augmented views of the training images: set "
                                 "train.augment: true, or remove distill.teacher_views")
            if not d.cache_teacher or self.ema_teacher:
                raise ValueError("distill.teacher_views needs a cached teacher: remove it, or set distill.cache_teacher: true "
                                 "(an ema teacher is never cached)")
        return self


class CausalLMRecipe(Recipe):
    """``task: causal_lm``: token-level distillation of a language model from one loaded teacher."""

    task: Literal["causal_lm"] = "causal_lm"
    distill: LMDistillConfig = Field(default_factory=LMDistillConfig)

    @model_validator(mode="after")
    def _one_loaded_teacher(self) -> "CausalLMRecipe":
        if self.prune or self.quantize or self.more_teachers or self.ema_teacher or self.teacher.train:
            raise ValueError("task: causal_lm supports one loaded teacher (a model folder), token-level response losses "
                             "and student.init; remove prune, quantize, more_teachers, ema and teacher.train")
        return self


RECIPES: dict[str, type[Recipe]] = {"classify": ClassifyRecipe, "causal_lm": CausalLMRecipe}
