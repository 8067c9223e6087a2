"""ULD across tokenizers on tiny Llamas: the training blocks re-tokenised for the teacher, the positions paired,
the pipeline end to end with a student of another tokenizer, and the recipe errors. One suite with its own
tiny-Llama fixture (not the one of test_causal_lm.py)."""
import json

import pytest
import torch

import protege
from protege.data import load_data
from protege.data.lm import retokenize
from protege.data.text import load_tokenizer
from protege.errors import RecipeError
from protege.losses import token as T
from protege.recipe import parse_recipe
from protege.train.lm_distiller import LMDistiller

from ..log_capture import logged
from ..text_fixtures import write_corpus, write_llama_folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("uld")
    return {"teacher": write_llama_folder(root / "teacher"), "student": write_llama_folder(root / "student", layers=1, shuffle_vocab=7, extra_words=10),
            "corpus": write_corpus(root / "corpus.jsonl", docs=8, sentences=15)}


def _recipe(lm, **over) -> dict:
    r = {"name": "uld", "task": "causal_lm",
         "data": {"source": "lm_text", "path": str(lm["corpus"]), "tokenizer": str(lm["student"]), "block_size": 16,
                  "val_fraction": 0.2, "test_fraction": 0.2},
         "teacher": {"model": str(lm["teacher"])},
         "student": {"model": str(lm["student"]), "kwargs": {"pretrained": False}},
         "distill": {"response": "uld", "alpha": 0.5, "temperature": 1.0},
         "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3}, "eval": {"threads": 1}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def test_retokenize_gives_the_same_text_in_the_other_tokenizer(lm):
    src, dst = load_tokenizer(str(lm["student"])), load_tokenizer(str(lm["teacher"]))
    text = ["the king went to the city .", "a man came to the land ."]
    row = src(text[0])["input_ids"] + [src.eos_token_id] + src(text[1])["input_ids"]
    ids, lengths = retokenize(torch.tensor([row, row]), src, dst, length=len(row) + 3)
    want = dst(text[0])["input_ids"] + [dst.eos_token_id] + dst(text[1])["input_ids"]
    assert want != row  # other ids for the same words
    assert ids[0, : len(want)].tolist() == want and int(lengths[0]) == len(want)
    assert ids[0, len(want):].tolist() == [dst.pad_token_id] * 3
    short, lengths = retokenize(torch.tensor([row]), src, dst, length=4)
    assert short[0].tolist() == want[:4] and int(lengths[0]) == 4
    trailing, lengths = retokenize(torch.tensor([row + [src.eos_token_id]]), src, dst, length=len(row) + 1)
    assert trailing[0].tolist() == want + [dst.eos_token_id]


def test_the_distiller_pairs_the_teachers_own_tokenisation_position_by_position(lm):
    r = parse_recipe(_recipe(lm))
    data = load_data(r.data, 0)
    teacher = protege.models.build_model(r.teacher, data.input_shape, data.num_classes, data.model_args).eval()
    student = protege.models.build_model(r.student, data.input_shape, data.num_classes, data.model_args)
    t_ids = retokenize(data.train.x, load_tokenizer(str(lm["student"])), load_tokenizer(str(lm["teacher"])), 16)
    t_ids[1][1] = 9  # a shorter teacher text for block 1: only its first 8 positions count
    idx = torch.tensor([0, 1])
    x = data.train.x[idx]
    got = LMDistiller(r.distill, teacher, None, teacher_ids=t_ids)(student, x, x, idx)
    logits = student(x)
    with torch.no_grad():
        t_logits = teacher(t_ids[0][idx])
    mask = torch.ones(2, 15, dtype=torch.bool)
    mask[1, 8:] = False
    want = T.uld(logits[:, :15], t_logits[:, :15], mask=mask).detach()
    assert float(got["kd"].detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(got["loss"].detach()) == pytest.approx(0.5 * float(got["ce"].detach()) + 0.5 * float(want), rel=1e-5)


def test_uld_pipeline_with_a_student_of_another_tokenizer(lm, tmp_path, monkeypatch):
    # the student's corpus ids run past the teacher's vocabulary (10 unused words first): the teacher must only ever
    # read its own ids, so every teacher input is checked against its tokenisation of the training blocks
    from protege.models.lm import CausalLM

    r = parse_recipe(_recipe(lm, train={"epochs": 2}))
    data = load_data(r.data, 0)
    assert int(data.train.x.max()) >= 27  # ids a 27-token teacher cannot read
    own = retokenize(data.train.x, load_tokenizer(str(lm["student"])), load_tokenizer(str(lm["teacher"])), 16)[0]
    fed, forward = [], CausalLM.forward

    def spy(self, ids):
        if self.config.vocab_size == 27:
            fed.append(ids)
        return forward(self, ids)

    monkeypatch.setattr(CausalLM, "forward", spy)
    seen = []
    with logged(seen):
        run = protege.distill(r, tmp_path / "run")
    assert any("ULD feeds it each training block re-tokenised" in line for line in seen)
    assert fed and all(any(torch.equal(row, o) for o in own) for ids in fed for row in ids)
    rep = run.report
    assert rep.teacher.test_ppl is None and rep.speedup_generation is None and rep.student.test_ppl > 1
    rows = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and all(0 < row["kd"] <= 2 for row in rows)


def test_uld_with_one_tokenizer_feeds_the_teacher_the_same_ids(lm, tmp_path):
    r = parse_recipe(_recipe(lm, data={"tokenizer": str(lm["teacher"])},
                             student={"model": str(lm["teacher"]), "kwargs": {"pretrained": False, "num_hidden_layers": 1}}))
    run = protege.distill(r, tmp_path / "run")
    assert run.report.teacher.test_ppl > 1 and run.report.speedup_generation > 0  # comparable: measured
    assert '"kd"' in run.metrics_path.read_text()


@pytest.mark.parametrize("over, match", [
    ({"distill": {"response": "uld", "topk": 8}}, "distill: response uld .*remove topk"),
    ({"distill": {"response": "uld", "on_policy": 0.5}}, "distill: response uld .*remove topk, topk_cache and on_policy"),
    ({"distill": {"response": "uld", "topk_cache": "/tmp/cache"}}, "distill: response uld .*remove topk, topk_cache"),
])
def test_uld_recipe_errors(lm, over, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(_recipe(lm, **over))


def test_uld_is_for_language_models_and_init_still_needs_one_tokenizer(lm, tmp_path):
    with pytest.raises(RecipeError, match="'distill.response' is 'uld', which is for task: causal_lm"):
        parse_recipe({"name": "x", "data": {"source": "digits"}, "teacher": {"model": "cnn", "train": {"epochs": 1}},
                      "student": {"model": "mlp"}, "distill": {"response": "uld"}})
    with pytest.raises(RecipeError, match="has its own tokenizer.*student.init copies the teacher's embeddings"):
        protege.distill(parse_recipe(_recipe(lm, student={"init": "select"})), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
