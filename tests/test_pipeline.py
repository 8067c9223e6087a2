"""End to end on bundled digits: recipe -> teacher -> student -> ONNX -> report."""
import json
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file

import protege
from protege.recipe import parse_recipe

from .conftest import PROTEGE


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from .conftest import TINY

    out = tmp_path_factory.mktemp("run") / "tiny"
    run = protege.distill(parse_recipe(dict(TINY)), out)
    return run


def test_report_has_required_fields(finished_run):
    report = json.loads(finished_run.report_path.read_text())
    for key in ("teacher", "student", "student_onnx"):
        for field in ("accuracy", "params", "bytes", "latency_ms_b1", "latency_ms_b32"):
            assert report[key][field] > 0, (key, field)
    assert report["student_onnx"]["runtime"] == "onnxruntime"
    assert 0 <= report["onnx_max_abs_diff"] <= 1e-4
    assert report["compression_ratio"] == pytest.approx(report["teacher"]["params"] / report["student"]["params"])
    assert report["speedup_b1"] > 0
    assert report["student"]["accuracy"] == pytest.approx(report["student_onnx"]["accuracy"])
    assert 0 <= report["student"]["agreement"] <= 1 and 0 <= report["student"]["macro_f1"] <= 1
    assert report["environment"]["torch"] == torch.__version__


def test_run_folder_layout(finished_run):
    p = finished_run.path
    for name in ("recipe.yaml", "metrics.jsonl", "teacher/model.safetensors", "student/model.safetensors",
                 "student.onnx", "teacher_logits.safetensors", "student/checkpoints/last.safetensors"):
        assert (p / name).is_file(), name
    rows = [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["stage"] == "teacher"] == [1, 2, 3]
    assert [r["epoch"] for r in rows if r["stage"] == "student"] == [1, 2, 3]
    assert all({"loss", "ce", "kd", "val_accuracy"} <= set(r) for r in rows if r["stage"] == "student")
    assert yaml.safe_load((p / "recipe.yaml").read_text())["train"]["epochs"] == 3


def test_student_weights_are_the_validation_selected_epoch(finished_run):
    rows = [json.loads(x) for x in finished_run.metrics_path.read_text().splitlines() if '"student"' in x]
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -i))
    saved = load_file(str(finished_run.student_weights))
    chosen = load_file(str(finished_run.path / "student/checkpoints/best.safetensors"))
    assert all(torch.equal(saved[k], chosen[k]) for k in saved)
    assert rows[best]["epoch"] >= 1


def test_evaluate_and_export_commands_rerun(finished_run):
    before = json.loads(finished_run.report_path.read_text())
    out = subprocess.run([PROTEGE, "export", str(finished_run.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([PROTEGE, "evaluate", str(finished_run.path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "student_onnx" in out.stdout and "accuracy" in out.stdout
    after = json.loads(finished_run.report_path.read_text())
    assert after["student"]["accuracy"] == before["student"]["accuracy"]  # same weights, same test set


def test_cli_set_override_is_saved(tmp_path, tiny, write_recipe):
    tiny["train"]["epochs"] = 1
    tiny["teacher"]["train"]["epochs"] = 1
    path = write_recipe(tiny)
    out = subprocess.run([PROTEGE, "distill", str(path), "--out", str(tmp_path / "r"), "--set", "train.epochs=2",
                          "--set", "distill.temperature=3"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    saved = yaml.safe_load((tmp_path / "r/recipe.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["distill"]["temperature"] == 3
    assert (tmp_path / "r/report.json").is_file()


def test_teacher_cache_means_no_teacher_forward(tmp_path, tiny, monkeypatch):
    """With a cache the teacher runs once over the training set, never inside the epochs."""
    from protege.knowledge import teacher as teacher_mod

    calls = {"n": 0}
    real = teacher_mod.predict_logits

    def counting(model, x, *a, **k):
        calls["n"] += 1
        return real(model, x, *a, **k)

    monkeypatch.setattr(teacher_mod, "predict_logits", counting)
    run = protege.distill(parse_recipe(tiny), tmp_path / "r", export=False, evaluate_=False)
    assert calls["n"] == 1
    assert (run.path / "teacher_logits.safetensors").is_file()
    # Same seed on CPU -> a bit-identical teacher -> same fingerprint -> the cache is reused, no new pass.
    protege.distill(parse_recipe(tiny), tmp_path / "r", overwrite=True, export=False, evaluate_=False)
    assert calls["n"] == 1


def test_teacher_cache_is_rebuilt_when_teacher_changes(tmp_path, tiny, capsys):
    protege.distill(parse_recipe(tiny), tmp_path / "r", export=False, evaluate_=False)
    tiny["teacher"]["train"]["epochs"] = 1  # a different teacher, same folder
    protege.distill(parse_recipe(tiny), tmp_path / "r", overwrite=True, export=False, evaluate_=False)
    assert "fingerprint differs" in capsys.readouterr().out


def test_export_over_tolerance_fails_and_keeps_the_good_file(finished_run, capsys):
    from protege.errors import ExportError

    good = finished_run.onnx_path.read_bytes()
    strict = protege.Run(finished_run.path, finished_run.recipe.model_copy(
        update={"export": finished_run.recipe.export.model_copy(update={"tolerance": 1e-15})}))
    with pytest.raises(ExportError, match="differs from PyTorch"):
        protege.export_onnx(strict)
    assert finished_run.onnx_path.read_bytes() == good
    assert (finished_run.path / "student.rejected.onnx").is_file()


def test_configs_beside_weights(finished_run):
    cfg = json.loads((finished_run.path / "student" / "config.json").read_text())
    assert cfg["model"] == "mlp" and cfg["num_classes"] == 10 and cfg["in_shape"] == [1, 8, 8]
    assert json.loads((finished_run.path / "teacher" / "config.json").read_text())["params"] > cfg["params"]
