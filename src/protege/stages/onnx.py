"""The one export step of every task: write a candidate ONNX file, check it against PyTorch, label it with what its
input and output mean, and only then move it into place (a file that fails the check is kept aside)."""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..data import DataSplits
from ..errors import ExportError
from ..export.metadata import describe, stamp
from ..export.onnx import export_model_onnx, onnx_parity
from ..run import Run

log = logging.getLogger(__name__)


def export_checked(model: nn.Module, run: Run, data: DataSplits, dst: Path, examples: int = 512, unit: str = "test inputs") -> dict:
    """Export ``model`` to ``dst`` through a candidate file checked on the first ``examples`` test examples; returns
    the file's label (what its input and output mean)."""
    candidate = dst.with_suffix(".candidate.onnx")
    export_model_onnx(model, data.test.x[:2], candidate, run.recipe.export.opset)
    try:
        diff = onnx_parity(model, candidate, data.test.x[:examples], run.recipe.export.tolerance)
    except ExportError:
        candidate.replace(dst.with_suffix(".rejected.onnx"))  # kept for inspection; the deployed file untouched
        raise
    card = describe(data, run.recipe.task)
    stamp(candidate, card)  # class names, input shape and preprocessing travel with the file
    candidate.replace(dst)
    size = dst.stat().st_size
    log.info(f"export: {dst} ({f'{size / 1e6:.1f} MB' if size >= 1e6 else f'{size / 1024:.1f} kB'}), "
             f"max |ONNX - PyTorch| = {diff:.2e} on {min(examples, len(data.test))} {unit}")
    return card
