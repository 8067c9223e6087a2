"""The run lock and manifest (protege.run.lock): a second writer is refused naming the holder, --overwrite removes
only what the manifest lists, and bad --out paths or a failed start leave nothing behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import PROTEGE
from ..helpers import assert_clean_error, run_cli
from ..helpers import file_digests as _digests, tiny_recipe_file as _recipe, copy_run as _copy


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


def test_a_join_file_removed_between_open_and_lock_is_not_the_one_held(tmp_path, monkeypatch):
    """A process whose start failed removes .protege.join (leaving no trace) just after another opened it: the other
    must lock the file that is there now, or an --overwrite would later get the folder while it works."""
    import fcntl

    from protege.errors import FolderInUse
    from protege.run import JOIN, joined

    folder = tmp_path / "seeds"
    real, removed = fcntl.flock, []

    def flock(handle, op):
        if not removed and (folder / JOIN).exists():  # the other process's cleanup, in between
            (folder / JOIN).unlink()
            removed.append(True)
        return real(handle, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with joined(folder):
        assert removed and (folder / JOIN).is_file()
        with pytest.raises(FolderInUse, match="other processes are working in it"):
            with joined(folder, alone=True):
                pass
