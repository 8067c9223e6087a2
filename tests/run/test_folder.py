"""The run folder (protege.run.folder): damaged run files are one-line errors and stay as they were."""
from __future__ import annotations


import pytest

from ..helpers import assert_clean_error, run_cli
from ..helpers import file_digests as _digests, copy_run as _copy


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
