"""`protege compress` on bad input: one line naming the problem and the fix, exit code 2, nothing lost."""
from __future__ import annotations

import numpy as np
import pytest

from protege import distill, parse_recipe

from .conftest import TINY
from .helpers import assert_clean_error, run_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    distill(parse_recipe(dict(TINY)), out)
    return out


def _snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def compress_cli(run_dir, capsys):
    """Run `protege compress RUN ...` and check that the run folder is byte-for-byte unchanged afterwards."""
    def go(*args):
        before = _snapshot(run_dir)
        code, err = run_cli(["compress", run_dir, *args], capsys)
        assert _snapshot(run_dir) == before, "a failed compress changed the run folder"
        return code, err

    return go


def test_prune_ratio_outside_open_interval(compress_cli):
    assert_clean_error(*compress_cli("--prune", "1.5"), "pruning options", "--prune is", "less than 1")
    assert_clean_error(*compress_cli("--prune", "0"), "pruning options", "--prune is", "greater than 0")


def test_options_that_would_be_ignored(compress_cli, tmp_path):
    assert_clean_error(*compress_cli("--keep", "body.1", "--quantize", "static"), "--keep", "need --prune")
    assert_clean_error(*compress_cli("--prune", "0.5", "--allow-fallback"), "--allow-fallback", "need --quantize")


def test_structured_pruning_that_empties_a_layer(compress_cli):
    assert_clean_error(*compress_cli("--prune", "0.97"), "every channel", "body.1", "prune.keep")


def test_keep_path_that_does_not_exist(compress_cli):
    assert_clean_error(*compress_cli("--prune", "0.5", "--keep", "body.7"), "no module 'body.7'", "nearest paths")


def test_unknown_quantize_mode(compress_cli):
    assert_clean_error(*compress_cli("--quantize", "int4"), "'int4'", "allowed values", "'static'")


def test_nothing_to_do(compress_cli):
    assert_clean_error(*compress_cli(), "nothing to do", "--prune")


def test_empty_calibration_set(compress_cli, tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    assert_clean_error(*compress_cli("--quantize", "static", "--calibration-data", tmp_path / "empty.npy"), "empty.npy", "is empty")


def test_calibration_set_of_the_wrong_shape(compress_cli, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((8, 1, 28, 28), np.float32))
    assert_clean_error(*compress_cli("--quantize", "static", "--calibration-data", tmp_path / "wrong.npy"),
                       "shape (1, 28, 28)", "expects (1, 8, 8)")


def test_calibration_file_is_never_unpickled(compress_cli, tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    np.save(tmp_path / "obj.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    assert_clean_error(*compress_cli("--quantize", "static", "--calibration-data", tmp_path / "obj.npy"), "obj.npy", "numpy.save")
    assert not (tmp_path / "pwned").exists()


def test_run_without_a_finished_student(tmp_path, run_dir, capsys):
    half = tmp_path / "half"
    half.mkdir()
    (half / "recipe.yaml").write_bytes((run_dir / "recipe.yaml").read_bytes())
    assert_clean_error(*run_cli(["compress", half, "--prune", "0.5"], capsys), "no finished student", "--resume")


def test_not_a_run_folder(tmp_path, capsys):
    assert_clean_error(*run_cli(["compress", tmp_path, "--quantize", "static"], capsys), "not a run folder")


def test_unknown_quantize_target(compress_cli):
    assert_clean_error(*compress_cli("--quantize", "static", "--target", "fastest"), "'fastest'", "allowed values", "'portable'")
    assert_clean_error(*compress_cli("--target", "this_cpu"), "--target", "need --quantize")


def test_calibration_set_of_equal_values(compress_cli, tmp_path):
    np.save(tmp_path / "flat.npy", np.full((16, 1, 8, 8), 0.5, np.float32))
    assert_clean_error(*compress_cli("--quantize", "static", "--calibration-data", tmp_path / "flat.npy"),
                       "flat.npy", "every value is 0.5", "zero range", "calibrate on real inputs")
