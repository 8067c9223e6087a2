"""The causal-LM task (protege.stages.causal_lm) on a tiny Llama: recipe checks for the task, the whole pipeline,
validation perplexity, and evaluate and export of an LM run."""
import json

import pytest

import protege
from protege.errors import RecipeError
from protege.recipe import parse_recipe
from protege.run import Run

from ..log_capture import logged
from ..helpers import lm_recipe as _recipe


@pytest.mark.parametrize("over, match", [
    ({"data": {"source": "text"}}, "causal_lm goes with data.source: lm_text"),
    ({"distill": {"response": "mse_prob"}}, "'distill.response' is 'mse_prob', which is for task: classify"),
    ({"distill": {"features": [{"loss": "cosine", "student": "hidden.1", "teacher": "hidden.1"}]}},
     "'distill.features' is for task: classify, not for task: causal_lm"),
    ({"distill": {"generations": 2}}, "'distill.generations' is for task: classify"),
    ({"quantize": {"mode": "dynamic"}}, "remove prune, quantize"),
])
def test_recipe_errors_for_lm_tasks(lm, over, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(_recipe(lm, **over))
    with pytest.raises(RecipeError, match="'distill.topk' is for task: causal_lm, not for task: classify"):
        parse_recipe({"teacher": {"model": "mlp", "train": {}}, "student": {"model": "mlp"}, "distill": {"topk": 8}})


def test_blocks_longer_than_the_model_reads_are_refused_before_anything_is_written(lm, tmp_path):
    r = parse_recipe(_recipe(lm, data={"block_size": 200}))  # the fixture Llama has 128 positions
    with pytest.raises(RecipeError, match="reads at most 128 tokens but data.block_size gives 200"):
        protege.distill(r, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()


@pytest.mark.parametrize("response", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_lm_pipeline_end_to_end(lm, tmp_path, response):
    r = parse_recipe(_recipe(lm, distill={"response": response, "topk": 6, "beta": 0.3}, student={"init": "select"}))
    run = protege.distill(r, tmp_path / "run")
    rep = json.loads(run.report_path.read_text())
    assert rep["task"] == "causal_lm" and rep["student"]["params"] < rep["teacher"]["params"]
    assert rep["student"]["tokens_per_s"] > 0 and rep["student"]["test_ppl"] > 1
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("val_ppl" in r and "kd" in r for r in rows)
    cfg = json.loads((run.path / "student" / "config.json").read_text())
    best = min(rows, key=lambda r: r["val_loss"])  # the validation-selected epoch is the one kept
    assert cfg["best_epoch"] == best["epoch"] and cfg["best_val_loss"] == pytest.approx(best["val_loss"])
    assert (run.path / "teacher_cache" / "top6" / "meta.json").is_file()
    # resuming a finished run reuses the cache and the checkpoint instead of recomputing
    again = protege.distill(r, tmp_path / "run", resume=True)
    assert json.loads(again.report_path.read_text())["student"]["test_ppl"] == pytest.approx(rep["student"]["test_ppl"])


def test_lm_training_lowers_validation_perplexity(lm, tmp_path):
    r = parse_recipe(_recipe(lm, train={"epochs": 3, "lr": 1e-2}, distill={"alpha": 1.0}))
    run = protege.distill(r, tmp_path / "run")
    ppl = [json.loads(line)["val_ppl"] for line in run.metrics_path.read_text().splitlines()]
    assert ppl[-1] < 0.7 * 27  # below a uniform guess over the 27-token vocabulary by a wide margin


def test_evaluate_remeasures_an_lm_run_and_export_writes_checked_onnx_and_int8(lm, tmp_path):
    r = parse_recipe(_recipe(lm, train={"epochs": 1}))
    run = protege.distill(r, tmp_path / "run")
    rep = protege.evaluate(run.path)
    assert rep.student.test_ppl == pytest.approx(run.report.student.test_ppl)
    assert rep.onnx is None and "onnx" not in rep.to_json()
    seen = []
    with logged(seen):
        assert protege.export_onnx(run.path) == run.onnx_path
    assert run.int8_path.is_file() and any("max |ONNX - PyTorch|" in line for line in seen)
    rep = Run.load(run.path).report  # report.json, read back
    # the ONNX file scores the test blocks as PyTorch does; int8 weights move the perplexity a little, not wildly
    assert rep.onnx.test_ppl == pytest.approx(rep.student.test_ppl, rel=1e-4)
    assert rep.onnx.test_tokens == rep.student.test_tokens
    assert abs(rep.int8.test_ppl / rep.student.test_ppl - 1) < 0.2 and rep.int8.bytes < rep.onnx.bytes
    assert rep.onnx.ms_per_block_b1 > 0 and rep.student.ms_per_block_b1 > 0
    assert protege.evaluate(run.path).int8.test_ppl == pytest.approx(rep.int8.test_ppl, rel=1e-6)
    with pytest.raises(RecipeError, match="for classification runs.*protege export"):
        protege.compress(run.path, quantize=protege.QuantizeConfig(mode="dynamic"))
