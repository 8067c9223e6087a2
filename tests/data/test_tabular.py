"""CSV tables (protege.data.tabular): encoding fitted on the training split only, and bad cells and rows."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from protege.data import load_data
from protege.errors import DataError
from protege.recipe import DataConfig

from ..helpers import assert_clean_error, run_cli
from ..helpers import tiny_recipe_file as _recipe


def _table(tmp_path, n=60):
    rng = np.random.default_rng(0)
    lines = ["age,city,income,label"]
    for i in range(n):
        city = ["paris", "oslo", "rome"][i % 3]
        income = "" if i == 5 else f"{rng.normal(50, 10):.2f}"
        lines.append(f"{20 + i},{city},{income},{'yes' if i % 2 else 'no'}")
    p = tmp_path / "t.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_csv_numeric_and_categorical(tmp_path):
    d = load_data(DataConfig(source="csv", path=str(_table(tmp_path)), target="label"), 0)
    assert d.num_classes == 2 and d.class_names == ["no", "yes"]
    assert d.input_shape == (2 + 3,)  # age, income standardised; city one-hot over 3 values
    onehot = d.train.x[:, 2:]
    assert torch.all(onehot.sum(1) == 1)
    # scaling is fitted on the training rows: they are standardised, the held-out rows only approximately
    assert d.train.x[:, 0].mean().abs() < 1e-5 and (d.train.x[:, 0].std(unbiased=False) - 1).abs() < 1e-4
    assert d.test.x[:, 0].mean().abs() > 1e-3
    assert torch.isfinite(d.train.x).all()  # the missing income was imputed


def test_csv_limit_and_unknown_column(tmp_path):
    p = _table(tmp_path)
    with pytest.raises(DataError, match="column 'zip'"):
        load_data(DataConfig(source="csv", path=str(p), target="label", categorical=["zip"]), 0)
    d = load_data(DataConfig(source="csv", path=str(p), target="label", limit=10), 0)
    assert len(d.train) == 10


def test_csv_ragged_row(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("a,b,y\n1,2,0\n1,0\n")
    with pytest.raises(DataError, match="row 3"):
        load_data(DataConfig(source="csv", path=str(p), target="y"), 0)


def test_csv_with_an_infinite_cell_is_refused(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)) + "inf,1,0\n")
    recipe = _recipe(tmp_path, lambda r: r.update(data={"source": "csv", "path": str(csv), "target": "label"}))
    code, err = run_cli(["distill", recipe, "--out", tmp_path / "out"], capsys)
    assert_clean_error(code, err, "t.csv", "column 'a'", "infinite")
