"""Quantization-aware training (protege.compress.qat) exported to an int8 ONNX file that runs in int8 kernels."""
from __future__ import annotations

import onnx
import torch

from protege.compress import verify as V
from protege.export.onnx import export_model_onnx

from ..int8_checks import optimized_ops as _optimized_ops, exact_on_avx2 as _exact_on_avx2


def test_qat_of_a_residual_network_runs_every_conv_in_int8(tmp_path):
    """ResNet blocks add the shortcut to conv2's output: each conv must still become a QLinearConv in ONNX Runtime."""
    from protege.compress.qat import qat_to_onnx
    from protege.data import load_data
    from protege.models.zoo import ResNet
    from protege.recipe import DataConfig
    from protege.train import label_loss

    data = load_data(DataConfig(source="digits", limit=200), 0)
    torch.manual_seed(0)
    model = ResNet((1, 8, 8), 10, 8, width=8)
    info = qat_to_onnx(model, label_loss(), data.train, data.val, tmp_path / "r.onnx", epochs=1, lr=1e-3, batch_size=64, seed=0)
    assert info["val_agreement_torch_int8"] >= 0.98 and V.scheme(tmp_path / "r.onnx", "qat")["portable"]
    fp32 = export_model_onnx(model.eval(), data.val.x[:2], tmp_path / "r.fp32.onnx")
    _exact_on_avx2(tmp_path / "r.onnx", fp32, data.val.x)
    _optimized_ops(tmp_path / "r.onnx", tmp_path)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert ops.count("QLinearConv") == n_convs and "FusedConv" not in ops and "Conv" not in ops
