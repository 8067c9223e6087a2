"""Nothing lost, nothing silently wrong: divergence, the run lock, --overwrite's manifest, bad --out paths, damaged
run files and Ctrl-C. Each case: a one-line error (exit 2) or "interrupted" (exit 130), and the run's files as they were."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from .conftest import HERE, PROTEGE, TINY
from .slow_mlp import HOLD
from .test_bad_input import assert_clean_error, run_cli
from .log_capture import logged


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"{path} holds {token}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def _digests(folder: Path, skip: tuple[str, ...] = (".protege.lock",)) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def _recipe(tmp: Path, edit=None, name: str = "recipe.yaml") -> Path:
    r = json.loads(json.dumps(TINY))
    r["teacher"]["train"]["epochs"] = 1
    r["train"]["epochs"] = 2
    if edit:
        edit(r)
    path = tmp / name
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, made once; tests copy it before changing anything."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    proc = subprocess.run([PROTEGE, "distill", str(_recipe(tmp)), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(run: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(run, dst)
    (dst / ".protege.lock").unlink(missing_ok=True)
    return dst


# --- divergence --------------------------------------------------------------------------------------------------

POISON = textwrap.dedent("""
    import os
    from protege.models.zoo import MLP

    class Poison(MLP):
        calls = 0
        def forward(self, x):
            out = super().forward(x)
            if self.training:
                Poison.calls += 1
                if Poison.calls > int(os.environ.get("POISON_AFTER", "0")):  # a loss that turns NaN after N batches
                    out = out * float("nan")
            return out

    def build(in_shape, num_classes, hidden=(16,)):
        return Poison(in_shape, num_classes, hidden)
""")


@pytest.mark.parametrize("which,stage,field", [("student", "student epoch 1/2", "train.lr"),
                                               ("teacher", "teacher epoch 1/1", "teacher.train.lr")])
def test_divergence_stops_at_once_and_names_the_fix(tmp_path, capsys, monkeypatch, which, stage, field):
    (tmp_path / "poison.py").write_text(POISON)
    monkeypatch.setenv("POISON_AFTER", "0")
    out = tmp_path / "out"
    recipe = _recipe(tmp_path, lambda r: r[which].update(model=f"{tmp_path / 'poison.py'}:build"))
    code, err = run_cli(["distill", recipe, "--out", out], capsys)
    assert_clean_error(code, err, stage, "step 1:", "loss is nan", "diverged", f"lower {field}", "nothing of this stage was saved")
    rows = _strict_json_lines(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    assert all(r["stage"] != which for r in rows)  # no row of the diverged epoch
    assert not (out / which / "model.safetensors").exists()
    assert not list((out / which / "checkpoints").glob("*.safetensors"))


@pytest.mark.parametrize("value", ["1e6", ".inf", "1.0e300"])
def test_absurd_learning_rates_are_refused_before_training(tmp_path, capsys, value):
    code, err = run_cli(["distill", _recipe(tmp_path), "--out", tmp_path / "out", "--set", f"train.lr={value}"], capsys)
    assert_clean_error(code, err, "train.lr")
    assert not (tmp_path / "out").exists()


def test_divergence_later_keeps_the_last_finite_checkpoint(tmp_path, capsys, monkeypatch):
    """Epoch 1 is fine, epoch 2's loss is NaN: epoch 1's checkpoint stays, and is finite."""
    (tmp_path / "poison.py").write_text(POISON)
    monkeypatch.setenv("POISON_AFTER", "21")  # 21 batches of 64 = epoch 1 of the digits training split
    out = tmp_path / "out"
    code, err = run_cli(["distill", _recipe(tmp_path, lambda r: r["student"].update(model=f"{tmp_path / 'poison.py'}:build")),
                         "--out", out], capsys)
    assert_clean_error(code, err, "student epoch 2/2", "loss is nan", "epoch 1", "last.safetensors")
    rows = [r for r in _strict_json_lines(out / "metrics.jsonl") if r["stage"] == "student"]
    assert [r["epoch"] for r in rows] == [1]
    ckpt = load_file(str(out / "student" / "checkpoints" / "last.safetensors"))
    assert all(torch.isfinite(t).all() for k, t in ckpt.items() if k.startswith("model."))


def test_nan_weights_are_refused_by_evaluate_and_export(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path / "run")
    weights = load_file(str(run / "student" / "model.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, str(run / "student" / "model.safetensors"))
    before = _digests(run)
    for command in ("evaluate", "export"):
        code, err = run_cli([command, run], capsys)
        assert_clean_error(code, err, "model.safetensors", "NaN or inf", "diverged")
        assert _digests(run) == before


def test_old_nan_tokens_in_metrics_become_null(tmp_path, capsys):
    """A metrics.jsonl from an older version with bare NaN tokens is rewritten as strict JSON on the next row."""
    from protege.train.fit import _append_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "teacher", "epoch": 1, "loss": NaN}\n{"broken\n')
    _append_metrics(path, "student", 0, {"stage": "student", "epoch": 1, "loss": float("inf")})
    assert _strict_json_lines(path) == [{"stage": "teacher", "epoch": 1, "loss": None}, {"stage": "student", "epoch": 1, "loss": None}]


def test_csv_with_an_infinite_cell_is_refused(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)) + "inf,1,0\n")
    recipe = _recipe(tmp_path, lambda r: r.update(data={"source": "csv", "path": str(csv), "target": "label"}))
    code, err = run_cli(["distill", recipe, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "t.csv", "column 'a'", "infinite")


# --- the lock ----------------------------------------------------------------------------------------------------

def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds the run's lock (as a running `protege distill` would) until killed."""
    code = (f"import sys, time\nfrom protege.run import locked\nwith locked({str(run)!r}, 'distill', create=True):\n"
            f"    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_naming_the_holder_until_it_dies(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path / "run")
    holder = _hold_lock(run)
    try:
        before = _digests(run)
        recipe = _recipe(tmp_path)
        for args in (["distill", recipe, "--out", run, "--resume"], ["distill", recipe, "--out", run, "--overwrite"],
                     ["evaluate", run], ["export", run], ["compress", run, "--quantize", "dynamic"]):
            code, err = run_cli(args, capsys)
            assert_clean_error(code, err, "in use by another protege process", f"PID {holder.pid}")
            assert _digests(run) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    code, err = run_cli(["evaluate", run], capsys)
    assert code == 0, err


def test_two_runs_started_together_one_refused_one_finishes(tmp_path):
    recipe, out = _recipe(tmp_path), tmp_path / "out"
    procs = [subprocess.Popen([PROTEGE, "distill", str(recipe), "--out", str(out)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=600), p.stderr.read()) for p in procs)
    assert results[0][0] == 0, results
    code, err = results[1]
    assert code == 2 and "Traceback" not in err, err
    assert "in use by another protege process" in err or "already holds a run" in err, err
    assert (out / "student" / "model.safetensors").is_file() and (out / "report.json").is_file()


# --- --overwrite and the manifest ---------------------------------------------------------------------------------

def test_overwrite_removes_what_the_manifest_lists_and_nothing_else(tmp_path, capsys, finished):
    run = _copy(finished, tmp_path / "run")
    listed = json.loads((run / "manifest.json").read_text())["files"]
    assert {"recipe.yaml", "metrics.jsonl", "student/model.safetensors", "student.onnx", "report.json"} <= set(listed)
    assert all((run / f).is_file() for f in listed)
    stale = run / "student.int8.onnx"  # as if an earlier compress had made it: listed, so it goes
    stale.write_bytes(b"old int8")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({"files": [*manifest["files"], "student.int8.onnx"]}))
    mine = {run / "student" / "genome.txt": "g", run / "teacher_cache" / "my_features.npy": "f",
            run / "student" / "generated_by_me" / "data.csv": "d", run / "notes.md": "n"}
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    code, err = run_cli(["distill", _recipe(tmp_path), "--out", run, "--overwrite"], capsys)
    assert code == 0, err
    assert not stale.exists()
    assert all(path.read_text() == text for path, text in mine.items())
    assert (run / "student" / "model.safetensors").is_file()


# --- bad --out paths and damaged run files --------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["below_a_file", "unwritable"])
def test_bad_out_path_is_one_line(tmp_path, capsys, where):
    if where == "below_a_file":
        (tmp_path / "file").write_text("x")
        out, words = tmp_path / "file" / "run", ("cannot write to the run folder", "Not a directory")
    else:
        out, words = Path("/sys/protege-test-run"), ("cannot write to the run folder", "choose a writable folder")
    code, err = run_cli(["distill", _recipe(tmp_path), "--out", out], capsys)
    assert_clean_error(code, err, *words)


def test_failed_start_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, err = run_cli(["distill", _recipe(tmp_path, lambda r: r["data"].update(source="csv", path=str(tmp_path / "no.csv"),
                                                                                target="y")), "--out", out], capsys)
    assert_clean_error(code, err, "no.csv")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage", ["recipe_truncated", "recipe_binary", "report_truncated", "choice_garbage"])
def test_damaged_run_files_are_one_line_errors(tmp_path, capsys, finished, damage):
    run = _copy(finished, tmp_path / "run")
    if damage == "recipe_truncated":
        (run / "recipe.yaml").write_text((run / "recipe.yaml").read_text()[:40])
        cases = [(["evaluate", run], ["recipe.yaml"]), (["export", run], ["recipe.yaml"])]
    elif damage == "recipe_binary":
        (run / "recipe.yaml").write_bytes(bytes(range(256)))
        cases = [(["evaluate", run], ["recipe.yaml", "damaged"]), (["compress", run, "--quantize", "dynamic"], ["recipe.yaml"])]
    elif damage == "report_truncated":  # evaluate rewrites report.json, so it does not need the old one; the API says
        (run / "report.json").write_text((run / "report.json").read_text()[:100])
        from protege.errors import RunError
        from protege.run import Run

        with pytest.raises(RunError, match="report.json is damaged"):
            Run.load(run)
        cases = []
    else:
        (run / "quantized").mkdir()
        (run / "quantized" / "choice.json").write_text("{not json")
        cases = [(["evaluate", run], ["choice.json", "damaged", "--quantize"])]
    before = _digests(run)
    for args, words in cases:
        code, err = run_cli(args, capsys)
        assert_clean_error(code, err, *words)
        assert _digests(run) == before


# --- Ctrl-C -------------------------------------------------------------------------------------------------------

def test_ctrl_c_while_importing_exits_130_without_traceback():
    """A KeyboardInterrupt raised while the package imports torch (as Ctrl-C at that moment would)."""
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def imp(name, *a, **k):\n    if name == 'torch':\n        raise KeyboardInterrupt\n    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\nsys.argv = ['protege', 'evaluate', 'x']\nimport protege_entry\nprotege_entry.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr


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


# --- where the user is probably wrong -------------------------------------------------------------------------------

def test_student_larger_than_teacher_is_warned(tmp_path):
    import protege

    lines: list[str] = []
    recipe = protege.load_recipe(_recipe(tmp_path, lambda r: (r["student"].update(kwargs={"hidden": [256]}),
                                                               r["train"].update(epochs=1))))
    with logged(lines):
        protege.distill(recipe, tmp_path / "out", evaluate_=False, export=False)
    warned = [ln for ln in lines if ln.startswith("warning: the student (")]
    assert len(warned) == 1 and "not smaller than the teacher" in warned[0] and "student.kwargs" in warned[0], lines
    lines.clear()
    with logged(lines):
        protege.distill(protege.load_recipe(_recipe(tmp_path, name="small.yaml")), tmp_path / "small", evaluate_=False,
                        export=False)
    assert not [ln for ln in lines if ln.startswith("warning")], lines


def test_hooking_a_container_that_is_never_called_is_one_line(tmp_path, capsys):
    mod = tmp_path / "staged.py"
    mod.write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Staged(nn.Module):
            def __init__(self, in_shape, num_classes):
                super().__init__()
                self.stages = nn.ModuleDict({"a": nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()),
                                             "b": nn.Linear(32, num_classes)})
            def forward(self, x):
                for stage in self.stages.values():
                    x = stage(x)
                return x

        def build(in_shape, num_classes):
            return Staged(in_shape, num_classes)
    """))
    recipe = _recipe(tmp_path, lambda r: (r["student"].update(model=f"{mod}:build", kwargs={}),
                                          r["distill"].update(features=[{"student": "stages", "teacher": "body.0", "loss": "hint"}])))
    code, err = run_cli(["distill", recipe, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "'stages'", "never called", "protege inspect")


def test_input_shape_with_a_letter_is_refused(capsys):
    code, err = run_cli(["inspect", "mlp", "--input-shape", "1,x,28"], capsys)
    assert_clean_error(code, err, "--input-shape '1,x,28'", "positive integers")


@pytest.mark.parametrize("after", [0.05, 0.3, 0.8])
def test_real_ctrl_c_early_in_start_up_is_clean(tmp_path, after):
    """A real SIGINT at a few moments of start-up (mostly inside torch's import): never a traceback; "interrupted"
    and exit 130, or, if the command got that far, its own one-line error."""
    proc = subprocess.Popen([PROTEGE, "evaluate", str(tmp_path / "nowhere")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert "Traceback" not in err, err
    assert (code == 130 and "interrupted" in err) or (code == 2 and "not a run folder" in err), (code, err)
