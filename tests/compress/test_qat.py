"""Quantization-aware training (protege.compress.qat) exported to an int8 ONNX file that runs in int8 kernels."""
from __future__ import annotations

import onnx
import torch

from protege.compress import verify as V
from protege.compress.emulate import available, run_emulated
from protege.export.onnx import export_model_onnx, ort_logits, ort_session


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _optimized_ops(path, tmp_path) -> set[str]:
    """The ops ONNX Runtime actually runs after its graph fusions (int8 kernels show up here)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return _ops(tmp_path / "optimized.onnx")


def _exact_on_avx2(path, fp32, x) -> None:
    """On an emulated AVX2 CPU without VNNI (where full-range int8 weights saturate) the file computes what its QDQ graph
    defines; with qemu missing it is checked on this CPU only, unless PROTEGE_REQUIRE_QEMU asks for the emulator."""
    import os

    ref = ort_logits(ort_session(V.reference_model(path), optimize=False), x).numpy()
    base = ort_logits(ort_session(fp32), x).numpy()
    if available() is None or os.environ.get("PROTEGE_REQUIRE_QEMU"):
        got = run_emulated({"f": path}, x.numpy())["f"]
    else:
        got = ort_logits(ort_session(path), x).numpy()
    V.judge(path, V.compare(got, ref, base))


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
