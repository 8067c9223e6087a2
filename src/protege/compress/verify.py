"""Is an int8 file right on every CPU? Its weight range, read from the file, and its outputs in ONNX Runtime's
int8 kernels compared with the exact arithmetic its graph defines.

ONNX Runtime multiplies uint8 activations by int8 weights. On x86 CPUs without VNNI its kernels add each pair of
products into a 16-bit integer that saturates (ONNX Runtime's quantization docs, "reduce_range"); CPUs with VNNI,
and ARM, add in 32 bits. Two products of a uint8 (at most 255) and an int8 weight with |w| <= 64 sum to at most
2 * 255 * 64 = 32,640 < 32,767, so a file whose int8 weights stay within 7 bits computes the same on every CPU.

The reference is the same file with every graph optimisation off: QuantizeLinear / DequantizeLinear then run as
written and the compute ops run in float on dequantized values, so no int8 kernel is involved. Integer-only
ops (MatMulInteger, ConvInteger from dynamic quantization) are rewritten into int32 / float arithmetic first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import CompressError
from ..export.onnx import ort_session
from ..machine import cpu, int8_kernels

PORTABLE_MAX = 64  # |int8 weight| bound under which no x86 kernel saturates (see the module docstring)
WEIGHT_INPUTS = {"Conv": (1,), "ConvTranspose": (1,), "MatMul": (1,), "Gemm": (1,), "MatMulInteger": (1,), "ConvInteger": (1,),
                 "QLinearConv": (3,), "QLinearMatMul": (3,), "DynamicQuantizeLSTM": (1, 2), "QAttention": (1,), "QGemm": (3,)}
# Kernels and reference round at different points (exact int32 sums and the CPU's requantization vs float sums of
# dequantized values), which can move an intermediate value by one quantization step: outputs then differ by a part
# of the file's own quantization error (measured: up to 0.3 of it on an emulated AVX2 CPU), and a near-tie prediction
# may flip. Saturation moved outputs by 5 to 16 times that error in the same measurements.
MAX_FLIPS = 0.01  # share of predictions the kernels may change relative to the reference (one is always allowed)
MAX_DIFF = 1.0  # largest output difference allowed, as a share of the file's largest difference from fp32


def _constants(graph) -> dict:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].HasField("t"):
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def int8_weights(path: str | Path) -> list[tuple[str, str, int]]:
    """(name, dtype, largest |stored value|) of each 8-bit weight tensor an int8 kernel multiplies."""
    import onnx

    graph = onnx.load(str(path)).graph
    consts = _constants(graph)
    dq = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    found = {}
    for n in graph.node:
        for i in WEIGHT_INPUTS.get(n.op_type, ()):
            name = dq.get(n.input[i], n.input[i]) if i < len(n.input) else None
            w = consts.get(name)
            if w is not None and w.dtype in (np.int8, np.uint8) and w.ndim >= 2:
                found[name] = (name, str(w.dtype), int(np.abs(w.astype(np.int32)).max()))
    return list(found.values())


def scheme(path: str | Path, mode: str) -> dict:
    """What the int8 file holds (mode, weight type and range, per channel or not) and whether it is portable."""
    weights = int8_weights(path)
    signed = [w for w in weights if w[1] == "int8"]
    widest = max((w[2] for w in signed), default=0)
    if not weights:
        raise CompressError(f"{Path(path).name} holds no 8-bit weights; it is not an int8 file")
    portable = widest <= PORTABLE_MAX
    kind = ("uint8 weights" if not signed else
            f"int8 weights, 7-bit (|w| <= {PORTABLE_MAX})" if portable else f"int8 weights, full range (|w| up to {widest})")
    why = (("exact on every CPU: no pair of uint8 x int8 products exceeds 16 bits" if signed else
            "exact on every CPU: uint8 x uint8 kernels widen to 16 bits before multiplying") if portable else
           "exact on CPUs with VNNI and on ARM; x86 CPUs without VNNI (AVX2 only) can saturate and change outputs")
    return {"mode": mode, "weights": kind, "activations": "uint8", "max_abs_weight": widest, "portable": portable,
            "portable_why": why, "tensors": len(weights)}


def reference_model(path: str | Path) -> bytes:
    """The file with MatMulInteger / ConvInteger rewritten as exact int32 / float arithmetic (no int8 kernels)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    consts = _constants(model.graph)
    nodes = []
    for n in model.graph.node:
        if n.op_type not in ("MatMulInteger", "ConvInteger"):
            nodes.append(n)
            continue
        conv = n.op_type == "ConvInteger"
        to = TensorProto.FLOAT if conv else TensorProto.INT32
        ins = []
        for k, name in enumerate(n.input[:2]):
            cast = f"{n.name or n.output[0]}_ref{k}"
            nodes.append(helper.make_node("Cast", [name], [cast], to=to))
            zp = n.input[k + 2] if len(n.input) > k + 2 else ""
            if zp:
                nodes.append(helper.make_node("Cast", [zp], [cast + "_zp"], to=to))
                w = consts.get(name)
                if conv and k == 1 and np.size(consts.get(zp, 0)) > 1 and w is not None:  # (M,) -> (M, 1, 1, ...)
                    model.graph.initializer.append(helper.make_tensor(cast + "_shape", TensorProto.INT64, [w.ndim], [-1] + [1] * (w.ndim - 1)))
                    nodes.append(helper.make_node("Reshape", [cast + "_zp", cast + "_shape"], [cast + "_zpr"]))
                    nodes.append(helper.make_node("Sub", [cast, cast + "_zpr"], [cast + "_c"]))
                else:
                    nodes.append(helper.make_node("Sub", [cast, cast + "_zp"], [cast + "_c"]))
                cast += "_c"
            ins.append(cast)
        out = f"{n.name or n.output[0]}_ref"
        if conv:  # float sums of integer products; rounded back to the int32 the op defines
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            nodes.append(helper.make_node("Conv", ins, [out + "_f"], **attrs))
            nodes.append(helper.make_node("Round", [out + "_f"], [out + "_r"]))
            nodes.append(helper.make_node("Cast", [out + "_r"], list(n.output), to=TensorProto.INT32))
        else:
            nodes.append(helper.make_node("MatMul", ins, list(n.output)))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


KERNEL_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "QAttention", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
              "MatMulIntegerToFloat")  # int8 kernels even with optimisations off: no independent reference for them


def verify(path: str | Path, x: torch.Tensor, fp32: Optional[str | Path] = None, *, threads: int = 0,
           batch_size: int = 256) -> dict:
    """Run ``path`` on ``x`` in ONNX Runtime's int8 kernels and as the exact reference, then ``judge`` the difference
    (CompressError on a mismatch). Returns what was measured; ``independent`` is False (and nothing is judged) when
    the file holds int8-only ops that the reference would run in the same kernels."""
    import onnx

    model, flags = cpu()
    where = {"cpu": model, "cpu_flags": flags, "int8_kernels": int8_kernels(flags), "examples": len(x),
             "reference": "the same file, graph optimisations off (QDQ in float)"}
    try:
        ref_bytes = reference_model(path)
        left = sorted({n.op_type for n in onnx.load_from_string(ref_bytes).graph.node if n.op_type in KERNEL_OPS})
        if left:
            return {**where, "independent": False, "unchecked_ops": left,
                    "note": f"not checked: {', '.join(left)} run in int8 kernels with or without optimisations, so no "
                            f"CPU-independent reference exists here; portability rests on the weight range alone"}
        kernels, ref = ort_session(path, threads), ort_session(ref_bytes, threads, optimize=False)
        base = ort_session(fp32, threads) if fp32 else None
        name = kernels.get_inputs()[0].name
        stats = None
        for i in range(0, len(x), batch_size):
            xb = {name: x[i:i + batch_size].numpy()}
            part = compare(kernels.run(None, xb)[0], ref.run(None, xb)[0], base.run(None, xb)[0] if base else None)
            stats = part if stats is None else _merge(stats, part)
    except Exception as e:  # ONNX Runtime's own error types do not derive from RuntimeError
        raise CompressError(f"{Path(path).name}: the int8 file could not be checked against its exact arithmetic "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); try another quantize.mode") from None
    out = {**stats, **where, "independent": True}
    judge(Path(path), out)
    return out


def compare(kernels: np.ndarray, reference: np.ndarray, fp32: Optional[np.ndarray] = None) -> dict:
    """How far the int8 kernels' outputs are from the reference's (predictions: argmax over the last axis)."""
    return {"predictions": int(np.prod(kernels.shape[:-1])),
            "predictions_changed": int((kernels.argmax(-1) != reference.argmax(-1)).sum()),
            "max_abs_diff": float(np.abs(kernels - reference).max()),
            "max_abs_diff_fp32": None if fp32 is None else float(np.abs(reference - fp32).max())}


def _merge(a: dict, b: dict) -> dict:
    out = {k: a[k] + b[k] for k in ("predictions", "predictions_changed")}
    out["max_abs_diff"] = max(a["max_abs_diff"], b["max_abs_diff"])
    out["max_abs_diff_fp32"] = None if a["max_abs_diff_fp32"] is None else max(a["max_abs_diff_fp32"], b["max_abs_diff_fp32"])
    return out


def judge(path: Path, stats: dict) -> None:
    """CompressError when the kernels changed more than MAX_FLIPS of the predictions or moved an output by more than
    MAX_DIFF of the file's own quantization error (its largest difference from fp32), saying why and what to do."""
    diff, qerr = stats["max_abs_diff"], stats["max_abs_diff_fp32"]
    too_far = qerr is not None and diff > max(MAX_DIFF * qerr, 1e-6)
    if np.isfinite(diff) and stats["predictions_changed"] <= max(1, MAX_FLIPS * stats["predictions"]) and not too_far:
        return
    portable = scheme(path, "?")["portable"]
    fix = ("its weights use the full int8 range, which this CPU's kernels saturate on; use quantize.target: portable "
           "(7-bit weights, exact on every CPU)" if not portable else
           "the file is portable, so this is not int16 saturation; deploy the fp32 student.onnx or try quantize.mode: dynamic, "
           "and report it with the file")
    where = f" ({stats['cpu']}, {stats['int8_kernels']})" if "cpu" in stats else ""
    raise CompressError(f"{Path(path).name}: ONNX Runtime's int8 kernels on this CPU{where} differ from the exact arithmetic of "
                        f"the file's graph on {stats['predictions_changed']} of {stats['predictions']} validation predictions "
                        f"(largest output difference {diff:.3g}, against {qerr if qerr is not None else float('nan'):.3g} from fp32); {fix}")


def int8_note(scheme_: Optional[dict], check: Optional[dict]) -> str:
    """One line for the report's int8 stage: the scheme, portable or not, and the CPU its kernels were checked on."""
    if not scheme_:
        return ""
    where = (f"; kernels checked against the exact QDQ arithmetic on {check['cpu']} ({' '.join(check['cpu_flags'])})"
             if check and check.get("independent", True) else f"; {check['note']}" if check else "")
    return (f"{scheme_['mode']} int8, {scheme_['weights']}: {'portable' if scheme_['portable'] else 'not portable'}, "
            f"{scheme_['portable_why']}{where}")
