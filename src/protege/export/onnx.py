"""ONNX export with a dynamic batch dimension, and a parity check against PyTorch in ONNX Runtime."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError


def ort_session(model: str | Path | bytes, threads: int = 0, optimize: bool = True):
    """A CPU session on a file (or serialized model); ``optimize=False`` runs the graph as written (no fusions,
    so no int8 kernels for QDQ graphs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"])


def ort_logits(session, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(outs))


def export_model_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int = 18) -> Path:
    """Export ``model`` (eval mode) to ``path`` with a dynamic batch dimension; atomic write."""
    model = model.eval()
    tmp = path.with_suffix(".tmp.onnx")
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = torch.cat([example[:1], example[:1]])  # batch 2: a size-1 example would be specialised
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for name in ("torch.onnx", "onnxscript"):  # e.g. harmless constant-folding failures in onnxscript's optimizer
                logging.getLogger(name).setLevel(logging.ERROR)
            prog = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                     input_names=["input"], output_names=["logits"],
                                     dynamic_shapes={"x": {0: batch}} if _first_arg(model) == "x" else ({0: batch},),
                                     verbose=False)
            prog.save(str(tmp))
        _strip_debug_info(tmp)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    os.replace(tmp, path)
    return path


def _strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source stack traces with local paths, FX node text):
    a third of a small model's file, and nothing a runtime reads."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def _first_arg(model: nn.Module) -> str:
    import inspect

    return next(iter(inspect.signature(model.forward).parameters), "x")


@torch.no_grad()
def onnx_parity(model: nn.Module, path: Path, x: torch.Tensor, tolerance: float) -> float:
    """Max |PyTorch - ONNX Runtime| over ``x``; raises ExportError above ``tolerance``."""
    model = model.eval()
    expected = torch.cat([model(x[i:i + 256]) for i in range(0, len(x), 256)])
    got = ort_logits(ort_session(path), x)
    diff = float((expected - got).abs().max())
    if not np.isfinite(diff) or diff > tolerance:
        raise ExportError(f"ONNX output differs from PyTorch by {diff:.3g} (> tolerance {tolerance:g}) on {len(x)} held-out inputs; "
                          f"the file was not deployed; raise export.tolerance only if this difference is expected")
    return diff
