"""Image files as data (protege.data.images, data.source: images): class folders and manifests, grayscale and RGB,
resizing, and the folders and files a user gets wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import protege
from protege.data import load_data
from protege.errors import DataError
from protege.recipe import DataConfig, parse_recipe

CLASSES = ("zero", "one", "two")


def _folders(root, per_class: int = 30, rgb: bool = False, size: int = 8):
    """Digits 0-2 as PNG files in class folders (values 0..16 stretched to 0..255)."""
    d = load_digits()
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(d.images[d.target == c][:per_class]):
            a = (img * 255 / 16).astype(np.uint8)
            im = Image.fromarray(a, "L").resize((size, size))
            (im.convert("RGB") if rgb else im).save(root / name / f"{i}.png")
    return root


def test_class_folders_of_grayscale_pngs(tmp_path):
    d = load_data(DataConfig(source="images", path=str(_folders(tmp_path / "imgs"))), 0)
    assert d.input_shape == (1, 8, 8) and d.is_image and d.class_names == sorted(CLASSES)
    assert len(d.train) + len(d.val) + len(d.test) == 90
    assert abs(float(d.train.x.mean())) < 1e-4 and d.preprocessing["steps"][0] == "x / 255"
    raw = load_data(DataConfig(source="images", path=str(tmp_path / "imgs"), scaling="none"), 0)
    assert 0 <= float(raw.train.x.min()) and float(raw.train.x.max()) <= 1


def test_rgb_images_become_gray_or_stay_rgb_and_are_resized(tmp_path):
    root = _folders(tmp_path / "rgb", rgb=True)
    assert load_data(DataConfig(source="images", path=str(root)), 0).input_shape == (3, 8, 8)
    gray = load_data(DataConfig(source="images", path=str(root), channels=1, image_size=[16, 12]), 0)
    assert gray.input_shape == (1, 16, 12)


def test_a_manifest_of_paths_and_labels(tmp_path):
    root = _folders(tmp_path / "imgs", per_class=20)
    rows = [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.png"))]
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    d = load_data(DataConfig(source="images", path=str(root / "list.csv")), 0)
    assert d.class_names == sorted(CLASSES) and len(d.train) + len(d.val) + len(d.test) == 60
    (root / "bad.csv").write_text("path,label\n" + "\n".join(rows[:5]) + "\nnowhere/x.png,one\n")
    with pytest.raises(DataError, match=r"bad.csv: row 7 names 'nowhere/x.png', which is not a file"):
        load_data(DataConfig(source="images", path=str(root / "bad.csv")), 0)


def test_an_unreadable_image_stops_the_run_or_is_skipped_and_counted(tmp_path):
    root = _folders(tmp_path / "imgs")
    (root / "one" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken.png is not a readable image .*data.skip_bad_files: true"):
        load_data(DataConfig(source="images", path=str(root)), 0)
    d = load_data(DataConfig(source="images", path=str(root), skip_bad_files=True), 0)
    assert d.preprocessing["skipped_files"] == 1 and "1 unreadable files skipped" in d.description
    assert len(d.train) + len(d.val) + len(d.test) == 90


@pytest.mark.parametrize("damage, words", [
    (lambda root: (root / "three").mkdir(), ["class folder", "three holds no images"]),
    (lambda root: Image.new("L", (9, 9)).save(root / "two" / "odd.png"), ["images of different sizes", "9x9", "data.image_size"]),
])
def test_folders_a_user_gets_wrong_are_one_line_errors(tmp_path, damage, words):
    root = _folders(tmp_path / "imgs", per_class=10)
    damage(root)
    with pytest.raises(DataError) as e:
        load_data(DataConfig(source="images", path=str(root)), 0)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_folder_without_class_folders_or_a_missing_one(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="has no class subfolders"):
        load_data(DataConfig(source="images", path=str(tmp_path / "flat")), 0)
    with pytest.raises(DataError, match="image folder or manifest .* not found"):
        load_data(DataConfig(source="images", path=str(tmp_path / "nowhere")), 0)


def test_a_run_on_image_folders_end_to_end(tmp_path, tiny):
    tiny["data"] = {"source": "images", "path": str(_folders(tmp_path / "imgs", per_class=40))}
    tiny["train"]["epochs"] = 1
    tiny["teacher"]["train"]["epochs"] = 1
    run = protege.distill(parse_recipe(tiny), tmp_path / "run")
    assert run.report.data.startswith("images ") and run.report.student.accuracy is not None
    assert run.report.student_onnx.accuracy == run.report.student.accuracy


def test_sixteen_bit_images_keep_their_range_and_numeric_class_folders_count_numerically(tmp_path):
    for c in range(11):  # classes 0..10: "10" after "9", as an outside teacher counts them
        (tmp_path / "deep" / str(c)).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((4, 4), 65535 * (i % 4) // 3, dtype=np.uint16)).save(tmp_path / "deep" / str(c) / f"{i}.png")
    d = load_data(DataConfig(source="images", path=str(tmp_path / "deep"), scaling="none", val_fraction=0.25,
                             test_fraction=0.25), 0)
    assert d.class_names == [str(c) for c in range(11)]
    values = sorted(set(torch.cat([d.train.x, d.val.x, d.test.x]).flatten().tolist()))
    assert values[0] == 0 and values[-1] == 1 and len(values) == 4  # not clipped to white


def test_data_classes_sets_the_order_of_the_outputs(tmp_path):
    """A pretrained teacher's outputs come in its own class order, not the folders' alphabetical one."""
    root = _folders(tmp_path / "imgs", per_class=20)
    d = load_data(DataConfig(source="images", path=str(root), classes=list(CLASSES), stream=False, scaling="none"), 0)
    assert d.class_names == list(CLASSES)  # zero, one, two: not sorted
    digits = load_digits()
    for split in (d.train, d.test):
        for x, y in zip(split.x[:8], split.y[:8]):  # each image is the digit its label index says
            ref = np.stack([(digits.images[digits.target == c][:20] * 255 / 16).astype(np.uint8) / 255.0 for c in range(3)])
            assert np.abs(ref[int(y)] - x[0].numpy()).min(axis=(1, 2)).min() < 1e-6
    with pytest.raises(DataError, match=r"holds the class 'two', which data.classes does not list; add it"):
        load_data(DataConfig(source="images", path=str(root), classes=["zero", "one"]), 0)
    with pytest.raises(ValueError, match=r"classes lists 'one' twice"):
        DataConfig(source="images", path=str(root), classes=["zero", "one", "one"])
