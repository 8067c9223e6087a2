"""int8 files (protege.compress.quantize): static QDQ and dynamic quantization, ops that cannot be quantized,
calibration checks, and the measured choice between candidates."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from protege import QuantizeConfig
from protege.compress.quantize import (check_calibration, choose, gemm_to_matmul, quantize_dynamic, quantize_static,
                                       unquantized_ops)
from protege.errors import CompressError
from protege.export.onnx import export_model_onnx, ort_session
from protege.models.zoo import CNN, MLP

from ..int8_checks import ops as _ops


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    cnn, mlp = CNN((1, 8, 8), 10, (32, 64)).eval(), MLP((64,), 10, (64,)).eval()
    return {"cnn": (cnn, export_model_onnx(cnn, torch.randn(2, 1, 8, 8), d / "cnn.onnx"), torch.randn(64, 1, 8, 8)),
            "mlp": (mlp, export_model_onnx(mlp, torch.randn(2, 64), d / "mlp.onnx"), torch.randn(64, 64)), "dir": d}


def _agree(model, path, x) -> float:
    got = ort_session(path).run(None, {"input": x.numpy()})[0]
    return float((torch.from_numpy(got).argmax(1) == model(x).argmax(1)).float().mean())


def test_static_int8_is_qdq_smaller_and_faithful(onnx_files):
    model, fp32, x = onnx_files["cnn"]
    out = quantize_static(fp32, onnx_files["dir"] / "cnn.static.onnx", x.numpy(), QuantizeConfig())
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    assert unquantized_ops(fp32) and not unquantized_ops(out)
    assert out.stat().st_size < 0.4 * fp32.stat().st_size  # int8 weights: about a quarter, plus scales and graph
    assert _agree(model, out, x) >= 0.9


def test_dynamic_int8_covers_linear_layers_via_matmul(onnx_files):
    model, fp32, x = onnx_files["mlp"]
    assert "Gemm" in _ops(fp32)
    mm = gemm_to_matmul(fp32, onnx_files["dir"] / "mm.onnx")
    np.testing.assert_allclose(ort_session(mm).run(None, {"input": x.numpy()})[0], model(x).detach().numpy(), atol=1e-5)
    out = quantize_dynamic(fp32, onnx_files["dir"] / "mlp.dyn.onnx", QuantizeConfig())
    assert "MatMulInteger" in _ops(out) and "Gemm" not in _ops(out)
    assert _agree(model, out, x) >= 0.9


def test_unquantizable_op_is_named_unless_fallback_is_allowed(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 2, stride=2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10)).eval()
    fp32 = export_model_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "ct.onnx")
    with pytest.raises(CompressError, match="cannot quantize ConvTranspose"):
        quantize_dynamic(fp32, tmp_path / "ct.int8.onnx", QuantizeConfig())
    assert not (tmp_path / "ct.int8.onnx").exists()
    quantize_dynamic(fp32, tmp_path / "ct.int8.onnx", QuantizeConfig(allow_fallback=True))
    assert "ConvInteger" in _ops(tmp_path / "ct.int8.onnx")


def test_calibration_checks(onnx_files):
    _, fp32, _ = onnx_files["cnn"]
    with pytest.raises(CompressError, match="empty"):
        check_calibration(np.zeros((0, 1, 8, 8), np.float32), fp32, "x")
    with pytest.raises(CompressError, match=r"shape \(1, 28, 28\), the model expects \(1, 8, 8\)"):
        check_calibration(np.zeros((4, 1, 28, 28), np.float32), fp32, "x")


def _cand(acc: float, b1: float, b32: float) -> dict:
    return {"val_accuracy": acc, "latency_ms_b1": b1, "latency_ms_b32": b32}


def test_choice_is_the_fastest_within_tolerance():
    c = {"fp32": _cand(0.90, 1.0, 10.0), "static": _cand(0.898, 1.3, 4.0), "dynamic": _cand(0.88, 0.5, 3.0)}
    assert choose(c, QuantizeConfig(latency_batch=1))[0] == "fp32"  # dynamic is faster but 2 points worse
    name, reason = choose(c, QuantizeConfig(latency_batch=32))
    assert name == "static" and "rejected for accuracy: dynamic" in reason
    assert choose(c, QuantizeConfig(mode="int8", latency_batch=1))[0] == "static"  # int8 never keeps fp32
    assert choose(c, QuantizeConfig(latency_batch=1, tolerance=0.05))[0] == "dynamic"


def test_choice_says_when_the_deciding_latency_is_unreliable():
    c = {"fp32": _cand(0.90, 1.0, 10.0), "static": {**_cand(0.90, 0.5, 4.0), "latency_b1_reliable": False}}
    name, reason = choose(c, QuantizeConfig(latency_batch=1))
    assert name == "static" and "static was flagged unreliable" in reason
    assert "unreliable" not in choose(c, QuantizeConfig(latency_batch=32))[1]
