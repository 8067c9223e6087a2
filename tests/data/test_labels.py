"""Label columns (protege.data.labels): empty, mixed kinds, one number written two ways, one class; through the CSV
and text readers, each a one-line DataError naming the rows."""
from __future__ import annotations

import json

import pytest

from protege.data import load_data
from protege.data.labels import check_labels
from protege.errors import DataError
from protege.recipe import DataConfig


@pytest.mark.parametrize("labels, words", [
    (["a", "b", ""], ["row 3 has no label in column 'y'"]),
    (["a", None], ["row 2 has no label"]),
    (["1", "2", "cat"], ["mixes kinds of label", "a number on row 1 ('1')", "text on row 3 ('cat')"]),
    ([1, True, 2], ["mixes kinds", "a number on row 1 (1)", "true/false on row 2 (True)"]),
    (["1", "2", "1.0"], ["writes one number two ways: '1' on row 1 and '1.0' on row 3"]),
    ([1, 2, 1.0], ["'1' on row 1 and '1.0' on row 3"]),
])
def test_labels_that_would_split_or_lose_classes_are_refused(labels, words):
    with pytest.raises(DataError) as e:
        check_labels(labels, "f.jsonl", "y")
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("labels", [["neg", "pos", "neg"], ["0", "1", "2"], [0, 1, 2], ["1.5", "2.5"], ["a b", "c"]])
def test_labels_of_one_kind_pass(labels):
    check_labels(labels, "f.csv", "y")


def _csv(tmp_path, labels):
    p = tmp_path / "t.csv"
    p.write_text("x,y\n" + "".join(f"{i},{label}\n" for i, label in enumerate(labels)))
    return p


def test_the_csv_reader_names_the_file_row(tmp_path):
    with pytest.raises(DataError, match=r"t.csv: row 4 has no label in column 'y'"):
        load_data(DataConfig(source="csv", path=str(_csv(tmp_path, ["a", "b", "", "a"] * 10)), target="y"), 0)
    with pytest.raises(DataError, match=r"t.csv: column 'y' holds one class only \('a'\)"):
        load_data(DataConfig(source="csv", path=str(_csv(tmp_path, ["a"] * 40)), target="y"), 0)
    with pytest.raises(DataError, match=r"mixes kinds of label: a number on row 2 \('1'\); text on row 3 \('two'\)"):
        load_data(DataConfig(source="csv", path=str(_csv(tmp_path, ["1", "two"] * 20)), target="y"), 0)


def test_the_text_reader_refuses_json_labels_of_several_types(tmp_path):
    from protege.data.text import texts_and_labels

    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}", "label": v}) for i, v in enumerate([1, 1.0, 2, 2])))
    with pytest.raises(DataError, match="writes one number two ways: '1' on row 1 and '1.0' on row 2"):
        texts_and_labels(p, "text", "label")
