"""A model as a recipe names it: zoo name, ``file.py:factory``, a Hugging Face folder or an ``.onnx`` file."""
from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from ..config import MAX_DEPTH, PathStr, _show, _Strict, _value


class Normalize(_Strict):
    """(x - mean) / std applied to a model's input inside the model, per channel (one value: every channel)."""

    mean: list[float] = Field(min_length=1, max_length=64)
    std: list[float] = Field(min_length=1, max_length=64)

    @field_validator("std")
    @classmethod
    def _positive(cls, std: list[float]) -> list[float]:
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"std {std} must be positive numbers")
        return std


class ModelSpec(_Strict):
    """A model: zoo name, ``file.py:factory``, or an ``.onnx`` file; optional weights."""

    model: PathStr
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: Optional[PathStr] = None  # .safetensors (or a pickle file with allow_pickle)
    allow_pickle: bool = False
    output: Optional[str] = None  # an .onnx model: the output to read, by name (default: its first floating-point output)
    normalize: Union[Normalize, Literal["none"], None] = None  # the model's own input normalisation (default: a Hugging
    # Face image folder's preprocessor_config.json, else none): {mean: [...], std: [...]}, or none to switch it off

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
