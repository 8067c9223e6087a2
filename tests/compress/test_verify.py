"""int8 files that are right on every CPU: 7-bit weights by default, and a check against the exact QDQ arithmetic that
does not depend on this machine's CPU. One test runs the files on an emulated AVX2 CPU (QEMU), whatever CPU runs the suite."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from protege.compress import verify as V
from protege.compress.emulate import available, run_emulated
from protege.compress.quantize import quantize_dynamic, quantize_static
from protege.data import load_data
from protege.errors import CompressError
from protege.export.onnx import export_model_onnx, ort_logits, ort_session
from protege.models.zoo import CNN
from protege.recipe import DataConfig, QuantizeConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A CNN trained briefly on digits, exported, then int8 four ways: static / dynamic x portable / this_cpu."""
    d = tmp_path_factory.mktemp("int8")
    data = load_data(DataConfig(source="digits"), 0)
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, (16, 32))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(4):
        for idx in torch.randperm(len(data.train)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.train.x[idx]), data.train.y[idx]).backward()
            opt.step()
    fp32 = export_model_onnx(model.eval(), data.train.x[:2], d / "fp32.onnx")
    calib = data.train.x[:256].numpy()
    out = {"fp32": fp32, "data": data}
    for target in ("portable", "this_cpu"):
        cfg = QuantizeConfig(target=target, allow_fallback=True)
        out[f"static_{target}"] = quantize_static(fp32, d / f"static_{target}.onnx", calib, cfg)
        out[f"dynamic_{target}"] = quantize_dynamic(fp32, d / f"dynamic_{target}.onnx", cfg)
    return out


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_portable_files_hold_7_bit_weights_and_this_cpu_full_range(files, mode):
    portable, full = V.scheme(files[f"{mode}_portable"], mode), V.scheme(files[f"{mode}_this_cpu"], mode)
    assert portable["portable"] and portable["max_abs_weight"] <= V.PORTABLE_MAX and "7-bit" in portable["weights"]
    assert not full["portable"] and full["max_abs_weight"] == 127 and "full range" in full["weights"]
    assert portable["tensors"] == full["tensors"] >= 3  # every conv and the linear head


@pytest.mark.parametrize("name", ["static_portable", "dynamic_portable"])
def test_portable_files_match_the_exact_reference_here(files, name):
    x = files["data"].val.x
    out = V.verify(files[name], x, files["fp32"])
    assert out["independent"] and out["predictions"] == len(x) and out["predictions_changed"] <= max(1, V.MAX_FLIPS * len(x))
    assert out["max_abs_diff"] <= V.MAX_DIFF * out["max_abs_diff_fp32"] and out["max_abs_diff_fp32"] > 0


def test_reference_computes_integer_ops_exactly_where_kernels_may_saturate(tmp_path):
    """MatMulInteger with uint8 255 x int8 127: the exact sum (what the reference must give on every CPU)."""
    k = 64
    b = np.full((k, 4), 127, np.int8)
    b[::3] = -128  # mixed signs, still integers the reference must sum exactly
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, 4])], [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "mmi.onnx")
    a = np.full((2, k), 255, np.uint8)
    a[1, ::2] = 7
    got = ort_session(V.reference_model(tmp_path / "mmi.onnx"), optimize=False).run(None, {"A": a})[0]
    np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


def test_reference_of_a_dynamic_file_has_no_integer_kernels(files):
    ref = onnx.load_from_string(V.reference_model(files["dynamic_portable"]))
    ops = {n.op_type for n in ref.graph.node}
    assert not ops & {"MatMulInteger", "ConvInteger"} and "MatMul" in ops and "Conv" in ops


def test_a_mismatch_is_an_error_that_says_what_to_do(files, monkeypatch):
    """Stand the fp32 file in for the reference: the int8 kernels then differ from it by the full quantization error."""
    monkeypatch.setattr(V, "reference_model", lambda path: files["fp32"].read_bytes())
    with pytest.raises(CompressError, match=r"differ from the exact arithmetic.*quantize\.target: portable"):
        V.verify(files["static_this_cpu"], files["data"].val.x, files["fp32"])


@pytest.mark.skipif(available() is not None and not os.environ.get("PROTEGE_REQUIRE_QEMU"), reason=str(available()))
def test_on_an_emulated_avx2_cpu_full_range_saturates_and_portable_is_exact(files):
    """QEMU's EPYC-Milan (AVX2, no VNNI): the kernels the issue's AMD EPYC ran, on whatever CPU runs this test."""
    x = files["data"].test.x[:300]
    names = ["static_portable", "static_this_cpu", "dynamic_portable", "dynamic_this_cpu"]
    emulated = run_emulated({n: files[n] for n in names}, x.numpy())
    fp32 = ort_logits(ort_session(files["fp32"]), x).numpy()
    for n in names:
        ref = ort_logits(ort_session(V.reference_model(files[n]), optimize=False), x).numpy()
        stats = V.compare(emulated[n], ref, fp32)
        if n.endswith("portable"):
            V.judge(files[n], stats)  # passes: rounding at other points moves outputs a little, less than quantization does
        else:
            assert stats["max_abs_diff"] > 2 * stats["max_abs_diff_fp32"], stats  # saturation: worse than quantization itself
            with pytest.raises(CompressError, match="saturate on; use quantize.target: portable"):
                V.judge(files[n], stats)


def test_int8_only_ops_are_reported_as_not_checked(tmp_path):
    """QLinearMatMul runs in int8 kernels with or without optimisations: no independent reference, and it says so."""
    w = numpy_helper.from_array(np.full((4, 3), 5, np.int8), "W")
    consts = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
              [("s", 0.1, np.float32), ("z", 0, np.uint8), ("ws", 0.1, np.float32), ("wz", 0, np.int8)]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("QLinearMatMul", ["xq", "s", "z", "W", "ws", "wz", "s", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], [w, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "q.onnx")
    out = V.verify(tmp_path / "q.onnx", torch.rand(8, 4))
    assert not out["independent"] and out["unchecked_ops"] == ["QLinearMatMul"] and "not checked" in out["note"]
    assert "not checked" in V.int8_note(V.scheme(tmp_path / "q.onnx", "static"), out)
