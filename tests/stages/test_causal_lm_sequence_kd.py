"""Sequence-level KD through the causal-LM task: a student learns the teacher's generated text (also with another
tokenizer) and is tested on real text. Its own tiny-Llama fixture, so it is not in test_causal_lm.py."""

import pytest
import torch

import protege
from protege.api import generate_corpus
from protege.data import load_data
from protege.data.text import load_tokenizer
from protege.errors import DataError
from protege.recipe import parse_recipe

from ..log_capture import logged
from ..text_fixtures import write_llama_folder
from ..helpers import seq_lm, jsonl_rows as _rows


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return seq_lm(tmp_path_factory.mktemp("seq"))


def test_a_student_learns_the_teachers_text_and_is_tested_on_real_text(lm, tmp_path):
    gen = generate_corpus(lm["teacher"], lm["train"], tmp_path / "gen.jsonl", prompt_tokens=4, new_tokens=12)
    r = {"name": "seqkd", "task": "causal_lm",
         "data": {"source": "lm_text", "path": str(gen), "test_path": str(lm["test"]), "block_size": 16, "val_fraction": 0.2},
         "teacher": {"model": str(lm["teacher"])},
         "student": {"model": str(lm["teacher"]), "kwargs": {"pretrained": False, "num_hidden_layers": 1}},
         "distill": {"alpha": 1.0}, "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3}, "eval": {"threads": 1}}
    recipe = parse_recipe(r)
    data = load_data(recipe.data, 0)
    tok = load_tokenizer(str(lm["teacher"]))
    test_ids = [tok(t["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in _rows(lm["test"])]
    flat = torch.tensor(sum(test_ids, []))
    n = len(flat) // 16
    assert torch.equal(data.test.x, flat[: n * 16].view(n, 16))  # the whole test file, in order
    assert "test:" in data.description
    with pytest.raises(DataError, match="not found; set data.test_path"):
        load_data(parse_recipe({**r, "data": {**r["data"], "test_path": str(tmp_path / "none.jsonl")}}).data, 0)
    run = protege.distill(recipe, tmp_path / "run")
    assert run.report.student.test_tokens == n * 15 and run.report.student.test_ppl > 1


def test_a_student_with_another_tokenizer_learns_from_the_teachers_text(lm, tmp_path):
    from protege.errors import RecipeError


    student = write_llama_folder(tmp_path / "student", layers=1, shuffle_vocab=7, extra_words=10)  # other ids, past 27
    gen = generate_corpus(lm["teacher"], lm["train"], tmp_path / "gen.jsonl", prompt_tokens=4, new_tokens=12)
    r = {"name": "xtok", "task": "causal_lm",
         "data": {"source": "lm_text", "path": str(gen), "test_path": str(lm["test"]), "tokenizer": str(student),
                  "block_size": 16, "val_fraction": 0.2},
         "teacher": {"model": str(lm["teacher"])}, "student": {"model": str(student), "kwargs": {"pretrained": False}},
         "distill": {"alpha": 1.0}, "train": {"epochs": 1, "batch_size": 8, "lr": 3e-3}, "eval": {"threads": 1}}
    seen = []
    with logged(seen):
        run = protege.distill(parse_recipe(r), tmp_path / "run")
    rep = run.report
    assert any("another tokenizer" in line for line in seen)
    assert rep.teacher.test_ppl is None and "not comparable" in rep.teacher.note
    assert rep.student.test_ppl > 1 and rep.teacher.tokens_per_s > 0
    first = load_data(parse_recipe(r).data, 0).train.x[0].tolist()  # the corpus in the student's ids
    words = load_tokenizer(str(student)).decode(first).split()  # a teacher-written text (16 tokens + <eos> each), read back
    assert len(words) == 16 and any(row["text"].split() == words for row in _rows(gen))
    assert protege.evaluate(run.path).teacher.test_ppl is None
    # any use of the teacher's logits or weights with another tokenizer stays an error
    for over in ({"distill": {"alpha": 0.5}}, {"student": {**r["student"], "init": "select"}}):
        with pytest.raises(RecipeError, match="has its own tokenizer"):
            protege.distill(parse_recipe({**r, **over}), tmp_path / "bad")
        assert not (tmp_path / "bad").exists()
