"""The Python API the CLI calls (re-exported at the package top level)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .pipeline import distill, evaluate, export_onnx
from .recipe import load_recipe
from .run import Run


def distill_file(recipe: str | Path, out: Optional[str | Path] = None, overrides: Optional[list[str]] = None, **kw) -> Run:
    """Load a recipe file (with ``--set`` overrides) and run it into ``out`` (default runs/<name>)."""
    r = load_recipe(recipe, overrides)
    return distill(r, out or Path("runs") / r.name, **kw)


__all__ = ["distill", "distill_file", "evaluate", "export_onnx"]
