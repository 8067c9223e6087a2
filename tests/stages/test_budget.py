"""`protege compress RUN --max-latency-ms / --max-bytes`: every candidate (pruning ratio x fp32/static/dynamic) measured,
the most accurate on validation within the budget kept, the Pareto front, a budget nobody meets, and bad options."""
from __future__ import annotations

import json

import pytest

from protege.compress.budget import BudgetConfig, choose

from ..helpers import assert_clean_error, copy_run, file_digests, run_cli


def _cands(**kw):
    return {n: {"val_accuracy": a, "bytes": b, "latency_ms_b1": t} for n, (a, b, t) in kw.items()}


def test_choose_keeps_the_most_accurate_candidate_within_the_budget():
    c = _cands(big=(0.95, 9000, 2.0), mid=(0.93, 5000, 1.0), small=(0.90, 2000, 0.5), same=(0.93, 5000, 0.8))
    assert choose(c, BudgetConfig(max_latency_ms=1.5)) == ("same", "most accurate on validation within the budget")
    assert choose(c, BudgetConfig(max_bytes=2500))[0] == "small"
    assert choose(c, BudgetConfig(max_latency_ms=3, max_bytes=10_000))[0] == "big"
    assert choose(c, BudgetConfig(max_latency_ms=0.9, max_bytes=4000))[0] == "small"
    assert choose(c, BudgetConfig(max_latency_ms=0.1)) == (None, "small")  # none fits: the closest is named


@pytest.fixture(scope="module")
def searched(finished, tmp_path_factory):
    run = copy_run(finished, tmp_path_factory.mktemp("budget") / "run")
    own = file_digests(run)
    from protege import api

    result = api.compress_cli(run, prune={"finetune_epochs": 1}, quantize={}, budget={"max_bytes": 10**9, "ratios": ["0.5"]})
    return {"run": run, "own": own, "result": result}


def test_every_candidate_is_measured_and_the_most_accurate_within_budget_is_kept(searched):
    run, result = searched["run"], searched["result"]
    saved = json.loads((run / "budget" / "budget.json").read_text())
    assert saved["chosen"] == result["chosen"]
    cands = saved["candidates"]
    assert set(cands) == {f"{n}/{m}" for n in ("unpruned", "pruned50") for m in ("fp32", "static", "dynamic")}
    best = max(cands.values(), key=lambda c: c["val_accuracy"])["val_accuracy"]
    assert cands[saved["chosen"]]["val_accuracy"] == best  # every candidate fits a budget of 1 GB
    chosen_file = run / cands[saved["chosen"]]["file"]
    assert (run / "student.budget.onnx").read_bytes() == chosen_file.read_bytes()
    for c in cands.values():
        assert (run / c["file"]).stat().st_size == c["bytes"] and c["latency_ms_b1"] > 0 and 0 <= c["test_accuracy"] <= 1
    pts = {n: (c["latency_ms_b1"], c["val_accuracy"]) for n, c in cands.items()}
    for n, (x, y) in pts.items():  # the front: exactly the candidates no other is at least as fast and as accurate as
        dominated = any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for m, (x2, y2) in pts.items() if m != n)
        assert (n in saved["pareto_front"]) == (not dominated), n
    pruned = json.loads((run / "budget" / "pruned50" / "report.json").read_text())
    params = {st["name"]: st["params"] for st in pruned["stages"]}
    assert params["pruned"] < params["student"]  # the candidate really was pruned
    html = (run / "budget" / "report.html").read_text()
    assert all(n in html for n in cands) and 'id="plot-budget"' in html
    after = file_digests(run)
    assert {k: v for k, v in after.items() if k in searched["own"] and not k.startswith(("manifest", ".protege"))} == \
        {k: v for k, v in searched["own"].items() if not k.startswith(("manifest", ".protege"))}  # the run's own files


def test_a_budget_nobody_meets_names_the_closest_and_keeps_the_earlier_result(searched, capsys):
    run = searched["run"]
    before = {p: (run / p).read_bytes() for p in ("budget/budget.json", "student.budget.onnx")}
    candidate = (run / "budget" / "pruned50" / "report.json").stat().st_mtime_ns
    smallest = min(searched["result"]["candidates"].items(), key=lambda kv: kv[1]["bytes"])
    code, err = run_cli(["compress", run, "--max-bytes", smallest[1]["bytes"] - 1, "--ratios", "0.5", "--finetune-epochs", "1"], capsys)
    assert_clean_error(code, err, "no candidate meets the budget", f"the closest, {smallest[0]}", "failed.json")
    assert {p: (run / p).read_bytes() for p in before} == before
    assert json.loads((run / "budget" / "failed.json").read_text())["chosen"] is None
    assert (run / "budget" / "pruned50" / "report.json").stat().st_mtime_ns == candidate  # reused, not trained again


@pytest.mark.parametrize("args, words", [
    (["--max-bytes", "5000", "--prune", "0.5"], ["--prune", "budget", "--ratios"]),
    (["--max-bytes", "5000", "--quantize", "static"], ["--quantize", "budget"]),
    (["--max-bytes", "5000", "--ratios", "1.5"], ["--ratios", "1.5", "between 0 and 1"]),
    (["--max-bytes", "5000", "--budget-batch", "8"], ["--budget-batch", "1", "32"]),
    (["--ratios", "0.5"], ["--max-latency-ms", "--max-bytes"]),
    (["--max-latency-ms", "0"], ["--max-latency-ms", "greater than 0"]),
])
def test_bad_budget_options_are_one_line_errors(finished, tmp_path, capsys, args, words):
    run = copy_run(finished, tmp_path / "run")
    before = file_digests(run)
    code, err = run_cli(["compress", run, *args], capsys)
    assert_clean_error(code, err, *words)
    assert file_digests(run) == before and not (run / "budget").exists()
