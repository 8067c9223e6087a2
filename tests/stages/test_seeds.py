"""`protege distill --seeds N --baseline`: per-seed runs that share the split and the teacher, matched labels-only
students, the summary's figures checked against each run's own files, resume, and bad input."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from protege import api
from protege.evaluate.compare import paired, summarise, verdict
from protege.knowledge import predict_logits
from protege.run import Run
from protege.stages.tasks import load_run_data

from ..helpers import assert_clean_error, run_cli, tiny_recipe_file


def test_paired_difference_and_verdict():
    d = paired([0.90, 0.92, 0.91], [0.88, 0.90, 0.90])
    assert d["diffs"] == pytest.approx([0.02, 0.02, 0.01])
    assert d["mean"] == pytest.approx(0.05 / 3) and d["std"] == pytest.approx(0.005773503)
    half = 4.302653 * 0.005773503 / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert d["ci95"] == pytest.approx([0.05 / 3 - half, 0.05 / 3 + half], rel=1e-5)
    assert verdict(d).startswith("distillation helped: +1.67 ± 0.58 points over 3 seeds")
    mixed = paired([0.90, 0.89, 0.91], [0.89, 0.90, 0.90])
    assert verdict(mixed).startswith("no measurable gain from distillation: +0.33")
    assert verdict(paired([0.80, 0.81], [0.90, 0.905])).startswith("distillation hurt: -9.75")
    assert verdict(paired([0.9], [0.8])).startswith("one seed: distillation +10.00 points")
    same = paired([0.9030, 0.9130], [0.9000, 0.9100])  # +0.3 points each: no spread, but under one of 100 examples
    assert verdict(same).startswith("distillation helped") and "less than one of 100" in verdict(same, test_examples=100)
    s = summarise([{"seed": 0, "distilled": {"test_accuracy": 0.9, "last_epoch_test_accuracy": 0.8}, "baseline": None}])
    assert "difference" not in s and s["distilled"]["last_epoch"]["mean"] == pytest.approx(0.8)


def _last_epoch_accuracy(folder, data) -> float:
    """The student's last-epoch test accuracy, read straight from its checkpoint file (not through protege's loader)."""
    run = Run.load(folder)
    student = run.load_student(data)
    with safe_open(str(folder / "student" / "checkpoints" / "last.safetensors"), framework="pt") as f:
        student.load_state_dict({k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")})
    logits = predict_logits(student, data.test.x)
    return float((logits.argmax(-1) == data.test.y).float().mean())


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    recipe = tiny_recipe_file(tmp, lambda r: r["train"].update(epochs=3))
    out = tmp / "out"
    api.distill_file(recipe, out, seeds=2, baseline=True)
    return {"recipe": recipe, "out": out}


def test_every_seed_has_a_distilled_and_a_matched_baseline_run(seeds_run):
    out = seeds_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1]
    first_teacher = (out / "distilled" / "seed0" / "teacher" / "model.safetensors").resolve()
    for seed in (0, 1):
        d, b = Run.load(out / "distilled" / f"seed{seed}"), Run.load(out / "baseline" / f"seed{seed}")
        assert d.recipe.seed == b.recipe.seed == seed
        assert d.recipe.data.split_seed == b.recipe.data.split_seed == 0  # one split for every seed
        assert b.recipe.distill.alpha == 1.0 and not b.recipe.distill.features  # labels only
        assert d.recipe.distill.alpha == 0.5
        # the two runs of a seed differ in the distillation fields only (same seed, data, student, training)
        dd, bd = d.recipe.model_dump(), b.recipe.model_dump()
        for key in ("student", "train", "data", "seed", "eval"):
            assert dd[key] == bd[key], key
        if seed > 0:  # later runs load the first run's teacher instead of training their own
            assert d.recipe.teacher.train is None and b.recipe.teacher.train is None
            assert d.recipe.teacher.weights == b.recipe.teacher.weights == str(first_teacher)
            assert not (out / "distilled" / f"seed{seed}" / "teacher" / "model.safetensors").exists()
        assert not (out / "distilled" / f"seed{seed}" / "teacher_cache").exists()  # the seeds share one (below)
        row = summary["runs"][seed]
        assert row["distilled"]["test_accuracy"] == pytest.approx(d.report.student.accuracy)
        assert row["baseline"]["test_accuracy"] == pytest.approx(b.report.student.accuracy)
        assert row["distilled"]["teacher_test_accuracy"] == pytest.approx(summary["runs"][0]["distilled"]["teacher_test_accuracy"])
    shared = [p for p in (out / "teacher_cache").iterdir() if p.is_dir()]  # same split and teacher: one cache for all
    assert len(shared) == 1 and (shared[0] / "meta.json").is_file()


def test_the_summary_figures_come_from_the_runs(seeds_run):
    out = seeds_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    data = load_run_data(Run.load(out / "distilled" / "seed0").recipe)
    for kind in ("distilled", "baseline"):
        tests = [r[kind]["test_accuracy"] for r in summary["runs"]]
        lasts = [_last_epoch_accuracy(out / kind / f"seed{r['seed']}", data) for r in summary["runs"]]
        assert [r[kind]["last_epoch_test_accuracy"] for r in summary["runs"]] == pytest.approx(lasts, abs=1e-6)
        assert summary[kind]["val_selected"]["mean"] == pytest.approx(sum(tests) / 2)
        assert summary[kind]["last_epoch"]["mean"] == pytest.approx(sum(lasts) / 2, abs=1e-6)
    diffs = [r["distilled"]["test_accuracy"] - r["baseline"]["test_accuracy"] for r in summary["runs"]]
    assert summary["difference"]["val_selected"]["diffs"] == pytest.approx(diffs)
    assert summary["verdict"] == verdict(summary["difference"]["val_selected"], test_examples=len(data.test))
    html = (out / "report.html").read_text()
    assert html.count('class="seed-point"') == 4 and summary["verdict"].split(":")[0] in html


def test_resume_reuses_finished_seeds_and_a_second_start_is_refused(seeds_run, capsys):
    out = seeds_run["out"]
    weights = out / "baseline" / "seed1" / "student" / "model.safetensors"
    before, summary = weights.stat().st_mtime_ns, (out / "summary.json").read_text()
    code, err = run_cli(["distill", seeds_run["recipe"], "--out", out, "--seeds", "2", "--baseline", "--resume"], capsys)
    assert code == 0, err
    assert weights.stat().st_mtime_ns == before  # not trained again
    assert json.loads((out / "summary.json").read_text())["runs"] == json.loads(summary)["runs"]
    code, err = run_cli(["distill", seeds_run["recipe"], "--out", out, "--seeds", "2", "--baseline"], capsys)
    assert_clean_error(code, err, "already holds a --seeds run", "--resume", "--overwrite")
    assert (out / "summary.json").read_text() == summary


@pytest.mark.parametrize("args, words", [
    (["--seeds", "0"], ["--seeds 0", "1 or more"]),
    (["--seeds", "-2"], ["--seeds -2", "1 or more"]),
    (["--set", "seeds=0"], ["seeds", "greater than or equal to 1"]),
])
def test_bad_seed_counts_are_one_line_errors(tmp_path, capsys, args, words):
    code, err = run_cli(["distill", tiny_recipe_file(tmp_path), "--out", tmp_path / "out", *args], capsys)
    assert_clean_error(code, err, *words)
    assert not (tmp_path / "out").exists()


def test_a_single_run_api_call_with_seeds_points_to_distill_seeds(tmp_path):
    import protege
    from protege.errors import RecipeError
    from protege.recipe import load_recipe

    r = load_recipe(tiny_recipe_file(tmp_path), ["seeds=3"])
    with pytest.raises(RecipeError, match="distill_seeds"):
        protege.distill(r, tmp_path / "out")


def test_an_ema_self_distillation_recipe_gets_a_labels_only_baseline(tmp_path):
    """The baseline of `teacher: {model: ema}` keeps the running average (reported as its teacher) but learns from labels
    only: its student is the same whatever the EMA decay, while the distilled students differ with it."""
    from protege.models.loading import read_state_dict

    def ema(decay):
        def edit(r):
            r["teacher"] = {"model": "ema"}
            r["distill"].update(alpha=0.5, ema_decay=decay)
        return edit

    outs = {}
    for decay in (0.5, 0.9):
        outs[decay] = tmp_path / f"out{decay}"
        api.distill_file(tiny_recipe_file(tmp_path, ema(decay), f"r{decay}.yaml"), outs[decay], seeds=1, baseline=True)
    summary = json.loads((outs[0.9] / "summary.json").read_text())
    assert summary["runs"][0]["baseline"]["test_accuracy"] > 0 and "verdict" in summary
    base = Run.load(outs[0.9] / "baseline" / "seed0")
    assert base.recipe.distill.alpha == 1.0 and base.recipe.teacher.model == "ema" and base.report.teacher.accuracy is not None
    students = {(d, k): read_state_dict(outs[d] / k / "seed0" / "student" / "model.safetensors")
                for d in outs for k in ("distilled", "baseline")}
    a, b = students[(0.5, "baseline")], students[(0.9, "baseline")]
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = students[(0.5, "distilled")], students[(0.9, "distilled")]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_run_another_process_holds_is_left_to_it_then_waited_for(tmp_path):
    """Several processes share one --seeds folder: a run whose folder another holder has locked is skipped, the
    others are trained, then that run is waited for and (its holder having left it unfinished) trained here."""
    import threading
    import time

    from protege.run import locked

    from ..log_capture import logged

    recipe, out = tiny_recipe_file(tmp_path), tmp_path / "out"
    held = out / "baseline" / "seed0"
    holding, stop, released, messages = threading.Event(), threading.Event(), [], []
    waiting = f"another process is training {held}; waiting for it"

    def other_process():  # holds baseline/seed0 until the seeds run waits for it, then lets go without writing
        with locked(held, "distill", create=True):
            holding.set()
            deadline = time.monotonic() + 600
            while not any(waiting in m for m in messages) and not stop.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
            released.append(time.time_ns())

    thread = threading.Thread(target=other_process, daemon=True)
    thread.start()
    assert holding.wait(30)
    try:
        with logged(messages):
            summary = api.distill_file(recipe, out, seeds=2, baseline=True, resume=True)  # (the folder holds a run: resume)
    finally:
        stop.set()  # (if the seeds run failed, the holder stops waiting for it)
        thread.join(timeout=60)
    taken = [i for i, m in enumerate(messages) if f"{held} is being trained by another process; taking the next run" in m]
    waited = [i for i, m in enumerate(messages) if waiting in m]
    assert taken and waited and taken[0] < waited[0]
    steps = [i for i, m in enumerate(messages) if re.match(r"seeds: \d/4 ", m)]  # a step per run finished here,
    assert len(steps) == 4 and steps[-1] > waited[0]  # the run waited for included (not counted when it was skipped)
    assert [r["seed"] for r in summary["runs"]] == [0, 1] and all(r["baseline"] for r in summary["runs"])
    others = [out / k / f"seed{s}" / "report.json" for k, s in (("distilled", 0), ("distilled", 1), ("baseline", 1))]
    assert all(p.stat().st_mtime_ns < released[0] for p in others)  # trained while the holder held baseline/seed0
    assert (held / "report.json").stat().st_mtime_ns > released[0]  # trained here once it let go
    assert Run.load(held).report.student.accuracy == pytest.approx(summary["runs"][0]["baseline"]["test_accuracy"])


def test_an_overwrite_does_not_share_a_seeds_folder(tmp_path, capsys):
    """--overwrite replaces runs other processes would read: it is refused while another process works in the folder,
    and a process joining a folder being overwritten is refused; one-line errors, nothing written."""
    from protege.run import joined

    recipe, out = tiny_recipe_file(tmp_path), tmp_path / "out"
    with joined(out):  # another process at work here
        code, err = run_cli(["distill", recipe, "--out", out, "--seeds", "2", "--baseline", "--overwrite"], capsys)
    assert_clean_error(code, err, str(out), "in use by another protege process", "wait for them to finish")
    with joined(out, alone=True):  # another process overwriting it
        code, err = run_cli(["distill", recipe, "--out", out, "--seeds", "2", "--baseline", "--resume"], capsys)
    assert_clean_error(code, err, str(out), "overwriting it", "--resume")
    assert not out.exists()  # nothing written (and the refused processes left no trace)


def test_two_processes_on_one_seeds_folder_share_its_runs(tmp_path):
    """The same --seeds command started twice at once (the second with --resume): both finish, every run is trained
    once, and both write the same figures."""
    import subprocess
    import time

    from ..conftest import PROTEGE

    recipe, out = tiny_recipe_file(tmp_path), tmp_path / "out"
    cmd = [PROTEGE, "distill", str(recipe), "--out", str(out), "--seeds", "2", "--baseline"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with open(logs[0], "w") as f1, open(logs[1], "w") as f2:  # (files, not pipes: a full pipe would stall a process)
        first = subprocess.Popen(cmd, stdout=f1, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120  # the second joins once the first has started the folder (as a user would)
        while not (out / "distilled").is_dir() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.Popen([*cmd, "--resume"], stdout=f2, stderr=subprocess.STDOUT)
        codes = first.wait(timeout=600), second.wait(timeout=600)
    texts = [p.read_text() for p in logs]
    assert codes == (0, 0), texts[0][-2000:] + texts[1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [0, 1]
    for kind in ("distilled", "baseline"):
        for seed in (0, 1):
            metrics = [json.loads(x) for x in (out / kind / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            epochs = [m["epoch"] for m in metrics if m.get("stage") == "student"]
            assert sorted(epochs) == [1, 2], (kind, seed, epochs)  # trained once: no epoch twice
            assert summary["runs"][seed][kind]["test_accuracy"] == pytest.approx(
                Run.load(out / kind / f"seed{seed}").report.student.accuracy)
    lines = [[x.strip() for x in text.splitlines() if x.strip().startswith(("distilled:", "baseline:"))] for text in texts]
    assert len(lines[0]) == 2 and lines[0] == lines[1]  # the summary each process printed


def test_a_process_started_without_resume_reuses_a_run_a_sharer_finished(seeds_run, tmp_path, monkeypatch):
    """A second process (started with --resume) can finish a run before the first process reaches it: the first,
    started without --resume, reuses it instead of refusing the folder or training it again."""
    import contextlib
    import importlib
    import shutil

    from ..helpers import file_digests
    from ..log_capture import logged

    teacher = seeds_run["out"] / "distilled" / "seed0" / "teacher" / "model.safetensors"  # (a fixed teacher: every
    # run's recipe is then the same whichever folder it is in)
    recipe = tiny_recipe_file(tmp_path, lambda r: r["teacher"].update(weights=str(teacher), train=None))
    ref, out = tmp_path / "ref", tmp_path / "out"
    api.distill_file(recipe, ref, seeds=2, baseline=True)
    seeds_mod = importlib.import_module("protege.stages.seeds")
    real_joined = seeds_mod.joined

    @contextlib.contextmanager
    def a_sharer_finishes_one(path, alone=False):
        with real_joined(path, alone):
            shutil.copytree(ref / "baseline" / "seed1", path / "baseline" / "seed1")  # finished by the other process
            yield

    monkeypatch.setattr(seeds_mod, "joined", a_sharer_finishes_one)
    messages: list[str] = []
    with logged(messages):
        summary = api.distill_file(recipe, out, seeds=2, baseline=True)  # (no resume: the folder was new)
    assert any(f"{out / 'baseline' / 'seed1'} is finished; reusing it" in m for m in messages)
    assert file_digests(out / "baseline" / "seed1") == file_digests(ref / "baseline" / "seed1")  # not trained again
    assert summary["runs"][1]["baseline"]["test_accuracy"] == pytest.approx(Run.load(ref / "baseline" / "seed1").report.student.accuracy)
    assert all((out / k / f"seed{s}" / "report.json").is_file() for k in ("distilled", "baseline") for s in (0, 1))
