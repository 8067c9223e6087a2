"""Causal-LM distillation on tiny Llama configs: the corpus split, the top-k teacher cache, the token-level
Distiller (cached, live, on-policy), layer initialisation, the whole pipeline, and bad input."""
import json

import pytest
import torch

import protege
from protege.data import load_data
from protege.errors import DataError, ModelError, RecipeError
from protege.knowledge.topk import load_or_build_topk
from protege.losses import token as T
from protege.recipe import parse_recipe

from .text_fixtures import write_corpus, write_llama_folder
from .log_capture import logged


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {"teacher": write_llama_folder(root / "teacher"), "corpus": write_corpus(root / "corpus.jsonl"), "root": root}


def _recipe(lm, **over) -> dict:
    r = {"name": "lm", "task": "causal_lm",
         "data": {"source": "lm_text", "path": str(lm["corpus"]), "block_size": 32, "val_fraction": 0.2, "test_fraction": 0.2},
         "teacher": {"model": str(lm["teacher"])},
         "student": {"model": str(lm["teacher"]), "kwargs": {"pretrained": False, "num_hidden_layers": 2}},
         "distill": {"response": "forward_kl", "temperature": 1.0, "alpha": 0.5},
         "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3}, "eval": {"threads": 1}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def test_corpus_is_split_by_document_and_cut_into_blocks(lm):
    d = load_data(parse_recipe(_recipe(lm)).data, 0)
    assert d.is_lm and d.train.x.shape[1] == 32 and d.train.x.dtype == torch.int64
    assert torch.equal(d.train.x, d.train.y)  # labels are the ids, shifted inside the loss
    # 12 documents: 2 test, 2 validation, 8 train, whole documents each (about 7 blocks of 32 per document)
    assert len(d.test) < len(d.train) and len(d.val) < len(d.train)
    assert (d.train.x == 1).sum() >= 7  # <eos> joins the training documents
    limited = load_data(parse_recipe(_recipe(lm, data={"limit": 10})).data, 0)
    assert len(limited.train) == 10 and torch.equal(limited.test.x, d.test.x)


@pytest.mark.parametrize("over, match", [
    ({"data": {"block_size": 4096}}, "fewer than data.block_size"),
    ({"data": {"path": "/nonexistent/corpus.jsonl"}}, "not found"),
])
def test_bad_corpus_settings(lm, over, match):
    with pytest.raises(DataError, match=match):
        load_data(parse_recipe(_recipe(lm, **over)).data, 0)


def test_a_corpus_of_too_few_documents_is_refused(lm, tmp_path):
    path = write_corpus(tmp_path / "two.jsonl", docs=2)
    with pytest.raises(DataError, match="needs at\\s+least 3"):
        load_data(parse_recipe(_recipe(lm, data={"path": str(path)})).data, 0)


@pytest.mark.parametrize("over, match", [
    ({"data": {"source": "text"}}, "causal_lm goes with data.source: lm_text"),
    ({"distill": {"response": "mse_prob"}}, "for classification"),
    ({"quantize": {"mode": "dynamic"}}, "remove prune, quantize"),
])
def test_recipe_errors_for_lm_tasks(lm, over, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(_recipe(lm, **over))
    with pytest.raises(RecipeError, match="for task: causal_lm"):
        parse_recipe({"teacher": {"model": "mlp", "train": {}}, "student": {"model": "mlp"}, "distill": {"topk": 8}})


def test_blocks_longer_than_the_model_reads_are_refused_before_anything_is_written(lm, tmp_path):
    r = parse_recipe(_recipe(lm, data={"block_size": 200}))  # the fixture Llama has 128 positions
    with pytest.raises(RecipeError, match="reads at most 128 tokens but data.block_size gives 200"):
        protege.distill(r, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def _teacher_and_data(lm):
    from protege.models import build_model

    d = load_data(parse_recipe(_recipe(lm)).data, 0)
    r = parse_recipe(_recipe(lm))
    return build_model(r.teacher, d.input_shape, d.num_classes, d.model_args).eval(), d


def test_topk_cache_holds_the_teachers_top_tokens_and_is_keyed(lm, tmp_path):
    teacher, d = _teacher_and_data(lm)
    key = {"teacher": "abc", "data": d.fingerprint()}
    cache = load_or_build_topk(tmp_path / "c", key, teacher, d.train.x, 5, 2.0)
    idx = torch.tensor([3, 0, 7])
    ids, buckets = cache.get(idx)
    with torch.no_grad():
        full = torch.log_softmax(teacher(d.train.x[idx]).float() / 2.0, -1)
    top = full.topk(5, -1)
    assert torch.equal(ids, top.indices)  # in the caller's order, not sorted
    assert torch.allclose(buckets[..., :5], top.values, atol=2e-3)  # fp16 log-probabilities
    assert torch.allclose(buckets[..., 5].exp(), 1 - top.values.exp().sum(-1), atol=2e-3)  # the tail: the rest, exactly
    assert torch.allclose(buckets.exp().sum(-1), torch.ones(3, 32), atol=1e-5)
    assert cache.nbytes() < cache.full_bytes() and 0 < cache.tail_mass() < 1
    messages = []
    with logged(messages):
        load_or_build_topk(tmp_path / "c", {**key, "teacher": "other"}, teacher, d.train.x, 5, 2.0)
    assert "another teacher" in messages[0] and "rebuilding" in messages[0]
    with pytest.raises(DataError, match="made for another corpus"):
        load_or_build_topk(tmp_path / "c", {**key, "teacher": "other", "data": "x"}, teacher, d.train.x, 5, 2.0, strict=True)
    with pytest.raises(DataError, match="blocks of shape"):  # same tokens cut into other blocks
        load_or_build_topk(tmp_path / "c", {**key, "teacher": "other"}, teacher, d.train.x.reshape(-1, 16), 5, 2.0, strict=True)
    with pytest.raises(DataError, match="lower distill.topk"):
        load_or_build_topk(tmp_path / "big", key, teacher, d.train.x, 10_000, 1.0)


def test_the_lm_distiller_matches_the_pure_loss_and_masks_the_prompt_on_policy(lm, monkeypatch):
    from protege.train.lm_distiller import LMDistiller
    from protege.models import build_model

    teacher, d = _teacher_and_data(lm)
    r = parse_recipe(_recipe(lm, distill={"response": "reverse_kl", "alpha": 0.3}))
    student = build_model(r.student, d.input_shape, d.num_classes, d.model_args)  # random weights: KD is not 0
    x, idx = d.train.x[:4], torch.arange(4)
    out = {k: float(v.detach()) for k, v in LMDistiller(r.distill, teacher, None)(student, x, x, idx).items()}
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert out["kd"] == pytest.approx(float(T.token_kd(s, t, "reverse_kl")), rel=1e-5) and out["kd"] > 0.01
    assert out["kd"] != pytest.approx(float(T.token_kd(s, t, "forward_kl")), rel=1e-3)  # the direction matters
    assert out["loss"] == pytest.approx(0.3 * out["ce"] + 0.7 * out["kd"], rel=1e-5)
    # on-policy: the student's continuation after the prompt, scored by the teacher on generated positions only
    on = parse_recipe(_recipe(lm, distill={"on_policy": 1.0, "prompt_tokens": 8}))
    generated = torch.randint(0, d.num_classes, x.shape)
    generated[:, :8] = x[:, :8]
    monkeypatch.setattr(type(student), "generate", lambda self, prompt, n, sample=True: generated)
    res = LMDistiller(on.distill, teacher, None)(student, x, x, idx)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, 7:-1] = True
    with torch.no_grad():
        expected = T.token_kd(student(generated), teacher(generated), "forward_kl", mask=mask)
    assert float(res["on_policy"]) == 1.0 and float(res["kd"].detach()) == pytest.approx(float(expected), rel=1e-5)
    off = parse_recipe(_recipe(lm, distill={"on_policy": 0.5}))
    share = sum(LMDistiller(off.distill, teacher, None).on_policy_step(torch.tensor([i, i + 1])) for i in range(400)) / 400
    assert 0.4 < share < 0.6  # about half the batches, the same ones on every run (a function of seed and batch)


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(lm, tmp_path):
    from safetensors.torch import load_file

    from protege.models import build_model, load_weights, save_weights

    teacher, d = _teacher_and_data(lm)
    save_weights(teacher, tmp_path / "w.safetensors")
    keys = set(load_file(str(tmp_path / "w.safetensors")))
    assert "model.model.embed_tokens.weight" in keys and "model.lm_head.weight" not in keys
    fresh = build_model(parse_recipe(_recipe(lm)).student.model_copy(update={"kwargs": {"pretrained": False}}),
                        d.input_shape, d.num_classes, d.model_args)
    load_weights(fresh, tmp_path / "w.safetensors")
    assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight
    assert torch.equal(fresh.model.lm_head.weight, teacher.model.lm_head.weight)


def test_student_initialised_from_every_other_teacher_layer(lm):
    from protege.models import build_model
    from protege.train.init import init_from_teacher_

    teacher, d = _teacher_and_data(lm)
    spec = parse_recipe(_recipe(lm)).student
    student = build_model(spec, d.input_shape, d.num_classes, d.model_args)
    rep = init_from_teacher_(student, teacher, "select")
    assert [t for _, t in rep.mapping] == ["model.model.layers.0", "model.model.layers.2"]
    assert torch.equal(student.model.model.layers[1].mlp.up_proj.weight, teacher.model.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(student.model.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight)
    narrow = build_model(spec.model_copy(update={"kwargs": {"pretrained": False, "hidden_size": 16}}), d.input_shape,
                         d.num_classes, d.model_args)
    with pytest.raises(ModelError, match="change only num_hidden_layers"):
        init_from_teacher_(narrow, teacher, "select")


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


def test_convert_gguf_refuses_other_files(tmp_path):
    from protege.models.lm import convert_gguf

    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        convert_gguf(f, tmp_path / "out")


def test_evaluate_remeasures_an_lm_run_and_export_writes_checked_onnx_and_int8(lm, tmp_path):
    r = parse_recipe(_recipe(lm, train={"epochs": 1}))
    run = protege.distill(r, tmp_path / "run")
    rep = protege.evaluate(run.path)
    assert rep["student"]["test_ppl"] == pytest.approx(run.report["student"]["test_ppl"])
    assert "onnx" not in rep
    seen = []
    with logged(seen):
        assert protege.export_onnx(run.path) == run.onnx_path
    assert run.int8_path.is_file() and any("max |ONNX - PyTorch|" in line for line in seen)
    rep = json.loads(run.report_path.read_text())
    # the ONNX file scores the test blocks as PyTorch does; int8 weights move the perplexity a little, not wildly
    assert rep["onnx"]["test_ppl"] == pytest.approx(rep["student"]["test_ppl"], rel=1e-4)
    assert rep["onnx"]["test_tokens"] == rep["student"]["test_tokens"]
    assert abs(rep["int8"]["test_ppl"] / rep["student"]["test_ppl"] - 1) < 0.2 and rep["int8"]["bytes"] < rep["onnx"]["bytes"]
    assert rep["onnx"]["ms_per_block_b1"] > 0 and rep["student"]["ms_per_block_b1"] > 0
    assert protege.evaluate(run.path)["int8"]["test_ppl"] == pytest.approx(rep["int8"]["test_ppl"], rel=1e-6)
    with pytest.raises(RecipeError, match="for classification runs.*protege export"):
        protege.compress(run.path, quantize=protege.QuantizeConfig(mode="dynamic"))
