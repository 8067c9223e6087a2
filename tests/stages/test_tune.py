"""`protege tune`: Optuna trials on the validation split (the test split is never read), per-epoch pruning, best.yaml,
a tuned baseline with the same budget, a killed study resumed, and bad search spaces and folders refused."""
from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import time

import optuna
import pytest

from protege import api
from protege.data import Split
from protege.recipe import load_recipe
from protege.stages.tune_space import search_spaces
from protege.stages.tune_study import counted

from ..conftest import PROTEGE
from ..helpers import assert_clean_error, file_digests, run_cli, tiny_recipe_file


def _recipe(tmp, trials=4, space=None, quantize=None, **tune):
    def edit(r):
        if quantize:
            r["quantize"] = quantize
        r["teacher"]["train"]["epochs"] = 1
        r["train"]["epochs"] = 3
        r["tune"] = {"trials": trials, "startup_trials": 1, "warmup": 0, **tune}
        if space is not None:
            r["tune"]["space"] = space
    return tiny_recipe_file(tmp, edit)


class _Unreadable:
    """A test split that fails the test as soon as anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read while tuning ({name})")

    def __getitem__(self, key):
        raise AssertionError("the test split was read while tuning")

    def __len__(self):
        raise AssertionError("the test split was read while tuning")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    space = {"train.lr": {"low": 1e-6, "high": 0.05, "log": True}, "distill.temperature": {"low": 1, "high": 8}}
    recipe = _recipe(tmp, trials=5, space=space, quantize={"mode": "dynamic"})
    tasks = importlib.import_module("protege.stages.tasks")  # every stage reads its data through tasks.load_data
    real = tasks.load_data

    def no_test(cfg, seed):
        data = real(cfg, seed)
        return type(data)(**{**data.__dict__, "test": Split(_Unreadable(), _Unreadable())})

    cache_mod = importlib.import_module("protege.knowledge.cache")
    built, real_build = [], cache_mod.build_cache

    def counted_build(folder, *a, **k):
        built.append(folder)
        return real_build(folder, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(tasks, "load_data", no_test)
    mp.setattr(cache_mod, "build_cache", counted_build)
    try:
        summary = api.tune_file(recipe, tmp / "out", baseline=True)
    finally:
        mp.undo()
    return {"tmp": tmp, "recipe": recipe, "out": tmp / "out", "summary": summary, "caches_built": built}


def _study(out, name="tiny"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def test_trials_are_chosen_on_validation_and_the_best_recipe_is_written(tuned):
    out, summary = tuned["out"], tuned["summary"]
    study = _study(out)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5 and summary["distilled"]["trials"] == len(study.trials)
    for t in study.trials:  # each trial's value is its run's best validation accuracy; nothing was exported or tested
        folder = out / "distilled" / "trials" / f"{t.number:04d}"
        assert not (folder / "report.json").exists() and not (folder / "student.onnx").exists()
        assert not (folder / "quantized").exists()  # the recipe's int8 step is the final run's, not a trial's
        assert 1e-6 <= t.params["train.lr"] <= 0.05 and 1 <= t.params["distill.temperature"] <= 8
        if t.state.name == "COMPLETE":
            cfg = json.loads((folder / "student" / "config.json").read_text())
            assert t.value == pytest.approx(cfg["best_val_accuracy"])
            assert max(t.intermediate_values.values()) == pytest.approx(cfg["best_val_accuracy"])
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert summary["distilled"]["best_value"] == pytest.approx(max(t.value for t in complete))
    best = load_recipe(out / "best.yaml")
    assert best.quantize is not None and best.quantize.mode == "dynamic"  # kept for whoever runs best.yaml
    params = summary["distilled"]["params"]
    assert best.train.lr == pytest.approx(params["train.lr"]) and best.distill.temperature == pytest.approx(params["distill.temperature"])
    # every trial loaded the teacher trained once in out/teacher
    assert best.teacher.weights == str((out / "teacher" / "teacher" / "model.safetensors").resolve())
    assert best.teacher.train is None


def test_the_trials_share_one_teacher_cache(tuned):
    out = tuned["out"]
    shared = [p for p in (out / "teacher_cache").iterdir() if p.is_dir()]
    assert len(shared) == 1 and (shared[0] / "meta.json").is_file()
    assert tuned["caches_built"] == shared  # built by the first trial only; the other four read it
    trials = sorted((out / "distilled" / "trials").iterdir())
    assert len(trials) >= 5 and not any((t / "teacher_cache").exists() for t in trials)


def test_bad_trials_are_pruned_at_an_epoch(tuned):
    study = _study(tuned["out"])
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned, [(t.params, t.intermediate_values) for t in study.trials]
    for t in pruned:  # stopped before its last epoch, below the median of the trials before it
        assert len(t.intermediate_values) < 3
    assert tuned["summary"]["distilled"]["pruned"] == len(pruned)


def test_the_baseline_gets_the_same_budget_and_no_distillation_knobs(tuned):
    base = _study(tuned["out"], "tiny-baseline")
    assert len([t for t in base.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 5
    assert all(set(t.params) == {"train.lr"} for t in base.trials)  # distill.temperature is not the baseline's
    best = load_recipe(tuned["out"] / "best_baseline.yaml")
    assert best.distill.alpha == 1.0 and best.train.lr == pytest.approx(tuned["summary"]["baseline"]["params"]["train.lr"])


def test_the_best_recipes_are_then_trained_with_seeds_and_tested(tmp_path):
    recipe = _recipe(tmp_path, trials=2, space={"train.lr": {"low": 1e-3, "high": 0.05, "log": True}})
    summary = api.tune_file(recipe, tmp_path / "out", seeds=2, baseline=True)
    final = tmp_path / "out" / "final"
    assert [r["seed"] for r in summary["final"]["runs"]] == [0, 1] and "verdict" in summary["final"]
    for kind, best in (("distilled", "best.yaml"), ("baseline", "best_baseline.yaml")):
        tuned_lr = load_recipe(tmp_path / "out" / best).train.lr
        for seed in (0, 1):  # each final run is the tuned recipe (the baseline: the separately tuned one)
            assert load_recipe(final / kind / f"seed{seed}" / "recipe.yaml").train.lr == pytest.approx(tuned_lr)
            assert (final / kind / f"seed{seed}" / "report.json").is_file()


def test_a_killed_tune_resumes_and_keeps_its_finished_trials(tmp_path):
    recipe = _recipe(tmp_path, trials=3, space={"train.lr": {"low": 1e-3, "high": 0.05, "log": True}})
    out = tmp_path / "out"
    cmd = [PROTEGE, "tune", str(recipe), "--out", str(out), "--set", "train.epochs=25"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 900  # (a generous limit for a loaded machine: about 20 s on an idle one)
    while time.time() < deadline:  # kill it once one trial is finished and the next one has started
        time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"the tune ended before it could be killed (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        if (out / "study.db").exists():
            try:  # read-only: opening the study through Optuna could create its tables beside the tune doing the same
                with contextlib.closing(sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True, timeout=5)) as db:
                    states = [row[0] for row in db.execute("SELECT state FROM trials")]
            except sqlite3.Error:  # the tables are not created yet, or the database is busy with the tune's own write
                continue
            if states.count("COMPLETE") + states.count("PRUNED") >= 1 and "RUNNING" in states:
                break
    else:
        proc.kill()
        pytest.fail("the first trial did not finish in time")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.state.name, t.value) for t in _study(out).trials}
    running = [n for n, (s, _) in before.items() if s == "RUNNING"]
    assert running
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    after = {t.number: (t.state.name, t.value) for t in _study(out).trials}
    for n, (state, value) in before.items():
        if state in ("COMPLETE", "PRUNED"):
            assert after[n] == (state, value)  # kept, not run again
    assert all(after[n][0] == "FAIL" for n in running)  # the killed trial is failed and replaced
    assert sum(s in ("COMPLETE", "PRUNED") for s, _ in after.values()) == 3
    assert "marked failed" in done.stdout + done.stderr


@pytest.mark.parametrize("space, words", [
    ({"train.lrr": {"low": 0.001, "high": 0.01}}, ["tune.space.train.lrr", "no field", "train.lr"]),
    ({"distill.alpha": {"low": 0.5, "high": 1.5}}, ["tune.space.distill.alpha", "1.5", "outside the field's allowed values"]),
    ({"train.epochs": {"low": 1.5, "high": 4}}, ["tune.space.train.epochs", "integer"]),
    ({"train.lr": {"low": 0.01, "high": 0.01}}, ["tune.space.train.lr", "empty range"]),
    ({"train.lr": {"low": 0.0, "high": 0.01, "log": True}}, ["tune.space.train.lr", "log"]),
    ({"train.lr": {"choices": []}}, ["tune.space.train.lr", "choices is empty"]),
    ({"seed": {"low": 0, "high": 3}}, ["tune.space.seed", "cannot be tuned"]),
    ({"data.val_fraction": {"low": 0.1, "high": 0.3}}, ["tune.space.data.val_fraction", "cannot be tuned", "test data"]),
    ({"teacher.train.lr": {"low": 0.001, "high": 0.01}}, ["tune.space.teacher.train.lr", "cannot be tuned"]),
    ({"train.epochs": {"low": 2, "high": 6, "step": 0.5}}, ["tune.space.train.epochs", "integer", "step"]),
    ({"distill.response": {"low": 0, "high": 1}}, ["tune.space.distill.response", "not a number", "choices"]),
])
def test_bad_search_spaces_are_one_line_errors(tmp_path, capsys, space, words):
    code, err = run_cli(["tune", _recipe(tmp_path, space=space), "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [(["--trials", "0"], ["--trials 0", "1 or more"]),
                                         (["--seeds", "0"], ["--seeds 0", "1 or more"]),
                                         (["--storage", "nosuchdb://x"], ["--storage", "cannot open", "postgresql://"])])
def test_bad_counts_are_one_line_errors(tmp_path, capsys, args, words):
    code, err = run_cli(["tune", _recipe(tmp_path), "--out", tmp_path / "out", *args], capsys)
    assert_clean_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_a_tune_folder_made_for_another_recipe_is_refused_untouched(tuned, capsys):
    before = file_digests(tuned["out"])
    code, err = run_cli(["tune", tuned["recipe"], "--out", tuned["out"], "--set", "train.batch_size=32"], capsys)
    assert_clean_error(code, err, "made for another recipe", "train.batch_size", "--overwrite")
    assert file_digests(tuned["out"]) == before


def test_an_overwrite_does_not_start_a_tune_over_under_other_processes(tuned, capsys):
    """--overwrite deletes the study, the teacher and the final runs: refused while another process works in the
    folder; and a process joining a tune being started over is refused too. Nothing touched."""
    from protege.run import joined

    before = file_digests(tuned["out"], skip=(".protege.lock", ".protege.join"))
    with joined(tuned["out"]):  # another tune process at work
        code, err = run_cli(["tune", tuned["recipe"], "--out", tuned["out"], "--baseline", "--overwrite"], capsys)
    assert_clean_error(code, err, "in use by another protege process", "wait for them to finish")
    with joined(tuned["out"], alone=True):  # another process starting it over
        code, err = run_cli(["tune", tuned["recipe"], "--out", tuned["out"], "--baseline"], capsys)
    assert_clean_error(code, err, "overwriting it")
    assert file_digests(tuned["out"], skip=(".protege.lock", ".protege.join")) == before


def test_processes_joining_a_study_draw_unrelated_values():
    from protege.stages.tune_study import sampler_seed

    storage = optuna.storages.InMemoryStorage()
    points = []
    for running in range(4):  # process k starts while the k earlier processes' first trials run
        study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True, direction="maximize",
                                    sampler=optuna.samplers.TPESampler(seed=sampler_seed(0, running, running), constant_liar=True))
        t = study.ask()
        points.append([t.suggest_float("alpha", 0, 0.9) / 0.9, (t.suggest_float("temperature", 1, 10) - 1) / 9])
    for i in range(4):
        for j in range(i):  # no two first trials within a tenth of the range in every knob (near-repeats)
            assert max(abs(a - b) for a, b in zip(points[i], points[j])) > 0.1, (i, j, points)
    assert sampler_seed(0, 0, 0) == sampler_seed(0, 0, 0) != sampler_seed(1, 0, 0)  # reproducible, and the recipe's seed counts


def test_the_default_space_follows_the_method():
    from protege.recipe import parse_recipe
    from protege.tune import default_space

    from ..conftest import TINY

    def space(**distill):
        return default_space(parse_recipe({**TINY, "distill": {**TINY["distill"], **distill}}).model_dump(mode="json"), False)

    assert {"train.lr", "train.weight_decay", "distill.alpha", "distill.temperature"} <= set(space())
    assert {"distill.dkd_alpha", "distill.dkd_beta"} <= set(space(response="dkd"))
    assert "distill.temperature" not in space(response="mse_logits")
    feats = space(features=[{"loss": "sp", "student": "net.1", "teacher": "net.1", "weight": 3.0}])
    assert feats["distill.features.0.weight"].low == pytest.approx(0.3) and feats["distill.features.0.weight"].log


def test_a_best_value_at_the_end_of_its_range_is_pointed_out(tuned):
    from protege.recipe import parse_recipe
    from protege.stages.tune_space import at_edge, edge_advice
    from protege.tune import Range

    from ..conftest import TINY

    recipe = parse_recipe({**TINY, "distill": {**TINY["distill"], "response": "dkd"}})
    space = {"distill.dkd_beta": Range(low=1, high=16, log=True), "distill.alpha": Range(low=0, high=0.9),
             "train.epochs": Range(low=2, high=6), "distill.temperature": Range(low=1, high=10),
             "train.lr": Range(choices=[0.001, 0.01])}
    best = {"distill.dkd_beta": 1.1, "distill.alpha": 0.02, "train.epochs": 6, "distill.temperature": 5.0, "train.lr": 0.01}
    edges = at_edge(recipe, space, best)
    assert set(edges) == {"distill.dkd_beta", "distill.alpha", "train.epochs"}  # T in the middle, choices have no ends
    assert edges["distill.dkd_beta"] == {"end": "low", "value": 1.1, "range": [1.0, 16.0], "widen": True}
    assert edges["distill.alpha"]["widen"] is False  # 0 is alpha's own limit: nothing to widen
    assert edges["train.epochs"]["end"] == "high" and edges["train.epochs"]["widen"]
    assert not at_edge(recipe, space, {**best, "distill.dkd_beta": 1.25, "distill.alpha": 0.1, "train.epochs": 4})
    near = {"distill.alpha": Range(low=0, high=0.9), "distill.temperature": Range(low=1, high=9.9, step=2)}
    high = at_edge(recipe, near, {"distill.alpha": 0.89, "distill.temperature": 9.0})  # a grid's top is its last point
    assert high["distill.alpha"] == {"end": "high", "value": 0.89, "range": [0.0, 0.9], "widen": True}  # alpha goes to 1
    assert high["distill.temperature"]["end"] == "high"
    lines = edge_advice("distilled", edges)
    assert any("distill.dkd_beta" in s and "widen tune.space.distill.dkd_beta" in s for s in lines)
    assert any("distill.alpha" in s and "own limit" in s for s in lines)
    for kind in ("distilled", "baseline"):  # a tune records them in summary.json, each inside its study's space
        assert isinstance(tuned["summary"][kind]["at_edge"], dict)
        for key, e in tuned["summary"][kind]["at_edge"].items():
            assert e["range"][0] <= tuned["summary"][kind]["params"][key] <= e["range"][1]


def _frozen(number, state, value, end, **attrs):
    from datetime import datetime, timedelta

    from optuna.distributions import FloatDistribution
    from optuna.trial import FrozenTrial, TrialState

    t0 = datetime(2026, 1, 1)
    return FrozenTrial(number=number, state=getattr(TrialState, state), value=value, datetime_start=t0,
                       datetime_complete=t0 + timedelta(seconds=end), params={"train.lr": 0.01 * (number + 1)},
                       distributions={"train.lr": FloatDistribution(0.001, 0.1)}, user_attrs=attrs, system_attrs={},
                       intermediate_values={}, trial_id=number)


def test_the_budget_counts_the_first_trials_to_finish_and_the_best_is_among_them(tmp_path):
    """With several processes, a trial can end after the study already holds its N finished trials: the budget counts
    the first N to finish, so every process picks the same best (not a trial one process had not yet seen)."""
    from protege.stages.tune import _best

    study = optuna.create_study(direction="maximize")
    for t in (_frozen(0, "COMPLETE", 0.90, end=3), _frozen(1, "PRUNED", None, end=1),
              _frozen(2, "COMPLETE", 0.95, end=5),  # third to finish: past a budget of 2
              _frozen(3, "PRUNED", None, end=2, beyond_budget=True)):  # stopped past the budget: never counted
        study.add_trial(t)
    assert [t.number for t in counted(study, 2)] == [1, 0]
    assert [t.number for t in counted(study, 3)] == [1, 0, 2]
    recipe = load_recipe(_recipe(tmp_path))
    chosen, info = _best(recipe, study, 2)
    assert info["best_trial"] == 0 and info["best_value"] == pytest.approx(0.90) and chosen.train.lr == pytest.approx(0.01)
    assert (info["trials"], info["complete"], info["pruned"], info["beyond_budget"]) == (4, 2, 1, 1)
    assert _best(recipe, study, 3)[1]["best_trial"] == 2
    with pytest.raises(Exception, match="no trial of study"):
        _best(recipe, study, 1)  # the first to finish was pruned


def test_a_trial_running_when_another_process_fills_the_budget_is_stopped(tmp_path, monkeypatch):
    """Another process ends the budget's last trial while this one trains: at its next check this trial stops, marked
    past the budget, and the best comes from the counted trials."""
    tune_mod = importlib.import_module("protege.stages.tune")
    recipe = _recipe(tmp_path, trials=1, space={"train.lr": {"low": 1e-3, "high": 0.05, "log": True}})
    real = tune_mod.distill
    out = tmp_path / "out"

    def other_process_finishes_one(r, folder, **kw):  # (the teacher's run has teacher_only; trials have test=False)
        if kw.get("test") is False and not kw.get("teacher_only"):
            study = _study(out)
            if not any(t.user_attrs.get("other") for t in study.trials):
                study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.5,
                                                          params={"train.lr": 0.01}, user_attrs={"other": True},
                                                          distributions={"train.lr": optuna.distributions.FloatDistribution(1e-3, 0.05, log=True)}))
        return real(r, folder, **kw)

    monkeypatch.setattr(tune_mod, "distill", other_process_finishes_one)
    summary = api.tune_file(recipe, out, baseline=False)
    trials = _study(out).trials
    stopped = [t for t in trials if t.user_attrs.get("beyond_budget")]
    assert len(stopped) == 1 and stopped[0].state.name == "PRUNED"
    assert summary["distilled"]["beyond_budget"] == 1 and summary["distilled"]["pruned"] == 0
    assert summary["distilled"]["best_value"] == pytest.approx(0.5)  # the other process's trial, the only one counted
    assert load_recipe(out / "best.yaml").train.lr == pytest.approx(0.01)


def _start_here(recipe, out, ident, barrier, results):
    barrier.wait(timeout=60)  # every process starts on the new folder at once
    try:
        importlib.import_module("protege.stages.tune")._start(recipe, out, ident, None, False)
        results.put((ident["recipe_sha256"], "ok"))
    except Exception as e:  # (reported to the test, which names it)
        results.put((ident["recipe_sha256"], f"{type(e).__name__}: {str(e)[:200]}"))


def test_processes_started_together_on_a_new_folder_share_it_or_are_refused(tmp_path):
    """Processes starting on a new tune folder at once: unguarded, some failed on the study database's tables
    (alembic_version's UNIQUE constraint; 12 of 40 here) or found the folder 'not a tune folder' (another's
    study.db). Now the same recipe's all start, and a process of another recipe racing them is refused, whichever
    claimed the folder first: tune.json names the recipe of those that started."""
    tune_mod = importlib.import_module("protege.stages.tune")
    recipe = load_recipe(_recipe(tmp_path, trials=2, space={"train.lr": {"low": 1e-3, "high": 0.05, "log": True}}))
    other = recipe.model_copy(update={"seed": recipe.seed + 1})
    idents = [tune_mod._identity(r, search_spaces(r, False)) for r in (recipe, recipe, recipe, other)]
    assert idents[0]["recipe_sha256"] != idents[3]["recipe_sha256"]
    ctx = multiprocessing.get_context("fork")
    for round_ in range(6):
        out = tmp_path / f"out{round_}"
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_start_here, args=(recipe, out, ident, barrier, results), daemon=True) for ident in idents]
        try:
            for p in procs:
                p.start()
            got = [results.get(timeout=120) for _ in procs]
        finally:  # (a child stuck for any reason fails the test instead of hanging it)
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        claimed = json.loads((out / "tune.json").read_text())["recipe_sha256"]
        assert all(outcome == "ok" for sha, outcome in got if sha == claimed), got
        assert all("made for another recipe" in outcome for sha, outcome in got if sha != claimed), got
        assert sorted(p.name for p in out.iterdir()) == ["study.db", "study.db.lock", "tune.json"]  # no claim left behind


def test_an_overwrite_removes_the_tunes_files_and_a_killed_starts_claim_only(tmp_path):
    tune_mod = importlib.import_module("protege.stages.tune")
    recipe = load_recipe(_recipe(tmp_path, trials=2))
    ident = tune_mod._identity(recipe, search_spaces(recipe, False))
    out = tmp_path / "out"
    (out / "distilled" / "trials" / "0000").mkdir(parents=True)
    for name in ("tune.json", "study.db", "study.db.lock", "best.yaml", "summary.json", "tune.json.host-1-abcd1234.tmp",
                 "notes.txt"):
        (out / name).write_text("{}")
    tune_mod._check_folder(out, ident, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the user's own file stays


def test_two_processes_started_together_share_one_tune(tmp_path):
    """Two `protege tune` commands started at the same moment on a new folder (the recipe trains its teacher): both
    finish, the teacher is trained once, the study holds the budget's trials, and both name the same best trial."""
    recipe = _recipe(tmp_path, trials=4, space={"train.lr": {"low": 1e-3, "high": 0.05, "log": True}})
    out = tmp_path / "out"
    cmd = [PROTEGE, "tune", str(recipe), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(2)]
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    teacher_epochs = [json.loads(line) for line in (out / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in teacher_epochs if m.get("stage") == "teacher"]) == 1  # one epoch, trained once
    study = _study(out)
    assert len(counted(study, 4)) == 4
    best = [re.search(r"tune distilled: best validation accuracy \S+ \(trial (\d+)", x) for x in logs]
    assert all(best) and best[0].group(1) == best[1].group(1) == str(json.loads((out / "summary.json").read_text())["distilled"]["best_trial"])
