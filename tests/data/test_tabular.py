"""CSV tables (protege.data.tabular): encoding fitted on the training split only, and bad cells and rows."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from protege.data import load_data
from protege.data.tabular import read_csv_table
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
    d = load_data(DataConfig(source="csv", path=str(_table(tmp_path)), target="label", missing="mean"), 0)
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
        load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", categorical=["zip"]), 0)
    d = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", limit=10), 0)
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


def test_csv_encoding_is_the_documented_formula_bit_for_bit(tmp_path):
    """Numeric: (x - mean) / std with numpy's nanmean and population nanstd over the training rows, to the bit, a
    missing cell 0 (the mean), a column empty in training mean 0 and std 1; categorical: one-hot in sorted order, a
    value unseen in training all zeros."""
    rng = np.random.default_rng(3)
    x = rng.normal(1000, 37, 300).round(3)
    x[rng.random(300) < 0.1] = np.nan
    lines = ["x,empty,const,kind,label"]
    for i, v in enumerate(x):
        kind = "zzz" if i == 250 else "cab"[i % 3]
        lines.append(f"{'' if np.isnan(v) else repr(float(v))},{'' if i < 200 else i},2.5,{kind},{i % 2}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    enc = read_csv_table(tmp_path / "t.csv", "label").fit_encoder(np.arange(200), None, None)
    got = enc(np.arange(300))
    mean, std = np.nanmean(x[:200]), np.nanstd(x[:200])
    assert got[:, 0].tobytes() == np.where(np.isnan(x), 0.0, (x - mean) / std).astype(np.float32).tobytes()
    assert enc.describe["numeric"] == {"x": {"mean": float(mean), "std": float(std)}, "empty": {"mean": 0.0, "std": 1.0},
                                       "const": {"mean": 2.5, "std": 1.0}}
    assert np.array_equal(got[:, 1], np.r_[np.zeros(200), np.arange(200, 300)])  # held-out values pass through unscaled
    assert not got[:, 2].any()
    assert enc.describe["features_in_order"][3:] == ["kind = 'a' (one-hot)", "kind = 'b' (one-hot)", "kind = 'c' (one-hot)"]
    kinds = np.array(["cab"[i % 3] for i in range(300)])
    assert np.array_equal(got[:, 3:], np.stack([kinds == k for k in "abc"], 1) & (np.arange(300) != 250)[:, None])


# ---------------------------------------------------------------- choosing columns, scaling, rows as images
def test_csv_columns_can_be_chosen_or_dropped(tmp_path):
    p = _table(tmp_path)
    dropped = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", drop=["city"]), 0)
    assert dropped.input_shape == (2,) and "dropped city" in dropped.description
    chosen = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", columns=["income", "age"]), 0)
    full = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean"), 0)
    assert torch.equal(chosen.train.x, full.train.x[:, [1, 0]])  # in the order given
    for cfg, field in ((dict(drop=["zip"]), "data.drop"), (dict(columns=["age", "zip"]), "data.columns")):
        with pytest.raises(DataError, match=f"column 'zip' in {field} is not a feature column.*age, city, income"):
            load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", **cfg), 0)
    with pytest.raises(DataError, match="leave no feature column"):
        load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", columns=["age"], drop=["age"]), 0)


def test_csv_scaling_none_and_minmax(tmp_path):
    p = _table(tmp_path)
    raw = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", drop=["city"], scaling="none"), 0)
    rows = [line.split(",") for line in p.read_text().splitlines()[1:]]
    ages = sorted(float(r[0]) for r in rows)
    assert sorted(torch.cat([raw.train.x[:, 0], raw.val.x[:, 0], raw.test.x[:, 0]]).tolist()) == ages  # as they are
    assert "unscaled" in raw.description and raw.preprocessing["scaling"] == "none"
    incomes = [float(r[2]) for r in rows if r[2]]
    assert raw.preprocessing["numeric"]["income"]["missing"] != 0 and min(incomes) < raw.preprocessing["numeric"]["income"]["missing"] < max(incomes)
    mm = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", drop=["city"], scaling="minmax"), 0)
    assert mm.train.x.min() == 0 and mm.train.x.max() == 1 and "scaled to [0, 1]" in mm.description
    assert set(mm.preprocessing["numeric"]["age"]) == {"min", "max", "missing"}


def test_a_pixel_table_becomes_images_with_data_shape(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "pixels.csv"
    p.write_text("id," + ",".join(f"p{i}" for i in range(16)) + ",label\n" + "".join(
        f"{i}," + ",".join(str(v) for v in rng.integers(0, 256, 16)) + f",{i % 3}\n" for i in range(60)))
    d = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", drop=["id"], shape=[1, 4, 4], scaling="none"), 0)
    assert d.input_shape == (1, 4, 4) and d.is_image and d.train.x.shape[1:] == (1, 4, 4)
    assert d.preprocessing["layout"] == "N, 1, 4, 4" and "rows as [1, 4, 4]" in d.description
    with pytest.raises(DataError, match=r"data.shape \[1, 4, 4\] holds 16 values but each row has 17 features"):
        load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean", shape=[1, 4, 4]), 0)
    with pytest.raises(ValueError, match="positive sizes"):
        DataConfig(source="csv", shape=[0, 4])


def test_a_file_in_another_encoding_reads_with_data_encoding(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("city,t,y\nz\xfcrich,1,a\nb\xe9ziers,2,b\n".encode("latin-1") * 1 + b"".join(
        f"c{i},{i},{'ab'[i % 2]}\n".encode() for i in range(40)))
    with pytest.raises(DataError, match=r"latin.csv: line 2, byte 2 \(0xfc\) is not UTF-8 text; set data.encoding"):
        load_data(DataConfig(source="csv", path=str(p), target="y"), 0)
    d = load_data(DataConfig(source="csv", path=str(p), target="y", encoding="latin-1"), 0)
    assert any("zürich" in f or "béziers" in f for f in d.preprocessing["features_in_order"])  # decoded as latin-1
    with pytest.raises(ValueError, match="encoding 'latin-9000' is not one Python knows"):
        DataConfig(source="csv", encoding="latin-9000")


def test_an_empty_numeric_cell_is_an_error_unless_filling_is_asked_for(tmp_path):
    p = _table(tmp_path)  # row 7 (the sixth data row) has no income
    with pytest.raises(DataError, match=r"t.csv: row 7 column 'income' is empty \(or NaN\); .*data.missing: mean"):
        load_data(DataConfig(source="csv", path=str(p), target="label"), 0)
    lines = p.read_text().splitlines()
    lines[6] = lines[6].replace(",,", ",nan,")
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"row 7 column 'income' is empty \(or NaN\)"):
        load_data(DataConfig(source="csv", path=str(p), target="label"), 0)
    filled = load_data(DataConfig(source="csv", path=str(p), target="label", missing="mean"), 0)
    assert torch.isfinite(filled.train.x).all()


def test_row_numbers_are_the_files_own_with_blank_lines_counted(tmp_path):
    p = tmp_path / "gaps.csv"
    p.write_text("a,label\n1,x\n\n2,y\n3,\n" + "".join(f"{i},{'xy'[i % 2]}\n" for i in range(4, 30)))
    with pytest.raises(DataError, match=r"gaps.csv: row 5 has no label in column 'label'"):  # line 5 of the file
        load_data(DataConfig(source="csv", path=str(p), target="label"), 0)
