"""The Python API the CLI calls (re-exported at the package top level)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from torch import nn

from .compress import prune_, quantize_onnx
from .errors import ModelError, RecipeError
from .knowledge.inspect import format_rows, inspect_model
from .models import build_model
from .stages import compress, distill, evaluate, export_onnx
from .recipe import ModelSpec, PruneConfig, QuantizeConfig, load_recipe
from .recipe.files import _describe
from .run import Run


def distill_file(recipe: str | Path, out: Optional[str | Path] = None, overrides: Optional[list[str]] = None, **kw) -> Run:
    """Load a recipe file (with ``--set`` overrides) and run it into ``out`` (default runs/<name>)."""
    r = load_recipe(recipe, overrides)
    return distill(r, out or Path("runs") / r.name, **kw)


OPTIONS = {"ratio": "--prune", "target_params": "--target-params", "scope": "--scope", "keep": "--keep", "steps": "--steps",
           "finetune_epochs": "--finetune-epochs", "mode": "--quantize", "target": "--target", "calibration": "--calibration",
           "calibration_data": "--calibration-data"}


def _config(cls, source: str, **fields):
    """A typed config from CLI options; a bad value is blamed on its option (--prune, --quantize, ...)."""
    from pydantic import ValidationError

    try:
        return cls(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        option = OPTIONS.get(str(err["loc"][0])) if err["loc"] else None
        text = _describe(err, cls)
        if option:
            text = text.replace(f"field '{err['loc'][0]}'", option).replace(f"{err['loc'][0]}: ", f"{option}: ", 1)
        raise RecipeError(f"{source}: {text}") from None


def compress_cli(run: str | Path, *, prune: Optional[float], structured: bool, target_params: Optional[int], scope: str,
                 keep: list[str], steps: int, finetune_epochs: int, quantize: Optional[str], calibration: str,
                 calibration_data: Optional[Path], allow_fallback: bool, target: str = "portable") -> Run:
    """`protege compress`: turn the options into typed configs (errors name the option) and run ``compress``."""
    p = q = None
    if prune is None and target_params is None and (keep or steps != 1 or finetune_epochs or scope != "layer" or not structured):
        raise RecipeError("--keep, --steps, --finetune-epochs, --scope and --unstructured need --prune RATIO or --target-params N")
    if quantize is None and (calibration_data or allow_fallback or calibration != "minmax" or target != "portable"):
        raise RecipeError("--target, --calibration, --calibration-data and --allow-fallback need --quantize MODE")
    if prune is not None or target_params is not None:
        p = _config(PruneConfig, "pruning options", method="structured" if structured else "unstructured", ratio=prune,
                    target_params=target_params, scope=scope, keep=list(keep), steps=steps, finetune_epochs=finetune_epochs)
    if quantize is not None:
        q = _config(QuantizeConfig, "quantization options", mode=quantize, target=target, calibration=calibration, allow_fallback=allow_fallback,
                    calibration_data=str(calibration_data) if calibration_data else None)
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
    from .models.lm import convert_gguf as convert

    return convert(gguf, out)


def generate_corpus(teacher: str | Path, prompts: str | Path, out: str | Path, **kw) -> Path:
    """Sequence-level KD: the teacher continues prompts cut from a corpus; writes a .jsonl corpus (knowledge/sequences.py)."""
    from .knowledge.sequences import generate_corpus as generate

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
