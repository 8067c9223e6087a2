"""train.log_with: every epoch's metrics (and the run's test figures) also go to the trackers the recipe names, through
Accelerate; checked by reading TensorBoard's event files back."""
from __future__ import annotations

import importlib.util
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from protege import api

from ..helpers import assert_clean_error, run_cli, tiny_recipe_file


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file under {folder}"
    out: dict[str, list] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_every_epoch_and_the_test_figures_reach_tensorboard(tmp_path):
    recipe = tiny_recipe_file(tmp_path, lambda r: r["train"].update(log_with="tensorboard"))
    run = api.distill_file(recipe, tmp_path / "run")
    scalars = _scalars(tmp_path / "run" / "tracking")
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for stage in ("teacher", "student"):
        mine = [r for r in rows if r["stage"] == stage]
        for name in ("loss", "val_accuracy", "lr"):
            assert scalars[f"{stage}/{name}"] == [(r["epoch"], pytest.approx(r[name], rel=1e-6)) for r in mine], (stage, name)
    assert "student/kd" in scalars and "teacher/kd" not in scalars
    assert scalars["test/student/accuracy"] == [(0, pytest.approx(run.report.student.accuracy, rel=1e-6))]


def test_seeds_log_each_run_to_its_own_tracker_folder(tmp_path):
    recipe = tiny_recipe_file(tmp_path, lambda r: r["train"].update(log_with=["tensorboard"], epochs=1))
    api.distill_file(recipe, tmp_path / "out", seeds=2)
    for seed in (0, 1):
        scalars = _scalars(tmp_path / "out" / "distilled" / f"seed{seed}" / "tracking")
        assert len(scalars["student/val_accuracy"]) == 1


MISSING = next((t for t in ("swanlab", "aim", "dvclive", "clearml", "comet_ml") if importlib.util.find_spec(t) is None), None)


@pytest.mark.skipif(MISSING is None, reason="every candidate tracker package is installed here")
def test_a_tracker_whose_package_is_missing_is_a_one_line_error(tmp_path, capsys):
    recipe = tiny_recipe_file(tmp_path, lambda r: r["train"].update(log_with=[MISSING]))
    code, err = run_cli(["distill", recipe, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "train.log_with", MISSING, "pip install")
    assert not (tmp_path / "out").exists()


def test_trackers_belong_to_the_whole_run(tmp_path, capsys):
    recipe = tiny_recipe_file(tmp_path, lambda r: r["teacher"]["train"].update(log_with="tensorboard"))
    code, err = run_cli(["distill", recipe, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "teacher.train.log_with", "train.log_with")
