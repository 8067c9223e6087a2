"""train.log_with: every epoch's metrics (and the run's test figures) also go to the trackers the recipe names, through
Accelerate; checked by reading them back from TensorBoard's event files, MLflow's store and trackio's database."""
from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from protege import api

from ..conftest import PROTEGE
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


def _same_as_the_run(scalars: dict[str, list[tuple[int, float]]], run_folder, test_accuracy: float) -> None:
    """A tracker's series (name -> [(step, value)]) hold every epoch of metrics.jsonl and the run's test accuracy."""
    rows = [json.loads(ln) for ln in (run_folder / "metrics.jsonl").read_text().splitlines()]
    for stage in ("teacher", "student"):
        mine = [r for r in rows if r["stage"] == stage]
        for name in ("loss", "val_accuracy", "lr"):
            assert scalars[f"{stage}/{name}"] == [(r["epoch"], pytest.approx(r[name], rel=1e-6)) for r in mine], (stage, name)
    assert "student/kd" in scalars and "teacher/kd" not in scalars
    assert scalars["test/student/accuracy"] == [(0, pytest.approx(test_accuracy, rel=1e-6))]


def test_every_epoch_and_the_test_figures_reach_tensorboard(tmp_path):
    recipe = tiny_recipe_file(tmp_path, lambda r: r["train"].update(log_with="tensorboard"))
    run = api.distill_file(recipe, tmp_path / "run")
    _same_as_the_run(_scalars(tmp_path / "run" / "tracking"), tmp_path / "run", run.report.student.accuracy)


def test_mlflow_gets_the_same_figures_in_a_run_named_after_the_folder(tmp_path, monkeypatch):
    import mlflow

    url = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # (MLflow's own setting: where a user's runs go)
    recipe = tiny_recipe_file(tmp_path, lambda r: r["train"].update(log_with="mlflow"))
    run = api.distill_file(recipe, tmp_path / "run")
    client = mlflow.MlflowClient(tracking_uri=url)
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.run_name == str(tmp_path / "run") and found.data.params["distill.temperature"] == str(run.recipe.distill.temperature)
    scalars = {name: [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, name)] for name in found.data.metrics}
    _same_as_the_run(scalars, tmp_path / "run", run.report.student.accuracy)


def test_trackio_gets_the_same_figures_in_a_run_named_after_the_folder(tmp_path):
    recipe = tiny_recipe_file(tmp_path, lambda r: r["train"].update(log_with="trackio"))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}  # (trackio reads it once, when imported: a process of its own)
    proc = subprocess.run([PROTEGE, "distill", str(recipe), "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with sqlite3.connect(tmp_path / "trackio" / "tiny.db") as db:
        logged = db.execute("select step, metrics from metrics where run_name = ? order by id", (str(tmp_path / "run"),)).fetchall()
    scalars: dict[str, list] = {}
    for step, values in logged:
        for name, v in json.loads(values).items():
            scalars.setdefault(name, []).append((step, v))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    _same_as_the_run(scalars, tmp_path / "run", report["student"]["accuracy"])


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
