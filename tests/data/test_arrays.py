"""NumPy arrays as data (protege.data.arrays, data.source: arrays): .npz and memory-mapped .npy, labels of any kind,
scaling over all training values, reshaping, and the files a user gets wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import protege
from protege.data import load_data
from protege.errors import DataError
from protege.recipe import DataConfig, parse_recipe


def _digits(tmp_path, kind: str = "npz"):
    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), values 0..16
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])[d.target]
    if kind == "npz":
        np.savez(tmp_path / "digits.npz", x=x, y=names)
        return {"path": str(tmp_path / "digits.npz")}
    np.save(tmp_path / "x.npy", x.reshape(len(x), 64))
    np.save(tmp_path / "y.npy", d.target)
    return {"path": str(tmp_path / "x.npy"), "labels": str(tmp_path / "y.npy")}


def test_an_npz_of_images_and_named_labels(tmp_path):
    d = load_data(DataConfig(source="arrays", **_digits(tmp_path)), 0)
    assert d.input_shape == (1, 8, 8) and d.is_image and d.num_classes == 10
    assert d.class_names == sorted(d.class_names) and "zero" in d.class_names
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert abs(float(d.train.x.mean())) < 1e-4 and abs(float(d.train.x.std()) - 1) < 1e-3  # one mean and std for all
    assert "standardised" in d.description and d.preprocessing["layout"] == "N, 1, 8, 8"


def test_memory_mapped_npy_inputs_reshaped_with_integer_labels(tmp_path):
    files = _digits(tmp_path, "npy")
    flat = load_data(DataConfig(source="arrays", scaling="none", **files), 0)
    assert flat.input_shape == (64,) and not flat.is_image and flat.class_names == [str(i) for i in range(10)]
    assert flat.train.x.max() == 16 and flat.train.x.min() == 0  # as they are
    images = load_data(DataConfig(source="arrays", scaling="minmax", shape=[1, 8, 8], **files), 0)
    assert images.input_shape == (1, 8, 8) and images.is_image and images.train.x.max() == 1
    assert torch.equal(images.train.y, flat.train.y)  # the same seeded split
    with pytest.raises(DataError, match=r"data.shape \[1, 8, 9\] holds 72 values but each example has 64"):
        load_data(DataConfig(source="arrays", shape=[1, 8, 9], **files), 0)


@pytest.mark.parametrize("make, words", [
    (lambda t: (np.save(t / "x.npy", np.zeros((20, 3))), {"path": str(t / "x.npy")}),
     ["holds the inputs only; set data.labels"]),
    (lambda t: (np.savez(t / "d.npz", inputs=np.zeros((20, 3)), y=np.arange(20) % 2), {"path": str(t / "d.npz")}),
     ["has no array x; its arrays: inputs, y", "np.savez(path, x=inputs, y=labels)"]),
    (lambda t: (np.savez(t / "d.npz", x=np.zeros((20, 3)), y=np.arange(19) % 2), {"path": str(t / "d.npz")}),
     ["20 inputs but labels of shape [19]"]),
    (lambda t: (np.savez(t / "d.npz", x=np.zeros((20, 3)), y=np.array([{"a": 1}] * 20, dtype=object)), {"path": str(t / "d.npz")}),
     ["holds Python objects, which protege does not unpickle"]),
    (lambda t: (np.savez(t / "d.npz", x=np.zeros((20, 3)), y=np.zeros(20)), {"path": str(t / "d.npz")}),
     ["holds one class only"]),
    (lambda t: (np.savez(t / "d.npz", x=np.zeros(20), y=np.arange(20) % 2), {"path": str(t / "d.npz")}),
     ["inputs of shape [20]"]),
    (lambda t: (None, {"path": str(t / "missing.npz")}), ["arrays file", "not found"]),
    (lambda t: ((t / "d.csv").write_text("x"), {"path": str(t / "d.csv")}), ["has suffix '.csv'; use .npy"]),
])
def test_arrays_a_user_gets_wrong_are_one_line_errors(tmp_path, make, words):
    _, fields = make(tmp_path)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source="arrays", **fields), 0)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_run_on_arrays_end_to_end(tmp_path, tiny):
    tiny["data"] = {"source": "arrays", **_digits(tmp_path)}
    tiny["train"]["epochs"] = 1
    run = protege.distill(parse_recipe(tiny), tmp_path / "run")
    assert run.report.student.accuracy > 0.3 and run.report.data.startswith("arrays ")
    assert run.report.student_onnx.accuracy == run.report.student.accuracy


@pytest.mark.parametrize("name, content", [("x.npy", b"\x93NUMPY garbage"), ("d.npz", b"PK\x03\x04 not a zip")])
def test_a_damaged_numpy_file_is_a_one_line_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    np.save(tmp_path / "y.npy", np.arange(10) % 2)
    fields = {"path": str(tmp_path / name), **({"labels": str(tmp_path / "y.npy")} if name.endswith(".npy") else {})}
    with pytest.raises(DataError, match="is not a readable NumPy file"):
        load_data(DataConfig(source="arrays", **fields), 0)


def test_a_nan_or_inf_input_names_the_example_and_position(tmp_path):
    x = np.zeros((20, 2, 3), dtype=np.float32)
    x[13, 1, 2] = np.inf
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(20) % 2)
    with pytest.raises(DataError, match=r"x.npy: example 13 holds inf at position \[1, 2\]; inputs must be finite"):
        load_data(DataConfig(source="arrays", path=str(tmp_path / "x.npy"), labels=str(tmp_path / "y.npy")), 0)
