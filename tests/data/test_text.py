"""Text data (protege.data.text): CSV/JSONL readers, cached tokenisation, max_length, bad files and labels, and a
text recipe without a tokenizer."""
import json

import pytest
import torch

from protege.data import load_data
from protege.errors import DataError, RecipeError
from protege.recipe import parse_recipe

from ..helpers import text_recipe as _recipe


def test_text_data_from_csv_and_jsonl_is_tokenised_once_and_cached(folders, monkeypatch):
    r = parse_recipe(_recipe(folders))
    assert r.data.tokenizer == str(folders["teacher"])  # defaults to the teacher's folder
    d = load_data(r.data, 0)
    assert d.is_text and d.train.x.dtype == torch.int64 and d.class_names == ["neg", "pos"]
    assert len(d.test) == 80 and len(d.train) + len(d.val) == 320
    assert d.test.x.shape[1] == d.train.x.shape[1] == d.input_shape[0] <= 16
    assert (d.train.x[:, 0] == 2).all()  # [CLS] first: the tokenizer really ran
    import protege.data.text as text

    monkeypatch.setattr(text, "load_tokenizer", lambda *_: pytest.fail("tokenised again instead of reading the cache"))
    again = load_data(r.data, 0)
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)


def test_long_texts_are_truncated_with_a_warning_or_refused(folders, tmp_path):
    r = parse_recipe(_recipe(folders, data={"max_length": 6, "test_path": None}))
    with pytest.warns(UserWarning, match="truncated"):
        d = load_data(r.data, 0)
    assert d.input_shape == (6,) and (d.train.x[:, -1] != 0).any()
    r = parse_recipe(_recipe(folders, data={"max_length": 6, "too_long": "error", "test_path": None}))
    with pytest.raises(DataError, match="longer than data.max_length = 6.*too_long: truncate"):
        load_data(r.data, 0)


def test_max_length_beyond_what_the_model_allows_is_capped_with_a_warning_or_refused(folders):
    with pytest.warns(UserWarning, match="more than the 64 tokens the model allows; using 64"):
        load_data(parse_recipe(_recipe(folders, data={"max_length": 100})).data, 0)
    with pytest.raises(DataError, match="lower data.max_length to 64"):
        load_data(parse_recipe(_recipe(folders, data={"max_length": 100, "too_long": "error"})).data, 0)


@pytest.mark.parametrize("content, match", [
    ("words,label\nhello,pos\n", "has no column 'text'.*columns are: words, label"),
    ("text,label\ngood movie,pos\n  ,neg\n", "row 3 has an empty 'text'"),
    ("text,label\n", "has no rows"),
])
def test_bad_text_files_get_one_line_errors(folders, tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    r = parse_recipe(_recipe(folders, data={"path": str(path), "test_path": None}))
    with pytest.raises(DataError, match=match):
        load_data(r.data, 0)


def test_a_test_label_unknown_to_training_and_a_missing_file_are_errors(folders, tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"text": "good day", "label": "meh"}) + "\n")
    with pytest.raises(DataError, match="label 'meh' does not occur"):
        load_data(parse_recipe(_recipe(folders, data={"test_path": str(bad)})).data, 0)
    with pytest.raises(DataError, match="not found"):
        load_data(parse_recipe(_recipe(folders, data={"path": str(tmp_path / "nope.csv")})).data, 0)


def test_text_without_a_tokenizer_is_refused_at_validation(folders):
    with pytest.raises(RecipeError, match="data.tokenizer"):
        parse_recipe(_recipe(folders, teacher={"model": "mlp", "train": {"epochs": 1}}))


def test_a_text_file_in_another_encoding_needs_data_encoding(folders, tmp_path):
    rows = [{"text": f"caf\xe9 number {i} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(60)]
    path = tmp_path / "cp1252.jsonl"
    path.write_bytes("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("cp1252"))
    r = _recipe(folders)
    r["data"].update(path=str(path), test_path=None)
    with pytest.raises(DataError, match=r"cp1252.jsonl: line 1, byte 14 \(0xe9\) is not UTF-8 text; set data.encoding"):
        load_data(parse_recipe(r).data, 0)
    r["data"]["encoding"] = "cp1252"
    d = load_data(parse_recipe(r).data, 0)
    assert len(d.train) + len(d.val) + len(d.test) == 60
