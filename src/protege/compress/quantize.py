"""int8 in ONNX Runtime: static QDQ with calibration, dynamic, and a measured choice between them.

Static quantization stores int8 weights and calibrated activation scales (QuantizeLinear /
DequantizeLinear pairs that ONNX Runtime fuses into int8 kernels); dynamic quantization stores int8
weights and computes activation scales at run time. Which one is faster depends on the model and the
CPU (VNNI or not), so ``choose`` measures instead of assuming.

``target: portable`` (the default) stores weights in 7 bits (|w| <= 64, ONNX Runtime's ``reduce_range``), so the
file computes the same on CPUs whose int8 kernels saturate (x86 without VNNI; see verify.py); ``this_cpu`` uses
the full int8 range, exact on VNNI and ARM CPUs only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
from pydantic import Field

from ..config import PathStr, _Strict
from ..errors import CompressError
from ..logs import quiet

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention", "Einsum")
INT8_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
            "DynamicQuantizeLSTM", "QAttention", "QGemm")


class QuantizeConfig(_Strict):
    """int8 in ONNX Runtime: static (QDQ, calibrated), dynamic, quantization-aware training, or auto (measured). Each
    field is also an option of `protege compress` (``CLI``: the option names that differ from --field-name)."""

    CLI: ClassVar[dict[str, str]] = {"mode": "--quantize"}

    mode: Literal["auto", "int8", "static", "dynamic", "qat"] = Field(
        "auto", description="auto | int8 | static | dynamic | qat (int8: the faster of static/dynamic; auto: fp32 too)")
    target: Literal["portable", "this_cpu"] = Field(
        "portable", description="portable (7-bit weights, exact on every CPU) | this_cpu (full range)")
    calibration: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="static calibration: minmax | entropy | percentile")
    calibration_size: int = Field(512, ge=1, description="training examples used to calibrate static int8")
    calibration_data: Optional[PathStr] = Field(None, description=".npy array of inputs to calibrate on instead")
    per_channel: bool = Field(True, description="per-channel weight scales")
    tolerance: float = Field(0.005, ge=0, le=1, description="auto: largest validation-accuracy drop accepted (0.005 = 0.5 point)")
    latency_batch: Literal[1, 32] = Field(1, description="auto: the batch size whose latency decides (1 or 32)")
    allow_fallback: bool = Field(False, description="leave ops ONNX Runtime cannot quantize in float instead of failing")
    qat_epochs: int = Field(3, ge=1, le=100_000, description="qat: fine-tuning epochs with fake quantization")
    qat_lr: Optional[float] = Field(None, gt=0, le=100, description="qat: learning rate (default: train.lr / 10)")


def input_shape(path: Path) -> tuple[str, tuple]:
    """The first graph input's name and its shape without the batch dimension (None where symbolic)."""
    import onnx

    inp = onnx.load(str(path), load_external_data=False).graph.input[0]
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim)
    return inp.name, dims[1:]


def check_calibration(calib: np.ndarray, model: Path | tuple, source: str) -> np.ndarray:
    """Refuse an empty calibration set or one whose example shape does not match the model's input
    (``model``: an ONNX file, or the input shape without the batch dimension)."""
    shape = tuple(model) if isinstance(model, tuple) else input_shape(model)[1]
    if calib.ndim == 0 or len(calib) == 0:
        raise CompressError(f"calibration set {source} is empty; give at least one example (quantize.calibration_size >= 1 "
                            f"or a non-empty quantize.calibration_data .npy)")
    got = tuple(calib.shape[1:])
    if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
        want = tuple("N" if s is None else s for s in shape)
        raise CompressError(f"calibration set {source} has examples of shape {got}, the model expects {want}; "
                            f"save inputs as an array of shape (N, {', '.join(map(str, want))})")
    if not np.issubdtype(calib.dtype, np.number) or not np.isfinite(calib).all():
        raise CompressError(f"calibration set {source} holds values that are not finite numbers; save real model inputs")
    if float(calib.max()) == float(calib.min()):
        raise CompressError(f"calibration set {source}: every value is {float(calib.min()):g}, so int8 scales cannot be set "
                            f"(zero range); calibrate on real inputs (quantize.calibration_data: a .npy of varied examples)")
    return np.ascontiguousarray(calib, dtype=np.float32)


def load_calibration(path: str | Path) -> np.ndarray:
    """A .npy array of model inputs (never unpickled)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".npy":
        raise CompressError(f"quantize.calibration_data '{path}' is not a .npy file; save inputs with numpy.save(path, array)")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise CompressError(f"quantize.calibration_data '{path}' cannot be read as a numeric array ({e}); re-save it with numpy.save") from None


class _Reader:
    """ONNX Runtime calibration reader over an in-memory array, in batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 64):
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self.i >= len(self.x):
            return None
        out = {self.name: self.x[self.i:self.i + self.batch]}
        self.i += self.batch
        return out

    def rewind(self) -> None:
        self.i = 0


def _preprocess(src: Path, dst: Path) -> Path:
    """Shape inference and graph optimisation (constant folding, fusions) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet(stdout=True, root=True):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    except Exception:  # symbolic shape inference fails on some graphs; the ONNX shape pass alone is enough
        with quiet(stdout=True, root=True):
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def gemm_to_matmul(path: Path, out: Path) -> Path:
    """Rewrite Gemm (y = x W^T + b, from nn.Linear) as MatMul + Add so dynamic int8 covers Linear layers."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        simple = node.op_type == "Gemm" and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 \
            and not attrs.get("transA", 0) and len(node.input) >= 2 and node.input[1] in inits
        if not simple:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if attrs.get("transB", 0):
            w = w.T
        wname = node.input[1] + "_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), wname))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], wname], [mm_out], name=node.name + "_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    onnx.save(model, str(out))
    return out


def unquantized_ops(path: Path) -> list[str]:
    """Compute-heavy nodes whose weights stayed in float: the second input is a constant (an initializer or a
    Constant node) rather than int8 weights behind a DequantizeLinear. A product of two activations (attention's
    Q K^T and P V) has no weights to store in int8; dynamic quantization leaves it in float, as it should."""
    import onnx

    graph = onnx.load(str(path)).graph
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [f"{n.op_type} '{n.name}'" for n in graph.node
            if n.op_type in COMPUTE_OPS and len(n.input) > 1 and n.input[1] in consts]


def _finish(tmp: Path, out: Path, cfg: QuantizeConfig, mode: str) -> Path:
    left = unquantized_ops(tmp)
    if left and not cfg.allow_fallback:
        tmp.unlink(missing_ok=True)
        raise CompressError(f"{mode} int8: ONNX Runtime cannot quantize {', '.join(left[:3])}{' ...' if len(left) > 3 else ''}; "
                            f"choose another quantize.mode, or set quantize.allow_fallback: true to keep those ops in float")
    os.replace(tmp, out)
    return out


def quantize_static(fp32: Path, out: Path, calib: np.ndarray, cfg: QuantizeConfig) -> Path:
    """Post-training static int8, QDQ format, weights per channel (if asked), calibrated on ``calib``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    name, _ = input_shape(fp32)
    with tempfile.TemporaryDirectory() as td:
        pre = _preprocess(fp32, Path(td) / "pre.onnx")
        tmp = out.with_suffix(".tmp.onnx")
        try:
            with quiet(stdout=True, root=True):
                ort_static(str(pre), str(tmp), _Reader(name, calib), quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                           activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                           reduce_range=cfg.target == "portable")
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise CompressError(f"static int8 failed in ONNX Runtime ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                                f"try quantize.mode: dynamic") from None
    return _finish(tmp, out, cfg, "static")


def quantize_dynamic(fp32: Path, out: Path, cfg: QuantizeConfig) -> Path:
    """Dynamic int8: int8 weights, activation scales computed per batch at run time."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    with tempfile.TemporaryDirectory() as td:
        pre = gemm_to_matmul(_preprocess(fp32, Path(td) / "pre.onnx"), Path(td) / "mm.onnx")
        tmp = out.with_suffix(".tmp.onnx")
        try:
            with quiet(stdout=True, root=True):
                ort_dynamic(str(pre), str(tmp), per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                            reduce_range=cfg.target == "portable")
        except Exception as e:
            tmp.unlink(missing_ok=True)
            raise CompressError(f"dynamic int8 failed in ONNX Runtime ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                                f"try quantize.mode: static") from None
    return _finish(tmp, out, cfg, "dynamic")


def choose(candidates: dict[str, dict], cfg: QuantizeConfig) -> tuple[str, str]:
    """The fastest candidate (p50 at ``cfg.latency_batch``) whose validation accuracy is within tolerance of fp32.

    ``mode: int8`` never keeps fp32; if no int8 file is within tolerance it keeps the most accurate one and says so.
    """
    key = f"latency_ms_b{cfg.latency_batch}"
    base = candidates["fp32"]
    pool = {k: c for k, c in candidates.items() if cfg.mode == "auto" or k != "fp32"}
    if not pool:
        raise CompressError("no int8 file could be made; see the messages above, or use quantize.mode: auto")
    ok = {k: c for k, c in pool.items() if c["val_accuracy"] >= base["val_accuracy"] - cfg.tolerance}
    if not ok:
        best = max(pool, key=lambda k: pool[k]["val_accuracy"])
        return best, (f"no int8 file stayed within {100 * cfg.tolerance:.2g} point(s) of fp32 validation accuracy "
                      f"({base['val_accuracy']:.4f}); kept the most accurate ({pool[best]['val_accuracy']:.4f})")
    best = min(ok, key=lambda k: ok[k][key])
    dropped = sorted(set(pool) - set(ok))
    reason = (f"fastest at batch {cfg.latency_batch} ({ok[best][key]:.3f} ms p50; fp32 {base[key]:.3f} ms) among "
              f"{', '.join(sorted(ok))}, within {100 * cfg.tolerance:.2g} point(s) of fp32 validation accuracy")
    if dropped:
        reason += f"; rejected for accuracy: {', '.join(dropped)}"
    shaky = sorted(k for k, c in ok.items() if not c.get(f"latency_b{cfg.latency_batch}_reliable", True))
    if shaky:
        reason += (f"; the latency of {', '.join(shaky)} was flagged unreliable (busy machine or large spread), so on a quiet "
                   f"machine the choice may differ")
    return best, reason


def quantize_onnx(src: str | Path, dst: str | Path, cfg: QuantizeConfig, calibration: Optional[np.ndarray] = None) -> Path:
    """Python API: int8-quantize the ONNX file ``src`` into ``dst`` (static needs ``calibration`` inputs)."""
    src, dst = Path(src), Path(dst)
    if cfg.mode == "dynamic":
        return quantize_dynamic(src, dst, cfg)
    if cfg.mode != "static":
        raise CompressError(f"quantize_onnx does static or dynamic, not '{cfg.mode}'; auto, int8 and qat run in `protege compress`")
    if calibration is None:
        raise CompressError("static int8 needs calibration inputs; pass calibration=array of shape (N, *input shape)")
    return quantize_static(src, dst, check_calibration(np.asarray(calibration), src, "(calibration argument)"), cfg)
