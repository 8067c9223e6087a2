"""The recipe schema: typed, validated configs (one per section), with the limits that keep hostile values out."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_DEPTH = 50  # nesting levels a recipe (or a --set value) may have; real recipes use four or five
MAX_VALUES = 100_000  # values a recipe may hold once YAML aliases are expanded
MAX_BYTES = 1 << 20  # size of a recipe file


def _usable_path(value: str) -> str:
    """A string that names a file or folder must be one the system can look up (else Path checks raise OSError)."""
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:
        raise ValueError(f"'{_show(value)}' holds characters no file name can have; fix the name") from None
    if b"\0" in raw:
        raise ValueError(f"'{_show(value)}' holds a NUL character, which no file name can have; fix the name")
    if len(raw) > 4095 or any(len(part) > 255 for part in raw.split(b"/")):
        raise ValueError(f"'{_show(value)}' is too long for a file name (at most 255 bytes per name, 4095 in all); "
                         f"shorten it")
    return value


PathStr = Annotated[str, AfterValidator(_usable_path)]  # a file, folder or model name that may be a path


def _is_dir(path: str) -> bool:
    """Whether ``path`` is a folder; False for a name the system cannot even look up."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError):
        return False


def _show(text: Any, limit: int = 80) -> str:
    """``text`` fit for a one-line message: control characters escaped, the middle of a long text cut out."""
    s = repr(str(text))[1:-1]
    return s if len(s) <= limit else f"{s[:limit // 2]}...{s[-(limit // 2):]}"


def _value(value: Any, limit: int = 80) -> str:
    """A value from a recipe as it would be written in Python, on one line and shortened."""
    try:
        s = repr(value)
    except ValueError:  # an integer beyond Python's 4300-digit string limit
        return "a number too long to show"
    return s if len(s) <= limit else f"{s[:limit // 2]}...{s[-(limit // 2):]}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # every float is finite


class DataConfig(_Strict):
    """Where the examples come from and how they are split."""

    source: Literal["digits", "fashion_mnist", "csv", "text", "lm_text"] = "digits"
    path: Optional[PathStr] = None  # csv file, text .csv/.jsonl file, or a folder holding the Fashion-MNIST idx.gz files
    target: Optional[str] = None  # csv / text: the label column (text default: label)
    text: str = "text"  # text: the column holding the text
    test_path: Optional[PathStr] = None  # text / lm_text: a separate test file (default: a test_fraction split of `path`)
    tokenizer: Optional[PathStr] = None  # text: a Hugging Face folder with the tokenizer (default: the teacher's folder)
    max_length: int = Field(128, ge=2, le=1_000_000)  # text: tokens per example at most
    too_long: Literal["truncate", "error"] = "truncate"  # text: cut longer examples (with a warning) or refuse them
    block_size: int = Field(128, ge=2, le=1_000_000)  # lm_text: tokens per training sequence (documents are joined, then cut)
    eval_limit: Optional[int] = Field(None, ge=1)  # lm_text: at most this many validation and test blocks (a seeded subset)
    categorical: Optional[list[str]] = None  # csv: columns to one-hot encode (default: inferred)
    numeric: Optional[list[str]] = None  # csv: columns that must be numbers (default: inferred)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # ignored for fashion_mnist (own test set)
    limit: Optional[int] = Field(None, ge=10)  # use at most this many training examples (quick runs)


class TrainConfig(_Strict):
    """How one model is optimised."""

    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, le=100)  # float32 overflows in the optimizer far above this
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = False  # images: random crop (pad 2) + horizontal flip; for a student it means live teacher passes


class ModelSpec(_Strict):
    """A model: zoo name, ``file.py:factory``, or an ``.onnx`` file; optional weights."""

    model: PathStr
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[PathStr] = None  # .safetensors (or a pickle file with allow_pickle)
    allow_pickle: bool = False

    @field_validator("kwargs")
    @classmethod
    def _plain_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """kwargs go to the model's factory and into the run's recipe.yaml, which must read back the same (to resume):
        plain YAML values only, numbers finite."""
        stack = [(_show(k, 40), v, 1) for k, v in kwargs.items()]
        while stack:
            where, value, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise ValueError(f"'{where}' is nested more than {MAX_DEPTH} levels deep; kwargs need only a few levels")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"'{where}' is {value}; a number in kwargs must be finite")
            if isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(k, str):
                        raise ValueError(f"'{where}' has the key {_value(k, 40)}; keys in kwargs must be strings")
                    stack.append((f"{where}.{_show(k, 40)}", v, depth + 1))
            elif isinstance(value, (list, tuple)):
                stack += [(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]
            elif not (value is None or isinstance(value, (bool, int, float, str))):
                raise ValueError(f"'{where}' is {_value(value, 40)} (a {type(value).__name__}); kwargs hold numbers, "
                                 f"strings, booleans, lists and mappings")
        return kwargs


class TeacherConfig(ModelSpec):
    """The teacher: loaded from weights / ONNX, or trained with ``train``."""

    train: Optional[TrainConfig] = None
    weight: float = Field(1.0, gt=0, le=1e6)  # share in the combined soft targets (several teachers)


class StudentConfig(ModelSpec):
    """The student; ``init: select | average`` starts it from the teacher's weights (zoo models of one family)."""

    init: Optional[Literal["select", "average"]] = None  # layer selection / averaging, channels sliced by importance
    init_every: Optional[int] = Field(None, ge=1)  # take every k-th teacher layer (default: teacher depth / student depth)


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


class DistillConfig(_Strict):
    """loss = alpha * CE(hard labels) + (1 - alpha) * response term + sum of weighted feature terms.

    ``response: none`` drops the logit term (loss = CE + feature terms): the way to learn from a teacher
    trained on another label set (cross-task), through features and relations only.
    """

    response: Literal["kl", "mse_prob", "mse_logits", "dkd", "none", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                      "skew_reverse_kl", "uld"] = "kl"  # kl = forward_kl; token losses: losses/token.py (uld: causal_lm only)
    temperature: float = Field(4.0, gt=0, le=1000)  # far above, the softened targets are uniform (or NaN)
    alpha: float = Field(0.5, ge=0, le=1)
    dkd_alpha: float = Field(1.0, ge=0, le=1e6)  # DKD target-class weight (Zhao et al. 2022)
    dkd_beta: float = Field(8.0, ge=0, le=1e6)  # DKD non-target-class weight
    features: list[FeatureTerm] = Field(default_factory=list)
    combine: Literal["weights", "confidence"] = "weights"  # several teachers: fixed weights or per-sample confidence
    generations: int = Field(1, ge=1, le=100)  # born-again: each further generation is taught by the previous student
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)  # teacher.model: ema only: the running-average decay (default 0.999)
    cache_teacher: bool = True  # compute teacher outputs once when inputs do not change between epochs
    beta: float = Field(0.5, ge=0, le=1)  # jsd: the mixture weight (0: forward KL, 1: reverse KL)
    skew: float = Field(0.1, ge=0, le=1)  # skew_*_kl: the skew alpha (DistiLLM)
    topk: Optional[int] = Field(None, ge=1)  # causal_lm: cache the teacher's top-k logits per token (None: full logits, live)
    topk_cache: Optional[PathStr] = None  # causal_lm: a top-k cache folder to reuse (an error if made for another teacher or corpus)
    on_policy: float = Field(0.0, ge=0, le=1)  # causal_lm: share of batches on student-generated text (GKD)
    prompt_tokens: int = Field(16, ge=1, le=1_000_000)  # causal_lm on-policy: tokens of each training sequence kept as the prompt


class EvalConfig(_Strict):
    """Latency: every stage timed in `rounds` interleaved rounds after `warmup` calls each; repeats_b1 / repeats_b32
    timed calls per stage in all, split over the rounds (at least one per round)."""

    threads: int = Field(2, ge=1, le=1024)
    warmup: int = Field(5, ge=0, le=10_000)
    repeats_b1: int = Field(50, ge=1, le=100_000)
    repeats_b32: int = Field(10, ge=1, le=100_000)
    rounds: int = Field(5, ge=1, le=1000)


class ExportConfig(_Strict):
    format: Literal["onnx"] = "onnx"
    tolerance: float = Field(1e-4, gt=0)
    opset: int = Field(18, ge=13)


class PruneConfig(_Strict):
    """Pruning of the distilled student, then recovery by distillation from the same teacher."""

    method: Literal["structured", "unstructured"] = "structured"  # structured removes channels/neurons for real
    ratio: Optional[float] = Field(None, gt=0, lt=1)  # fraction of channels (structured) or weights (unstructured) removed
    target_params: Optional[int] = Field(None, ge=1)  # structured only: prune until at most this many parameters
    scope: Literal["layer", "global"] = "layer"  # the same ratio in every layer, or one threshold across layers
    keep: list[str] = Field(default_factory=list)  # module paths left unpruned (the output layer always is)
    steps: int = Field(1, ge=1, le=100)  # iterative: prune a share in each of `steps` rounds, distilling after each
    finetune_epochs: int = Field(0, ge=0, le=100_000)  # recovery epochs per step (0: no recovery)
    finetune_lr: Optional[float] = Field(None, gt=0, le=100)  # default: train.lr / 5

    @model_validator(mode="after")
    def _one_amount(self) -> "PruneConfig":
        if (self.ratio is None) == (self.target_params is None):
            raise ValueError("give exactly one of `ratio` (fraction removed, between 0 and 1) or `target_params`")
        if self.target_params is not None and self.method != "structured":
            raise ValueError("`target_params` needs method: structured (unstructured pruning keeps every parameter)")
        if self.target_params is not None and self.steps > 1:
            raise ValueError("`target_params` is reached in one step; use `ratio` for iterative pruning (steps > 1)")
        return self


class QuantizeConfig(_Strict):
    """int8 in ONNX Runtime: static (QDQ, calibrated), dynamic, quantization-aware training, or auto (measured)."""

    mode: Literal["auto", "int8", "static", "dynamic", "qat"] = "auto"  # int8: the faster of static/dynamic; auto: fp32 too
    target: Literal["portable", "this_cpu"] = "portable"  # portable: 7-bit weights, exact on every CPU; this_cpu: full range
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_size: int = Field(512, ge=1)  # training examples used to calibrate static int8
    calibration_data: Optional[PathStr] = None  # a .npy file of inputs to calibrate on instead
    per_channel: bool = True
    tolerance: float = Field(0.005, ge=0, le=1)  # auto: largest validation-accuracy drop accepted (0.005 = 0.5 point)
    latency_batch: Literal[1, 32] = 1  # auto: the batch size whose latency decides
    allow_fallback: bool = False  # leave ops ONNX Runtime cannot quantize in fp32 instead of failing
    qat_epochs: int = Field(3, ge=1, le=100_000)
    qat_lr: Optional[float] = Field(None, gt=0, le=100)  # default: train.lr / 10


class Recipe(_Strict):
    """A whole run: data -> teacher -> student -> [prune -> quantize] -> export -> evaluate."""

    name: str = "run"
    task: Literal["classify", "causal_lm"] = "classify"  # causal_lm: next-token distillation of a language model
    seed: int = Field(0, ge=0, le=2**32 - 1)  # the range numpy and scikit-learn accept
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig
    student: StudentConfig
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    more_teachers: list[TeacherConfig] = Field(default_factory=list)  # several teachers (weights or .onnx each)
    prune: Optional[PruneConfig] = None
    quantize: Optional[QuantizeConfig] = None

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
        lm = self.task == "causal_lm"
        if lm != (self.data.source == "lm_text"):
            raise ValueError("task: causal_lm goes with data.source: lm_text (a corpus), and lm_text with task: causal_lm")
        if lm and (self.prune or self.quantize or self.more_teachers or self.distill.features or self.distill.generations > 1
                   or self.ema_teacher or self.teacher.train):
            raise ValueError("task: causal_lm supports one loaded teacher (a model folder), token-level response losses "
                             "and student.init; remove prune, quantize, more_teachers, distill.features, generations, "
                             "ema and teacher.train")
        if lm and self.distill.response in ("mse_prob", "mse_logits", "dkd"):
            raise ValueError(f"distill.response {self.distill.response} is for classification; for task: causal_lm use "
                             f"forward_kl (= kl), reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, uld or none")
        if lm and self.distill.on_policy and (self.distill.response == "none" or self.distill.alpha == 1.0):
            raise ValueError("distill.on_policy needs a teacher signal: set distill.response to a token loss and alpha below 1")
        if self.distill.response == "uld" and not lm:
            raise ValueError("distill.response uld (cross-tokenizer) is for task: causal_lm; for classification use kl")
        if self.distill.response == "uld" and (self.distill.topk or self.distill.topk_cache or self.distill.on_policy):
            raise ValueError("distill.response uld runs the teacher live on its own tokenisation of each block; remove "
                             "distill.topk, topk_cache and on_policy")
        if not lm and (self.distill.topk or self.distill.topk_cache or self.distill.on_policy):
            raise ValueError("distill.topk, topk_cache and on_policy are for task: causal_lm")
        return self

    @model_validator(mode="after")
    def _text_has_a_tokenizer(self) -> "Recipe":
        d = self.data
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
            if t.weights or t.train or t.kwargs or self.more_teachers or self.distill.generations > 1:
                raise ValueError("teacher.model: ema is the student's own running average: give it no weights, train, "
                                 "kwargs, more_teachers or generations")
        elif t.weights is None and t.train is None and not t.model.endswith(".onnx") and not _is_dir(t.model):
            raise ValueError("teacher needs `weights`, an .onnx `model`, a Hugging Face model folder, or a `train` section to train it")
        for i, m in enumerate(self.more_teachers):
            if m.weights is None and not m.model.endswith(".onnx"):
                raise ValueError(f"more_teachers[{i}] needs `weights` or an .onnx `model` (only the first teacher is trained by a recipe)")
        for i, f in enumerate(self.distill.features):
            if f.teacher_index >= len(self.teachers):
                raise ValueError(f"distill.features[{i}].teacher_index is {f.teacher_index} but there are {len(self.teachers)} "
                                 f"teacher(s); use 0 for `teacher` and 1.. for `more_teachers`")
        if self.distill.response == "none" and not self.distill.features:
            raise ValueError("distill.response is none and there are no distill.features: nothing would be distilled; "
                             "add feature terms or set response: kl")
        if self.ema_teacher and (self.distill.alpha == 1.0 or self.distill.response == "none") and not self.distill.features:
            raise ValueError("teacher.model: ema with distill.alpha 1 (or response none) and no features distils nothing; "
                             "set distill.alpha below 1")
        if self.distill.ema_decay is not None and not self.ema_teacher:
            raise ValueError("distill.ema_decay is for `teacher: {model: ema}` only")
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
