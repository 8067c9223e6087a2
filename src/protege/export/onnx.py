"""ONNX export with a dynamic batch dimension, and a parity check against PyTorch in ONNX Runtime."""
from __future__ import annotations

import errno
import re
import os
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ..config import _Strict
from ..errors import ExportError, ModelError, StorageError
from ..files import write_error, write_fix
from ..logs import quiet
from ..models.loading import remake_hint, run_folder


class ExportConfig(_Strict):
    format: Literal["onnx"] = "onnx"
    tolerance: float = Field(1e-4, gt=0)
    opset: int = Field(18, ge=13)


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
    if isinstance(model, bytes):
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"ONNX file {path} not found; {_remake(path)}")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ONNX Runtime's own exception types (InvalidProtobuf, Fail, InvalidGraph, ...)
        why = (str(e).splitlines() or [""])[0].split(" failed:")[-1].strip()[:160] or type(e).__name__
        if path.stat().st_size == 0:  # ONNX Runtime reads an empty file as a model with "no graph"
            raise StorageError(f"{path} is empty (0 bytes): it was cut off while being written; {_remake(path)}") from None
        if type(e).__name__ == "InvalidProtobuf" or "Protobuf parsing failed" in str(e):
            raise StorageError(f"{path} is not a readable ONNX file ({why}): it is truncated or damaged; {_remake(path)}") from None
        raise ModelError(f"ONNX Runtime cannot load {path} ({type(e).__name__}: {why}); {_remake(path)}") from None


def _remake(path: Path) -> str:
    """How to make an ONNX file again: the command for a run's own file, else re-export it."""

    run = run_folder(path)
    return remake_hint(path, run) if run is not None else "export the model to ONNX again"


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
        with quiet(stdout=True):  # e.g. harmless constant-folding failures in onnxscript's optimizer
            prog = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                     input_names=["input"], output_names=["logits"],
                                     dynamic_shapes={"x": {0: batch}} if _first_arg(model) == "x" else ({0: batch},),
                                     verbose=False)
            prog.save(str(tmp))
        _strip_debug_info(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        interrupt = _in_chain(e, KeyboardInterrupt)
        if interrupt is e:
            raise
        if interrupt is not None:  # Ctrl-C that the exporter wrapped in its own error: propagate the interrupt itself
            raise interrupt from None
        if not isinstance(e, Exception):  # SystemExit and the like: not an export failure
            raise
        err = _in_chain(e, OSError)
        if err is not None and err.errno in WRITE_ERRNOS:

            raise StorageError(f"cannot write the ONNX file {path} ({write_error(err)}); {write_fix(err, path)}, then run "
                               f"the command again (with --resume for `protege distill`)") from None
        root = _root_cause(e)
        raise ExportError(f"ONNX export failed: {type(root).__name__}: {_first_line(root)}; change what it names in the "
                          f"model (or deploy the PyTorch weights instead of ONNX)") from None
    return path


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception under ``e`` (the exporter wraps the real reason in two or three layers of its own)."""
    seen: set[int] = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return e


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, without terminal colour codes, at most ``limit`` characters."""
    text = _ANSI.sub("", str(e)).strip()
    return (text.splitlines() or [""])[0][:limit]


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def _in_chain(e: BaseException, kind: type) -> Optional[BaseException]:
    """The first exception of type ``kind`` among ``e`` and its causes / contexts (exporters wrap what they catch)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


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
