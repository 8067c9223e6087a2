"""Sequence-level KD's corpus (protege.knowledge.sequences): the teacher continues prompts from real text,
seeded and resumably, and bad settings are refused."""

import pytest

from protege.api import generate_corpus
from protege.data.text import load_tokenizer
from protege.errors import DataError, ModelError

from ..log_capture import logged
from ..helpers import seq_lm, jsonl_rows as _rows


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return seq_lm(tmp_path_factory.mktemp("seq"))


def test_teacher_continues_every_window_of_every_document(lm, tmp_path):
    out = generate_corpus(lm["teacher"], lm["train"], tmp_path / "gen.jsonl", prompt_tokens=5, new_tokens=7, batch_size=4)
    tok = load_tokenizer(str(lm["teacher"]))
    docs = [r["text"] for r in _rows(lm["train"])]
    want = [(d, ids[i:i + 5]) for d, text in enumerate(docs)
            for ids in [tok(text, add_special_tokens=False)["input_ids"]] for i in range(0, len(ids) - 4, 12)]
    rows = _rows(out)
    assert len(rows) == len(want) and [r["document"] for r in rows] == [d for d, _ in want]
    for row, (_, prompt) in zip(rows, want):
        words = row["text"].split()
        assert words[:5] == tok.decode(prompt).split()  # the real prompt, then the teacher's words
        assert 5 < len(words) <= 12  # 7 new tokens (special tokens are dropped from the text)
    assert not (tmp_path / "gen.jsonl.tmp").exists() and not (tmp_path / "gen.jsonl.tmp.json").exists()


def test_generation_is_seeded_greedy_is_deterministic_and_an_interrupted_run_continues(lm, tmp_path, monkeypatch):
    kw = {"prompt_tokens": 4, "new_tokens": 6, "batch_size": 3, "limit": 10}
    a = _rows(generate_corpus(lm["teacher"], lm["train"], tmp_path / "a.jsonl", seed=3, **kw))
    b = _rows(generate_corpus(lm["teacher"], lm["train"], tmp_path / "b.jsonl", seed=3, **kw))
    c = _rows(generate_corpus(lm["teacher"], lm["train"], tmp_path / "c.jsonl", seed=4, **kw))
    assert a == b and a != c and len(a) == 10
    g1 = _rows(generate_corpus(lm["teacher"], lm["train"], tmp_path / "g1.jsonl", temperature=0, seed=1, **kw))
    g2 = _rows(generate_corpus(lm["teacher"], lm["train"], tmp_path / "g2.jsonl", temperature=0, seed=2, **kw))
    assert g1 == g2
    # an interrupted run (stopped in its third batch, a torn line at the end) continues after its whole batches
    full = generate_corpus(lm["teacher"], lm["train"], tmp_path / "full.jsonl", seed=3, **kw).read_text()
    from protege.models.lm import CausalLM

    real, calls = CausalLM.generate, []

    def stop_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(CausalLM, "generate", stop_third)
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(lm["teacher"], lm["train"], tmp_path / "r.jsonl", seed=3, **kw)
    monkeypatch.setattr(CausalLM, "generate", real)
    tmp = tmp_path / "r.jsonl.tmp"
    assert not (tmp_path / "r.jsonl").exists() and len(tmp.read_text().splitlines()) == 6
    tmp.write_text(tmp.read_text() + full.splitlines()[6] + "\n" + '{"text": "torn')  # 7 whole rows: batch 3 unfinished
    seen = []
    with logged(seen):
        again = generate_corpus(lm["teacher"], lm["train"], tmp_path / "r.jsonl", seed=3, **kw)
    assert again.read_text() == full and "after 6 finished rows" in seen[0]
    # a file left by a run with other settings is not continued
    monkeypatch.setattr(CausalLM, "generate", stop_third)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        generate_corpus(lm["teacher"], lm["train"], tmp_path / "o.jsonl", seed=4, **kw)
    monkeypatch.setattr(CausalLM, "generate", real)
    seen.clear()
    with logged(seen):
        other = generate_corpus(lm["teacher"], lm["train"], tmp_path / "o.jsonl", seed=3, **kw)
    assert other.read_text() == full and "other settings; starting again" in seen[0]
    # nor is a file left without its settings
    tmp.write_text('{"text": "fake", "document": 0}\n' * 3)
    seen.clear()
    with logged(seen):
        again = generate_corpus(lm["teacher"], lm["train"], tmp_path / "r.jsonl", seed=3, overwrite=True, **kw)
    assert again.read_text() == full and "starting again" in seen[0]


@pytest.mark.parametrize("kw, err, match", [
    ({"prompt_tokens": 100, "new_tokens": 100}, ModelError, "reads at most 128 tokens"),
    ({"prompt_tokens": 100, "new_tokens": 10}, DataError, "no document .* has 100 tokens"),
    ({"column": "body"}, DataError, "no column 'body'"),
    ({"temperature": -1}, DataError, "temperature is -1"),
    ({"new_tokens": 0}, DataError, "new_tokens is 0"),
])
def test_bad_generate_settings(lm, tmp_path, kw, err, match):
    with pytest.raises(err, match=match):
        generate_corpus(lm["teacher"], lm["train"], tmp_path / "gen.jsonl", **kw)
    assert not (tmp_path / "gen.jsonl").exists()


def test_generate_never_overwrites_a_corpus_unless_told(lm, tmp_path):
    out = tmp_path / "gen.jsonl"
    out.write_text("precious\n")
    with pytest.raises(DataError, match="already exists; .* --overwrite"):
        generate_corpus(lm["teacher"], lm["train"], out)
    assert out.read_text() == "precious\n"
    with pytest.raises(DataError, match="must end in .jsonl"):
        generate_corpus(lm["teacher"], lm["train"], tmp_path / "gen.txt")
