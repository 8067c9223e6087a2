"""The run folder (protege.run.folder): damaged run files are one-line errors and stay as they were."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from ..conftest import PROTEGE, TINY
from ..helpers import assert_clean_error, run_cli


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
