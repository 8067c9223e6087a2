"""Hugging Face datasets as data (protege.data.hf_dataset, data.source: hf_dataset): a save_to_disk folder with its
own splits and an image column, Parquet files with numeric columns, and the datasets a user gets wrong."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import protege
from protege.data import load_data
from protege.errors import DataError
from protege.recipe import DataConfig, parse_recipe

datasets = pytest.importorskip("datasets")  # the optional extra protege[datasets]; part of the dev install


def _digit_images(n: int, offset: int = 0):
    d = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8), "L") for img in d.images[offset:offset + n]]
    return images, d.target[offset:offset + n].tolist()


def _image_dict(tmp_path):
    names = [str(i) for i in range(10)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"digit {i}" for i in range(10)])})
    parts = {}
    for split, (n, offset) in {"train": (400, 0), "test": (100, 400)}.items():
        images, labels = _digit_images(n, offset)
        parts[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "digits"))
    return str(tmp_path / "digits"), names


def test_a_saved_dataset_dict_keeps_its_test_split_and_class_names(tmp_path):
    path, _ = _image_dict(tmp_path)
    d = load_data(DataConfig(source="hf_dataset", path=path), 0)
    assert len(d.test) == 100 and len(d.train) + len(d.val) == 400  # validation split off train; test as given
    assert d.input_shape == (1, 8, 8) and d.is_image and d.class_names[3] == "digit 3"
    assert "(train, test)" in d.description


def test_parquet_files_with_numeric_columns_and_text_labels(tmp_path):
    d = load_digits()
    table = datasets.Dataset.from_dict({"pixels": d.data[:300].tolist(), "bias": [1.0] * 300,
                                        "kind": ["even" if t % 2 == 0 else "odd" for t in d.target[:300]]})
    table.to_parquet(str(tmp_path / "digits.parquet"))
    data = load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "digits.parquet"), target="kind",
                                columns=["pixels", "bias"], scaling="none"), 0)
    assert data.input_shape == (65,) and data.class_names == ["even", "odd"]
    assert len(data.train) + len(data.val) + len(data.test) == 300 and float(data.train.x[:, 64].min()) == 1.0


@pytest.mark.parametrize("make, fields, words", [
    (lambda t: datasets.DatasetDict({"fit": datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [0, 1]})}).save_to_disk(str(t / "d")),
     {}, ["has the splits fit but no train split"]),
    (lambda t: datasets.Dataset.from_dict({"x": [1.0, 2.0], "y": [0, 1]}).save_to_disk(str(t / "d")),
     {"columns": ["x"]}, ["no label column 'label' (data.target); its columns: x, y"]),
    (lambda t: datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [0, 1]}).save_to_disk(str(t / "d")),
     {}, ["say which columns are the inputs", "x (Value)"]),
    (lambda t: datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [0, 1]}).save_to_disk(str(t / "d")),
     {"columns": ["z"]}, ["no column 'z' (data.columns)"]),
    (lambda t: (t / "d").mkdir(), {}, ["neither a datasets folder", "nor Parquet files"]),
])
def test_datasets_a_user_gets_wrong_are_one_line_errors(tmp_path, make, fields, words):
    make(tmp_path)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "d"), **fields), 0)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_run_on_a_saved_image_dataset_end_to_end(tmp_path, tiny):
    path, _ = _image_dict(tmp_path)
    tiny["data"] = {"source": "hf_dataset", "path": path}
    tiny["train"]["epochs"] = 1
    tiny["teacher"]["train"]["epochs"] = 1
    run = protege.distill(parse_recipe(tiny), tmp_path / "run")
    assert run.report.test_examples == 100 and run.report.student_onnx.accuracy == run.report.student.accuracy


def test_a_text_column_is_tokenised_like_the_text_source(folders, tmp_path):
    from ..helpers import text_recipe

    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} number {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(120)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "reviews"))
    r = text_recipe(folders)
    r["data"] = {"source": "hf_dataset", "path": str(tmp_path / "reviews"), "max_length": 16}
    data = load_data(parse_recipe(r).data, 0)  # the tokenizer defaults to the teacher's folder
    assert data.is_text and data.class_names == ["neg", "pos"] and len(data.train) + len(data.val) + len(data.test) == 120
    assert data.train.x.dtype.is_floating_point is False and (data.train.x[:, 0] == 2).all()  # [CLS] first
    with pytest.raises(DataError, match="set data.tokenizer"):
        load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "reviews")), 0)


def test_unlabelled_rows_nan_cells_and_image_cells_that_are_not_images(tmp_path):
    names = datasets.ClassLabel(names=["a", "b"])
    feats = datasets.Features({"x": datasets.Value("float32"), "label": names})
    parts = {"train": datasets.Dataset.from_dict({"x": [1.0, 2.0] * 10, "label": [0, 1] * 10}, features=feats),
             "test": datasets.Dataset.from_dict({"x": [1.0, 2.0], "label": [-1, -1]}, features=feats)}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(DataError, match=r"\(test\): 2 rows have no label \(-1 on row 0"):
        load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "unlabelled"), columns=["x"]), 0)
    datasets.Dataset.from_dict({"x": [1.0, None] * 10, "label": [0, 1] * 10}).save_to_disk(str(tmp_path / "holes"))
    with pytest.raises(DataError, match="example 1 holds nan"):
        load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "holes"), columns=["x"]), 0)
    datasets.Dataset.from_dict({"img": ["a.png", "b.png"] * 10, "label": [0, 1] * 10}).save_to_disk(str(tmp_path / "paths"))
    with pytest.raises(DataError, match=r"row 0 is not a readable image"):
        load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "paths"), image="img"), 0)


def test_parquet_splits_come_in_order_and_need_a_train_split(tmp_path):
    d = load_digits()
    for split, rows in (("test", slice(300, 400)), ("train", slice(0, 300))):
        (tmp_path / "hub" / split).mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"pixels": d.data[rows].tolist(), "label": d.target[rows].tolist()}).to_parquet(
            str(tmp_path / "hub" / split / "0000.parquet"))
    data = load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "hub"), columns=["pixels"]), 0)
    assert len(data.test) == 100 and len(data.train) + len(data.val) == 300  # the <split>/ folders are the splits
    (tmp_path / "hub" / "train" / "0000.parquet").unlink()
    with pytest.raises(DataError, match="splits test but none of a train split"):
        load_data(DataConfig(source="hf_dataset", path=str(tmp_path / "hub"), columns=["pixels"]), 0)
