"""The Python API the CLI calls (re-exported at the package top level)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .compress import prune_, quantize_onnx
from .compress.budget import BudgetConfig
from .errors import ModelError, RecipeError
from .knowledge.inspect import format_rows, inspect_model
from .knowledge.sequences import generate_corpus as generate
from .models import build_model
from .models.lm import convert_gguf as convert
from .recipe import ModelSpec, PruneConfig, QuantizeConfig, load_recipe
from .recipe.files import _describe
from .run import Run
from .stages import compress, distill, distill_seeds, evaluate, export_onnx, tune
from .stages.budget import compress_to_budget


def distill_file(recipe: str | Path, out: Optional[str | Path] = None, overrides: Optional[list[str]] = None, *,
                 seeds: Optional[int] = None, baseline: Optional[bool] = None, **kw) -> Run | dict:
    """Load a recipe file (with ``--set`` overrides) and run it into ``out`` (default runs/<name>). ``seeds`` /
    ``baseline`` (the CLI's --seeds / --baseline) override the recipe's; several runs return distill_seeds' summary."""
    if seeds is not None and seeds < 1:
        raise RecipeError(f"--seeds {seeds}: give 1 or more (seeds seed, seed+1, ... are trained)")
    extra = ([f"seeds={seeds}"] if seeds is not None else []) + ([f"baseline={str(baseline).lower()}"] if baseline is not None else [])
    r = load_recipe(recipe, list(overrides or []) + extra)
    out = out or Path("runs") / r.name
    if r.seeds > 1 or r.baseline:
        return distill_seeds(r, out, **kw)
    return distill(r, out, **kw)


def tune_file(recipe: str | Path, out: Optional[str | Path] = None, overrides: Optional[list[str]] = None, *,
              trials: Optional[int] = None, seeds: Optional[int] = None, baseline: Optional[bool] = None,
              storage: Optional[str] = None, overwrite: bool = False) -> dict:
    """`protege tune`: load the recipe (with ``--set`` overrides) and tune it into ``out`` (default runs/<name>-tune)."""
    r = load_recipe(recipe, overrides)
    return tune(r, out or Path("runs") / f"{r.name}-tune", trials=trials, baseline=baseline, final_seeds=seeds, storage=storage,
                overwrite=overwrite)


def option_name(cls, field: str) -> str:
    """The `protege compress` option of a PruneConfig / QuantizeConfig field: --field-name, or the config's own name
    for it (``cls.CLI``); for an on/off pair, its first half."""
    return cls.CLI.get(field, "--" + field.replace("_", "-")).split("/")[0]


def _config(cls, source: str, fields: dict):
    """A typed config from CLI options; a bad value is blamed on its option (--prune, --quantize, ...)."""
    from pydantic import (
        ValidationError,  # (pydantic is loaded already: only the name is imported here)
    )

    try:
        return cls(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else None
        text = _describe(err, cls)
        if name in cls.model_fields:
            option = option_name(cls, name)
            text = text.replace(f"field '{name}'", option).replace(f"{name}: ", f"{option}: ", 1)
        raise RecipeError(f"{source}: {text}") from None


def compress_cli(run: str | Path, *, prune: dict, quantize: dict, budget: Optional[dict] = None) -> Run | dict:
    """`protege compress`: the options given (field -> value, for PruneConfig, QuantizeConfig and BudgetConfig) become
    typed configs (errors name the option) and run ``compress``, or with a budget ``compress_to_budget``."""
    if budget:
        b = _config(BudgetConfig, "budget options", budget)
        if prune and "ratio" not in prune and "target_params" not in prune:  # the candidates' own settings, checked now
            _config(PruneConfig, "pruning options", {**prune, "ratio": 0.5})
        if quantize and "mode" not in quantize:
            _config(QuantizeConfig, "quantization options", {**quantize, "mode": "int8"})
        return compress_to_budget(run, b, prune=prune, quantize=quantize)
    if prune and "ratio" not in prune and "target_params" not in prune:
        raise RecipeError(f"{', '.join(option_name(PruneConfig, f) for f in prune)}: pruning options need --prune RATIO or "
                          f"--target-params N")
    if quantize and "mode" not in quantize:
        raise RecipeError(f"{', '.join(option_name(QuantizeConfig, f) for f in quantize)}: quantization options need "
                          f"--quantize MODE")
    p = _config(PruneConfig, "pruning options", prune) if prune else None
    q = _config(QuantizeConfig, "quantization options", quantize) if quantize else None
    return compress(run, prune=p, quantize=q)


def inspect(model: str, input_shape: Optional[str | list[int]] = None, *, classes: int = 10, which: str = "student") -> str:
    """The module table of a zoo model, ``file.py:factory`` or a run's student/teacher (see knowledge/inspect.py)."""
    shape = None
    if isinstance(input_shape, str):
        try:
            shape = [int(v) for v in input_shape.replace("x", ",").split(",")]
        except ValueError:
            raise RecipeError(f"--input-shape {input_shape!r} must be positive integers separated by commas (or x), "
                              f"e.g. 1,28,28 or 1x28x28") from None
        if not shape or min(shape) < 1:
            raise RecipeError(f"--input-shape {input_shape!r} must be positive integers separated by commas, e.g. 1,28,28")
    elif input_shape is not None:
        shape = list(input_shape)
    m, in_shape = load_for_inspect(model, shape, classes, which)
    return format_rows(inspect_model(m, in_shape))


def convert_gguf(gguf: str | Path, out: str | Path) -> Path:
    """A .gguf causal LM -> a safetensors model folder (see models/lm.py)."""

    return convert(gguf, out)


def generate_corpus(teacher: str | Path, prompts: str | Path, out: str | Path, **kw) -> Path:
    """Sequence-level KD: the teacher continues prompts cut from a corpus; writes a .jsonl corpus (knowledge/sequences.py)."""

    return generate(teacher, prompts, out, **kw)


__all__ = ["compress", "convert_gguf", "generate_corpus", "distill", "distill_file", "evaluate", "export_onnx", "inspect", "prune_", "quantize_onnx"]


def load_for_inspect(ref: str, in_shape: Optional[Sequence[int]], classes: int, which: str = "student",
                     allow_pickle: bool = False) -> tuple[nn.Module, tuple[int, ...]]:
    """A model from a zoo name, ``file.py:factory``, a Hugging Face folder or a run folder (its student or teacher),
    and the shape of one input example."""
    path = Path(ref)
    if path.is_dir() and not (path / "recipe.yaml").is_file() and (path / "config.json").is_file():  # a Hugging Face folder
        in_shape = tuple(in_shape or (16,))
        return build_model(ModelSpec(model=ref, allow_pickle=allow_pickle), in_shape, classes), in_shape
    if path.is_dir():
        run = Run.load(path)
        if which == "teacher" and not run.recipe.ema_teacher and run.recipe.teacher.model.endswith(".onnx"):
            raise ModelError("the run's teacher is an ONNX file: no module paths to hook; its output is the path 'logits'")
        shapes = run.shapes()
        model = run.load_student(shapes) if which == "student" else run.load_models(shapes)[0][0]
        return model, tuple(shapes.input_shape)
    if in_shape is None:
        raise ModelError(f"give the shape of one input example for '{ref}' with --input-shape, e.g. 1,28,28 (images) or 64 (tables)")
    if ref.endswith(".onnx"):
        raise ModelError("an ONNX file has no module paths to hook; its output is available as the path 'logits'")
    return build_model(ModelSpec(model=ref, allow_pickle=allow_pickle), in_shape, classes), tuple(in_shape)
