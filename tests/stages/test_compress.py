"""The compress stage of a run (protege.stages.compress): a recipe from teacher to int8 ONNX, `compress` passes
over a finished run (prune, static, dynamic, QAT), and a failed or interrupted pass puts the run back."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import onnx
import pytest
import torch

from protege import PruneConfig, QuantizeConfig, Run, compress, distill, parse_recipe
from protege.compress import verify as V
from protege.errors import CompressError
from protege.export.metadata import read as read_metadata
from protege.export.onnx import ort_session

from ..conftest import HERE, PROTEGE
from ..slow_mlp import HOLD
from ..helpers import file_digests as _digests, tiny_recipe_file as _recipe
from ..int8_checks import ops as _ops, optimized_ops as _optimized_ops, exact_on_avx2 as _exact_on_avx2


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
    q = compressed.report.quantization
    assert q.scheme["portable"] and q.verification["predictions_changed"] <= max(1, V.MAX_FLIPS * q.verification["predictions"])


def test_recipe_goes_from_teacher_to_int8_onnx(compressed):
    run = compressed
    names = [s.name for s in run.report.stages]
    assert names == ["teacher", "student", "student_onnx", "pruned", "pruned_onnx", "int8 (static)"]
    assert run.report.deployed == "int8 (static)"
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(run.int8_path)
    stages = {s.name: s for s in run.report.stages}
    assert stages["pruned"].params < stages["student"].params
    for s in run.report.stages:
        assert {"accuracy", "params", "bytes", "latency_ms_b1", "latency_ms_b1_p95", "latency_ms_b32", "runtime"} <= s.model_fields_set
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
    assert run.report.deployed == "pruned_onnx"
    assert "no speedup" in run.report.stages[-1].note
    assert Run.load(run_dir).recipe.prune.method == "unstructured"  # the recipe records what was done
    assert (run_dir / "student" / "model.safetensors").read_bytes() == (compressed.path / "student" / "model.safetensors").read_bytes()


def test_static_int8_runs_int8_kernels(compressed, tmp_path):
    assert "QLinearConv" in _optimized_ops(compressed.int8_path, tmp_path)


def test_qat_with_the_teacher_exports_an_int8_file_ort_runs(compressed, tmp_path):
    import shutil

    run_dir = tmp_path / "qat"
    shutil.copytree(compressed.path, run_dir)
    run = compress(run_dir, prune=None, quantize=QuantizeConfig(mode="qat", qat_epochs=1))
    choice = run.report.quantization
    qat = next(c for c in choice.candidates if c["name"] == "qat")
    assert choice.chosen == "qat" and qat["val_agreement_torch_int8"] >= 0.98  # PyTorch int8 vs the file's exact QDQ arithmetic
    assert choice.scheme["portable"] and choice.scheme["max_abs_weight"] <= 64 and choice.target == "portable"
    assert read_metadata(run.int8_path)["int8"] == choice.scheme
    _exact_on_avx2(run.int8_path, run.pruned_onnx, _val_x(run))
    ops = _optimized_ops(run.int8_path, tmp_path)
    assert "QLinearConv" in ops and "Conv" not in ops  # every convolution runs in int8
    stages = {s.name: s for s in run.report.stages}
    # fake-quant training with the teacher keeps (here: improves) the pruned fp32 accuracy, far above chance (10%)
    assert stages["int8 (qat)"].accuracy >= stages["pruned_onnx"].accuracy - 0.05 and stages["int8 (qat)"].accuracy > 0.2


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
    assert [s.name for s in run.report.stages][-3:] == ["pruned", "pruned_onnx", "int8 (dynamic)"]
    assert run.report.quantization.source == "pruned.onnx"


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


def test_ctrl_c_during_compress_puts_the_run_back_with_its_metrics(tmp_path):
    """Ctrl-C in compress's recovery epochs: exit 130, "interrupted", and every file (metrics too) as before."""
    slow = f"{HERE / 'slow_mlp.py'}:build"
    recipe = _recipe(tmp_path, lambda r: r["student"].update(model=slow, kwargs={"hidden": [32]}))
    run = tmp_path / "run"
    assert subprocess.run([PROTEGE, "distill", str(recipe), "--out", str(run)], capture_output=True).returncode == 0
    (run / ".protege.lock").unlink()
    before = _digests(run)
    marker = tmp_path / "held"
    hold = {"metrics": str(run / "metrics.jsonl"), "checkpoint": str(run / "pruned" / "checkpoints" / "last.safetensors"),
            "stage": "prune1", "at": 1, "hidden": [32], "marker": str(marker)}
    proc = subprocess.Popen([PROTEGE, "compress", str(run), "--prune", "0.5", "--finetune-epochs", "3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, HOLD: json.dumps(hold)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "not held in time"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    assert "interrupted" in err and "put back" in err and "Traceback" not in err, err
    assert _digests(run) == before
