"""Checks that int8 test files share: the ops of an ONNX file (as written, and as ONNX Runtime runs it after its
fusions), and a file computing exactly what its QDQ graph defines on a CPU without VNNI."""
from __future__ import annotations

import os

import onnx

from protege.compress import verify as V
from protege.compress.emulate import available, run_emulated
from protege.export.onnx import ort_logits, ort_session


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def optimized_ops(path, tmp_path) -> set[str]:
    """The ops ONNX Runtime actually runs after its graph fusions (int8 kernels show up here)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return ops(tmp_path / "optimized.onnx")


def exact_on_avx2(path, fp32, x) -> None:
    """On an emulated AVX2 CPU without VNNI (where full-range int8 weights saturate) the file computes what its QDQ graph
    defines; with qemu missing it is checked on this CPU only, unless PROTEGE_REQUIRE_QEMU asks for the emulator."""
    ref = ort_logits(ort_session(V.reference_model(path), optimize=False), x).numpy()
    base = ort_logits(ort_session(fp32), x).numpy()
    if available() is None or os.environ.get("PROTEGE_REQUIRE_QEMU"):
        got = run_emulated({"f": path}, x.numpy())["f"]
    else:
        got = ort_logits(ort_session(path), x).numpy()
    V.judge(path, V.compare(got, ref, base))
