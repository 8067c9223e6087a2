"""Pruning and int8: what changes in the model and in the files, the measured choice, the run-folder stages."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from protege import PruneConfig, QuantizeConfig, Run, compress, distill, parse_recipe, prune_
from protege.compress.prune import make_permanent, plan, zero_share
from protege.compress.quantize import check_calibration, choose, gemm_to_matmul, quantize_dynamic, quantize_static, unquantized_ops
from protege.compress import verify as V
from protege.compress.emulate import available, run_emulated
from protege.errors import CompressError
from protege.export.metadata import read as read_metadata
from protege.export.onnx import export_model_onnx, ort_logits, ort_session
from protege.models.loading import resize_to
from protege.models.zoo import CNN, MLP, ResNet
from protege.models import save_weights

X28 = torch.randn(2, 1, 28, 28)


def _convs(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("build", [lambda: CNN((1, 28, 28), 10, (16, 32, 64), 2), lambda: ResNet((1, 28, 28), 10, 20)])
def test_structured_pruning_removes_channels_for_real(build):
    torch.manual_seed(0)
    model = build().eval()
    before, channels = sum(p.numel() for p in model.parameters()), _convs(model)
    res = prune_(model, PruneConfig(ratio=0.5), X28)
    after = sum(p.numel() for p in model.parameters())
    assert res.params_after == after < 0.4 * before  # conv weights scale with in x out channels
    assert _convs(model) == [c // 2 for c in channels]  # every conv kept exactly half its channels
    assert model.head.out_features == 10  # the output layer is never pruned
    assert model(X28).shape == (2, 10)  # residual additions stay consistent (dependency graph)


def test_pruned_weights_reload_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    model = ResNet((1, 28, 28), 10, 8).eval()
    prune_(model, PruneConfig(ratio=0.4), X28)
    save_weights(model, tmp_path / "p.safetensors")
    fresh = resize_to(ResNet((1, 28, 28), 10, 8).eval(), tmp_path / "p.safetensors")
    assert torch.equal(model(X28), fresh(X28))


def test_depthwise_pruned_model_reloads(tmp_path):
    from protege.compress.prune import conv_groups

    def build():
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                             nn.ReLU(), nn.Conv2d(16, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()

    torch.manual_seed(0)
    model = build()
    prune_(model, PruneConfig(ratio=0.5), X28)
    assert model[3].groups == model[3].out_channels == 8  # the depthwise conv shrank with its input
    save_weights(model, tmp_path / "dw.safetensors")
    fresh = resize_to(build(), tmp_path / "dw.safetensors", conv_groups(model))
    assert torch.equal(model(X28), fresh(X28))


def test_parameter_target_with_small_layers_is_found_without_emptying_them():
    model = CNN((1, 8, 8), 10, (8, 16, 32)).eval()
    res = prune_(model, PruneConfig(target_params=3_000), torch.randn(2, 1, 8, 8))
    assert res.params_after <= 3_000 and min(_convs(model)) >= 1


def test_parameter_target_is_met_from_below():
    model = CNN((1, 28, 28), 10, (32, 64, 128), 2).eval()
    res = prune_(model, PruneConfig(target_params=30_000), X28)
    assert 25_000 < res.params_after <= 30_000


def test_unstructured_global_and_per_layer_sparsity_and_masks_survive_training():
    torch.manual_seed(0)
    for scope in ("layer", "global"):
        model = MLP((64,), 10, (128, 64))
        res = prune_(model, PruneConfig(method="unstructured", ratio=0.6, scope=scope), torch.randn(2, 64))
        body = [m for m in model.body if isinstance(m, nn.Linear)]
        shares = [float((m.weight == 0).float().mean()) for m in body]
        if scope == "layer":
            assert all(abs(s - 0.6) < 0.01 for s in shares)
        assert abs(sum(float((m.weight == 0).sum()) for m in body) / sum(m.weight.numel() for m in body) - 0.6) < 0.01
        assert float((model.head.weight == 0).float().mean()) < 0.05  # the output layer is left alone
        assert "no speedup" in res.note
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        zeros = [(m.weight == 0) for m in body]
        loss = model(torch.randn(16, 64)).pow(2).mean()
        loss.backward()
        opt.step()
        for m, z in zip(body, zeros):
            assert bool((m.weight[z] == 0).all())  # masked weights stay zero while fine-tuning
        make_permanent(model)
        assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())


def test_iterative_plan_composes_to_the_requested_amount():
    cfg = PruneConfig(ratio=0.75, steps=2)
    ratios = plan(CNN((1, 8, 8), 10), torch.randn(2, 1, 8, 8), cfg)
    assert len(ratios) == 2 and ratios[0] == pytest.approx(0.5)
    model = MLP((64,), 10, (200,))
    for r in plan(model, torch.randn(2, 64), PruneConfig(method="unstructured", ratio=0.75, steps=3)):
        prune_(model, PruneConfig(method="unstructured", ratio=0.75, steps=3), torch.randn(2, 64), ratio=r)
    assert float((model.body[1].weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)


def test_prune_errors_name_the_problem():
    with pytest.raises(CompressError, match="every channel of"):
        prune_(CNN((1, 8, 8), 10, (8, 16)), PruneConfig(ratio=0.95), torch.randn(2, 1, 8, 8))
    with pytest.raises(CompressError, match="no module 'features.9'.*nearest paths"):
        prune_(CNN((1, 8, 8), 10, (8, 16)), PruneConfig(ratio=0.5, keep=["features.9"]), torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="exactly one of"):
        PruneConfig(ratio=0.5, target_params=100)
    with pytest.raises(ValueError):
        PruneConfig(ratio=1.0)


def test_kept_layer_is_not_pruned():
    model = CNN((1, 8, 8), 10, (8, 16))
    prune_(model, PruneConfig(ratio=0.5, keep=["features.0.0"]), torch.randn(2, 1, 8, 8))
    assert _convs(model) == [8, 8]


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    torch.manual_seed(0)
    cnn, mlp = CNN((1, 8, 8), 10, (32, 64)).eval(), MLP((64,), 10, (64,)).eval()
    return {"cnn": (cnn, export_model_onnx(cnn, torch.randn(2, 1, 8, 8), d / "cnn.onnx"), torch.randn(64, 1, 8, 8)),
            "mlp": (mlp, export_model_onnx(mlp, torch.randn(2, 64), d / "mlp.onnx"), torch.randn(64, 64)), "dir": d}


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


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


SMALL = {
    "name": "small", "seed": 0, "data": {"source": "digits"},
    "teacher": {"model": "cnn", "kwargs": {"channels": [16, 32]}, "train": {"epochs": 2, "batch_size": 64}},
    "student": {"model": "cnn", "kwargs": {"channels": [8, 16]}},
    "distill": {"temperature": 2.0, "alpha": 0.5},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.01},
    "eval": {"warmup": 1, "repeats_b1": 3, "repeats_b32": 2},
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "c"
    recipe = parse_recipe({**SMALL, "prune": {"ratio": 0.5, "finetune_epochs": 1}, "quantize": {"mode": "static"}})
    return distill(recipe, out)


def _val_x(run: Run) -> torch.Tensor:
    from protege.data import load_data

    return load_data(run.recipe.data, run.recipe.seed).val.x


def test_deployed_files_describe_themselves(compressed):
    meta = read_metadata(compressed.int8_path)
    assert meta["classes"] == [str(i) for i in range(10)] and meta["input"]["shape"] == ["batch", 1, 8, 8]
    assert meta["input"]["dtype"] == "float32" and meta["input"]["preprocessing"]["steps"] == ["x / 16", "(x - 0.3) / 0.4"]
    assert meta["int8"]["portable"] and meta["int8"]["mode"] == "static" and meta["version"]
    assert "int8" not in read_metadata(compressed.onnx_path) and read_metadata(compressed.onnx_path)["classes"] == meta["classes"]
    session_meta = ort_session(compressed.int8_path).get_modelmeta().custom_metadata_map  # what a server reads
    assert json.loads(session_meta["protege.classes"]) == meta["classes"]
    q = compressed.report["quantization"]
    assert q["scheme"]["portable"] and q["verification"]["predictions_changed"] <= max(1, V.MAX_FLIPS * q["verification"]["predictions"])


def test_recipe_goes_from_teacher_to_int8_onnx(compressed):
    run = compressed
    names = [s["name"] for s in run.report["stages"]]
    assert names == ["teacher", "student", "student_onnx", "pruned", "pruned_onnx", "int8 (static)"]
    assert run.report["deployed"] == "int8 (static)"
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(run.int8_path)
    stages = {s["name"]: s for s in run.report["stages"]}
    assert stages["pruned"]["params"] < stages["student"]["params"]
    for s in run.report["stages"]:
        assert {"accuracy", "params", "bytes", "latency_ms_b1", "latency_ms_b1_p95", "latency_ms_b32", "runtime"} <= set(s)
    choice = json.loads((run.quant_dir / "choice.json").read_text())
    assert choice["chosen"] == "static" and choice["selected_on"] == "validation split"
    rows = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert any(r["stage"] == "prune1" for r in rows)  # recovery by distillation ran
    assert (run.path / "report.html").is_file() and "plot-latency" in (run.path / "report.html").read_text()


def test_compress_command_replaces_an_earlier_pass(compressed, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(compressed.path, run_dir)
    run = compress(run_dir, prune=PruneConfig(method="unstructured", ratio=0.5), quantize=None)
    assert not run.int8_path.exists() and not (run.quant_dir / "choice.json").exists()
    assert run.report["deployed"] == "pruned_onnx"
    assert "no speedup" in run.report["stages"][-1]["note"]
    assert Run.load(run_dir).recipe.prune.method == "unstructured"  # the recipe records what was done
    assert (run_dir / "student" / "model.safetensors").read_bytes() == (compressed.path / "student" / "model.safetensors").read_bytes()


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


def test_static_int8_runs_int8_kernels(compressed, tmp_path):
    assert "QLinearConv" in _optimized_ops(compressed.int8_path, tmp_path)


def test_qat_with_the_teacher_exports_an_int8_file_ort_runs(compressed, tmp_path):
    import shutil

    run_dir = tmp_path / "qat"
    shutil.copytree(compressed.path, run_dir)
    run = compress(run_dir, prune=None, quantize=QuantizeConfig(mode="qat", qat_epochs=1))
    choice = run.report["quantization"]
    qat = next(c for c in choice["candidates"] if c["name"] == "qat")
    assert choice["chosen"] == "qat" and qat["val_agreement_torch_int8"] >= 0.98  # PyTorch int8 vs the file's exact QDQ arithmetic
    assert choice["scheme"]["portable"] and choice["scheme"]["max_abs_weight"] <= 64 and choice["target"] == "portable"
    assert read_metadata(run.int8_path)["int8"] == choice["scheme"]
    _exact_on_avx2(run.int8_path, run.pruned_onnx, _val_x(run))
    ops = _optimized_ops(run.int8_path, tmp_path)
    assert "QLinearConv" in ops and "Conv" not in ops  # every convolution runs in int8
    stages = {s["name"]: s for s in run.report["stages"]}
    # fake-quant training with the teacher keeps (here: improves) the pruned fp32 accuracy, far above chance (10%)
    assert stages["int8 (qat)"]["accuracy"] >= stages["pruned_onnx"]["accuracy"] - 0.05 and stages["int8 (qat)"]["accuracy"] > 0.2


def test_a_failed_compress_puts_the_earlier_pass_back(compressed, tmp_path, monkeypatch):
    import shutil

    import importlib

    pl = importlib.import_module("protege.stages.compress")  # (protege.stages.compress is also the compress() function)

    run_dir = tmp_path / "fail"
    shutil.copytree(compressed.path, run_dir)
    before = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise CompressError("simulated failure in the int8 stage")

    monkeypatch.setattr(pl, "quantize_stage", boom)
    with pytest.raises(CompressError, match="simulated"):
        compress(run_dir, prune=PruneConfig(ratio=0.3), quantize=QuantizeConfig(mode="dynamic"))
    after = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if "checkpoints" not in k} == {k: v for k, v in before.items() if "checkpoints" not in k}


def test_quantizing_alone_keeps_the_earlier_pruning(compressed, tmp_path):
    import shutil

    run_dir = tmp_path / "q"
    shutil.copytree(compressed.path, run_dir)
    pruned = (run_dir / "pruned" / "model.safetensors").read_bytes()
    run = compress(run_dir, quantize=QuantizeConfig(mode="dynamic"))
    assert (run_dir / "pruned" / "model.safetensors").read_bytes() == pruned
    assert [s["name"] for s in run.report["stages"]][-3:] == ["pruned", "pruned_onnx", "int8 (dynamic)"]
    assert run.report["quantization"]["source"] == "pruned.onnx"


def test_qat_keeps_unstructured_zeros(compressed, tmp_path):
    import shutil

    from onnx import numpy_helper

    run_dir = tmp_path / "sparse"
    shutil.copytree(compressed.path, run_dir)
    run = compress(run_dir, prune=PruneConfig(method="unstructured", ratio=0.5),
                   quantize=QuantizeConfig(mode="qat", qat_epochs=1))
    conv_w = [numpy_helper.to_array(t) for t in onnx.load(str(run.int8_path)).graph.initializer
              if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert conv_w and all(float((w == 0).mean()) >= 0.45 for w in conv_w[1:])  # inner convs: half their weights pruned
    assert all(int(np.abs(w.astype(np.int32)).max()) <= 64 for w in conv_w)  # portable: 7-bit weights
    _exact_on_avx2(run.int8_path, run.pruned_onnx, _val_x(run))


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


def test_choice_says_when_the_deciding_latency_is_unreliable():
    c = {"fp32": _cand(0.90, 1.0, 10.0), "static": {**_cand(0.90, 0.5, 4.0), "latency_b1_reliable": False}}
    name, reason = choose(c, QuantizeConfig(latency_batch=1))
    assert name == "static" and "static was flagged unreliable" in reason
    assert "unreliable" not in choose(c, QuantizeConfig(latency_batch=32))[1]


def test_an_int8_file_onnx_runtime_cannot_run_is_a_one_line_error(compressed, tmp_path, monkeypatch):
    """ONNX Runtime's own exception types are not RuntimeError: they must still become protege's error, not a traceback."""
    import importlib
    import shutil

    st = importlib.import_module("protege.stages.quantize")  # (protege.stages.compress is also the compress() function)

    class Fail(Exception):
        pass

    Fail.__module__ = "onnxruntime.capi.onnxruntime_pybind11_state"
    real = st.val_metrics

    def broken(path, *a, **k):
        if "quantized" in str(path):
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : simulated")
        return real(path, *a, **k)

    monkeypatch.setattr(st, "val_metrics", broken)
    run_dir = tmp_path / "ortfail"
    shutil.copytree(compressed.path, run_dir)
    with pytest.raises(CompressError, match="static int8: ONNX Runtime cannot run static.onnx"):
        compress(run_dir, quantize=QuantizeConfig(mode="static"))
