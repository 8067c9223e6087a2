"""Bad input across the whole CLI, in one table: every case must exit 2 with one line that starts "error:" and names
what is wrong, with no traceback, and must leave the watched files (a finished run, the recipe and data files given,
and any --out folder) byte-for-byte as they were."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from .conftest import PROTEGE, TINY
from .helpers import assert_clean_error, run_cli


def _recipe(**edits) -> dict:
    r = json.loads(json.dumps(TINY))
    r["teacher"]["train"]["epochs"] = 1
    r["train"]["epochs"] = 1
    for dotted, value in edits.items():
        node, *keys = [r, *dotted.split("__")]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return r


def _without(*dotted: str) -> dict:
    r = _recipe()
    for d in dotted:
        node, *keys = [r, *d.split("__")]
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return r


CSV_OK = "a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40))
# id -> (recipe: dict | raw text | bytes | None, extra CLI arguments, words the error must contain).
# "{run}" in an argument is the watched finished run, "{out}" a fresh folder, "{tmp}" the test's folder.
RECIPE_CASES = {
    "unknown_top_field": (_recipe(epochs=3), [], ["unknown field 'epochs'"]),
    "unknown_nested_field": (_recipe(train__epoch=3), [], ["train.epoch", "did you mean 'epochs'"]),
    "epochs_text": (_recipe(train__epochs="ten"), [], ["train.epochs"]),
    "epochs_zero": (_recipe(train__epochs=0), [], ["train.epochs"]),
    "epochs_float": (_recipe(train__epochs=2.5), [], ["train.epochs"]),
    "batch_size_zero": (_recipe(train__batch_size=0), [], ["train.batch_size"]),
    "lr_zero": (_recipe(train__lr=0), [], ["train.lr"]),
    "lr_negative": (_recipe(train__lr=-1), [], ["train.lr"]),
    "lr_inf": ("__yaml__train.lr=.inf", [], ["train.lr"]),
    "lr_nan": ("__yaml__train.lr=.nan", [], ["train.lr"]),
    "teacher_lr_inf": ("__yaml__teacher.train.lr=.inf", [], ["teacher.train.lr"]),
    "temperature_zero": (_recipe(distill__temperature=0), [], ["distill.temperature"]),
    "temperature_huge": (_recipe(distill__temperature=1e300), [], ["distill.temperature"]),
    "alpha_above_one": (_recipe(distill__alpha=1.5), [], ["distill.alpha"]),
    "response_unknown": (_recipe(distill__response="kld"), [], ["distill.response", "'kl'"]),
    "optimizer_unknown": (_recipe(train__optimizer="adam"), [], ["train.optimizer", "'adamw'"]),
    "schedule_unknown": (_recipe(train__schedule="step"), [], ["train.schedule", "'cosine'"]),
    "source_unknown": (_recipe(data__source="mnist"), [], ["data.source", "'digits'"]),
    "val_fraction_above_one": (_recipe(data__val_fraction=1.5), [], ["data.val_fraction"]),
    "seed_huge": (_recipe(seed=10**22), [], ["seed"]),
    "seed_negative": (_recipe(seed=-1), [], ["seed"]),
    "name_with_dotdot": (_recipe(name="../../x"), [], ["name", "plain folder name"]),
    "name_absolute": (_recipe(name="/tmp/x"), [], ["name", "plain folder name"]),
    "no_teacher": (_without("teacher"), [], ["teacher", "required"]),
    "no_student": (_without("student"), [], ["student", "required"]),
    "teacher_without_source": (_recipe(teacher={"model": "mlp"}), [], ["teacher needs"]),
    "unknown_zoo_model": (_recipe(student__model="resnet99"), [], ["resnet99"]),
    "long_model_name": (_recipe(student__model="m" * 300), [], ["student"]),
    "teacher_weights_missing": (_recipe(teacher={"model": "mlp", "weights": "/nowhere/t.safetensors"}), [], ["/nowhere/t.safetensors"]),
    "more_teachers_without_weights": (_recipe(more_teachers=[{"model": "mlp"}]), [], ["more_teachers[0]"]),
    # your own data and teacher (issue 16)
    "csv_not_utf8": (_recipe(data={"source": "csv", "path": "{tmp}/latin.csv", "target": "label"}), [],
                     ["latin.csv: line 3, byte 1 (0xe9) is not UTF-8 text", "data.encoding"]),
    "csv_empty_cell": (_recipe(data={"source": "csv", "path": "{tmp}/blank.csv", "target": "label"}), [],
                       ["blank.csv: row 5 column 'a' is empty", "data.missing: mean"]),
    "csv_nan_cell": (_recipe(data={"source": "csv", "path": "{tmp}/nan.csv", "target": "label"}), [],
                     ["nan.csv: row 42 column 'b' is empty (or NaN)"]),
    "csv_mixed_labels": (_recipe(data={"source": "csv", "path": "{tmp}/mixed.csv", "target": "label"}), [],
                         ["mixed.csv: column 'label' mixes kinds of label", "text on row 3"]),
    "csv_empty_label": (_recipe(data={"source": "csv", "path": "{tmp}/nolabel.csv", "target": "label"}), [],
                        ["nolabel.csv: row 7 has no label in column 'label'"]),
    "csv_one_class": (_recipe(data={"source": "csv", "path": "{tmp}/oneclass.csv", "target": "label"}), [],
                      ["oneclass.csv: column 'label' holds one class only"]),
    "csv_drop_unknown": (_recipe(data={"source": "csv", "path": "{tmp}/ok.csv", "target": "label", "drop": ["zz"]}), [],
                         ["column 'zz' in data.drop", "a, b"]),
    "images_corrupt": (_recipe(data={"source": "images", "path": "{tmp}/images_bad"}), [],
                       ["broken.png is not a readable image", "skip_bad_files"]),
    "images_empty_class": (_recipe(data={"source": "images", "path": "{tmp}/images_empty"}), [],
                           ["class folder", "holds no images"]),
    "images_no_folders": (_recipe(data={"source": "images", "path": "{tmp}/notes"}), [], ["has no class subfolders"]),
    "images_manifest_path": (_recipe(data={"source": "images", "path": "{tmp}/images_ok/list.csv"}), [],
                             ["list.csv: row 2 names 'gone.png', which is not a file"]),
    "images_mixed_sizes": (_recipe(data={"source": "images", "path": "{tmp}/images_sizes"}), [],
                           ["images of different sizes", "data.image_size"]),
    "onnx_output_unknown": (_recipe(teacher={"model": "{tmp}/t.onnx", "output": "probs"}), [],
                            ["t.onnx has no output 'probs'", "its outputs: logits"]),
    "onnx_input_mismatch": (_recipe(data={"source": "csv", "path": "{tmp}/ok.csv", "target": "label"},
                                    teacher={"model": "{tmp}/t.onnx"}), [],
                            ["takes input", "[N, 1, 8, 8] but the data gives examples of shape [2]"]),
    "arrays_labels_missing": (_recipe(data={"source": "arrays", "path": "{tmp}/x.npy"}), [], ["set data.labels"]),
    "hf_missing_column": (_recipe(data={"source": "hf_dataset", "path": "{tmp}/hf", "columns": ["zz"]}), [],
                          ["no column 'zz' (data.columns)"]),
    "feature_path_unknown": (_recipe(distill__features=[{"loss": "hint", "student": "nope", "teacher": "body.0"}]), [],
                             ["'nope'"]),
    "feature_loss_unknown": (_recipe(distill__features=[{"loss": "fitnet", "student": "body.0", "teacher": "body.0"}]), [],
                             ["distill.features.0.loss"]),
    "quantize_mode_unknown": (_recipe(quantize={"mode": "int4"}), [], ["quantize.mode"]),
    "prune_ratio_above_one": (_recipe(prune={"ratio": 1.5}), [], ["prune.ratio"]),
    "onnx_teacher_with_train": (_recipe(teacher={"model": "{tmp}/t.onnx", "train": {"epochs": 1}}), [], ["teacher.train"]),
    "csv_missing": (_recipe(data={"source": "csv", "path": "{tmp}/none.csv", "target": "y"}), [], ["none.csv", "not found"]),
    "csv_no_target": (_recipe(data={"source": "csv", "path": "{tmp}/ok.csv", "target": "y"}), [], ["'y'", "label"]),
    "csv_inf_cell": (_recipe(data={"source": "csv", "path": "{tmp}/inf.csv", "target": "label"}), [], ["inf.csv", "infinite"]),
    "csv_text_in_numeric": (_recipe(data={"source": "csv", "path": "{tmp}/ok.csv", "target": "label", "numeric": ["zz"]}), [],
                            ["'zz'"]),
    "fashion_dir_missing": (_recipe(data={"source": "fashion_mnist", "path": "{tmp}/none"}), [], ["none"]),
    "malformed_yaml": ("teacher: {model: mlp\n  train: [\n", [], ["malformed YAML", "line"]),
    "not_a_mapping": ("- a\n- b\n", [], ["mapping"]),
    "empty_file": ("", [], ["teacher"]),
    "binary_file": (bytes(range(256)) * 4, [], ["recipe.yaml"]),
    "latin1_bytes": ("name: caf\xe9\n".encode("latin-1"), [], ["recipe.yaml"]),
    "deep_nesting": ("a: " + "[" * 3000 + "]" * 3000 + "\n", [], ["recipe.yaml"]),
    "duplicate_keys": ("__dup__", [], ["train"]),
    "set_without_equals": (_recipe(), ["--set", "train.epochs"], ["KEY=VALUE"]),
    "set_unknown_field": (_recipe(), ["--set", "test_path=null"], ["test_path", "data.test_path"]),
    "set_bad_yaml": (_recipe(), ["--set", "train.epochs=[1"], ["--set"]),
    "set_into_a_scalar": (_recipe(), ["--set", "train.epochs.x=1"], ["--set"]),
    "set_deep_nesting": (_recipe(), ["--set", "train.epochs=" + "[" * 3000 + "]" * 3000], ["--set"]),
    "unknown_option": (_recipe(), ["--bogus"], ["--bogus"]),
}
RUN_CASES = {  # commands on the watched finished run (or beside it)
    "evaluate_missing_folder": (["evaluate", "{tmp}/nowhere"], ["not a run folder"]),
    "evaluate_plain_folder": (["evaluate", "{tmp}"], ["not a run folder"]),
    "export_bad_format": (["export", "{run}", "--format", "tflite"], ["--format", "onnx"]),
    "compress_resume_option": (["compress", "{run}", "--resume"], ["--resume"]),
    "compress_nothing_to_do": (["compress", "{run}"], ["nothing to do"]),
    "compress_ratio_above_one": (["compress", "{run}", "--prune", "2"], ["--prune", "less than 1"]),
    "compress_mode_unknown": (["compress", "{run}", "--quantize", "int4"], ["int4"]),
    "compress_target_unknown": (["compress", "{run}", "--quantize", "dynamic", "--target", "arm"], ["arm"]),
    "compress_calibration_alone": (["compress", "{run}", "--calibration", "entropy"], ["--quantize"]),
    "compress_keep_alone": (["compress", "{run}", "--keep", "body.0"], ["--prune"]),
    "inspect_shape_letters": (["inspect", "mlp", "--input-shape", "1,x,28"], ["--input-shape"]),
    "inspect_unknown_model": (["inspect", "resnet99", "--input-shape", "1,8,8"], ["resnet99"]),
    "missing_argument": (["evaluate"], ["Missing argument"]),
    "unknown_command": (["distil", "x"], ["distil"]),
    "resume_other_recipe": (["distill", "{tmp}/other.yaml", "--out", "{run}", "--resume"], ["recipe differs"]),
    "existing_run_no_flag": (["distill", "{tmp}/same.yaml", "--out", "{run}"], ["already holds a run"]),
    "out_is_a_file": (["distill", "{tmp}/same.yaml", "--out", "{tmp}/ok.csv"], ["is a file"]),
    "out_below_a_file": (["distill", "{tmp}/same.yaml", "--out", "{tmp}/ok.csv/run"], ["Not a directory"]),
    "out_unwritable": (["distill", "{tmp}/same.yaml", "--out", "/sys/protege-matrix"], ["choose a writable folder"]),
    "resume_nothing": (["distill", "{tmp}/same.yaml", "--out", "{tmp}/empty", "--resume"], ["cannot resume"]),
    "non_run_folder_not_empty": (["distill", "{tmp}/same.yaml", "--out", "{tmp}/notes"], ["not empty"]),
}
DAMAGED_CASES = {  # a copy of the run with one file damaged; the command must name the file
    "nan_student_evaluate": ("nan_student", ["evaluate"], ["model.safetensors", "NaN"]),
    "nan_student_export": ("nan_student", ["export"], ["model.safetensors", "NaN"]),
    "truncated_student_evaluate": ("truncated_student", ["evaluate"], ["model.safetensors"]),
    "truncated_onnx_evaluate": ("truncated_onnx", ["evaluate"], ["student.onnx"]),
    "truncated_recipe_evaluate": ("truncated_recipe", ["evaluate"], ["recipe.yaml"]),
    "binary_recipe_export": ("binary_recipe", ["export"], ["recipe.yaml"]),
    "garbage_choice_evaluate": ("garbage_choice", ["evaluate"], ["choice.json"]),
    "garbage_pruned_config": ("garbage_pruned", ["evaluate"], ["config.json"]),
}


def _digests(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []
        for p in files:
            if p.is_file() and p.name != ".protege.lock":
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run, data files and recipes that the cases point at."""
    import subprocess

    tmp = tmp_path_factory.mktemp("matrix")
    (tmp / "same.yaml").write_text(yaml.safe_dump(_recipe()))
    proc = subprocess.run([PROTEGE, "distill", str(tmp / "same.yaml"), "--out", str(tmp / "run")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (tmp / "other.yaml").write_text(yaml.safe_dump(_recipe(train__lr=0.02)))
    (tmp / "ok.csv").write_text(CSV_OK)
    (tmp / "inf.csv").write_text(CSV_OK + "inf,1,0\n")
    (tmp / "empty").mkdir()
    (tmp / "notes").mkdir()
    (tmp / "notes" / "mine.txt").write_text("keep")
    shutil.copy(tmp / "run" / "student.onnx", tmp / "t.onnx")
    _your_data(tmp)
    return tmp


def _your_data(tmp: Path) -> None:
    """The files of issue 16's bad-input cases: CSVs, image folders, arrays and a datasets folder, each wrong one way."""
    import numpy as np
    from PIL import Image

    rows = CSV_OK.splitlines()
    (tmp / "latin.csv").write_bytes(("\n".join(rows[:2] + ["\xe9,3,1"] + rows[2:]) + "\n").encode("latin-1"))
    (tmp / "blank.csv").write_text("\n".join(rows[:4] + [",1,0"] + rows[4:]) + "\n")
    (tmp / "nan.csv").write_text(CSV_OK + "3,nan,1\n")
    (tmp / "mixed.csv").write_text("\n".join(rows[:2] + ["2,3,cat"] + rows[2:]) + "\n")
    (tmp / "nolabel.csv").write_text("\n".join(rows[:6] + ["5,1,"] + rows[6:]) + "\n")
    (tmp / "oneclass.csv").write_text("a,b,label\n" + "".join(f"{i},{i},same\n" for i in range(30)))
    for name, odd in (("images_bad", False), ("images_sizes", True), ("images_empty", False), ("images_ok", False)):
        for c in ("x", "y"):
            (tmp / name / c).mkdir(parents=True, exist_ok=True)
            for i in range(6):
                Image.new("L", (9 if (odd and c == "y" and i == 5) else 8, 8)).save(tmp / name / c / f"{i}.png")
    (tmp / "images_bad" / "x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    (tmp / "images_ok" / "list.csv").write_text("path,label\ngone.png,x\nx/0.png,x\ny/0.png,y\n")
    for f in (tmp / "images_empty" / "x").iterdir():
        f.unlink()
    np.save(tmp / "x.npy", np.zeros((20, 3), np.float32))
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"x": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 0, 1]}).save_to_disk(str(tmp / "hf"))


def _fill(arg: str, world: Path, out: Path) -> str:
    return arg.replace("{run}", str(world / "run")).replace("{out}", str(out)).replace("{tmp}", str(world))


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe_or_option(case, world, tmp_path, capsys):
    recipe, extra, words = RECIPE_CASES[case]
    path, out = tmp_path / "recipe.yaml", tmp_path / "out"
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    elif recipe == "__dup__":
        path.write_text(yaml.safe_dump(_recipe()) + "train: {epochs: 2}\n")
    elif isinstance(recipe, str) and recipe.startswith("__yaml__"):
        path.write_text(yaml.safe_dump(_recipe()))
        extra = ["--set", recipe.removeprefix("__yaml__")]
    elif isinstance(recipe, str):
        path.write_text(recipe)
    else:
        path.write_text(_fill(yaml.safe_dump(recipe, width=10**6), world, out))
    watched = _digests(world, path)
    code, err = run_cli(["distill", path, "--out", out, *[_fill(a, world, out) for a in extra]], capsys)
    assert_clean_error(code, err, *words)
    assert _digests(world, path) == watched
    assert not out.exists(), "a failed start left a run folder behind"


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_bad_command_on_a_run(case, world, tmp_path, capsys):
    args, words = RUN_CASES[case]
    watched = _digests(world)
    code, err = run_cli([_fill(a, world, tmp_path / "out") for a in args], capsys)
    assert_clean_error(code, err, *words)
    assert _digests(world) == watched
    assert not (world / "empty").exists() or not any((world / "empty").iterdir())


def _damage(run: Path, how: str) -> None:
    if how == "nan_student":
        w = load_file(str(run / "student" / "model.safetensors"))
        save_file({k: torch.full_like(v, float("nan")) for k, v in w.items()}, str(run / "student" / "model.safetensors"))
    elif how == "truncated_student":
        p = run / "student" / "model.safetensors"
        p.write_bytes(p.read_bytes()[:200])
    elif how == "truncated_onnx":
        p = run / "student.onnx"
        p.write_bytes(p.read_bytes()[:300])
    elif how == "truncated_recipe":
        p = run / "recipe.yaml"
        p.write_text(p.read_text()[:30])
    elif how == "binary_recipe":
        (run / "recipe.yaml").write_bytes(bytes(range(256)))
    elif how == "garbage_choice":
        (run / "quantized").mkdir(exist_ok=True)
        (run / "quantized" / "choice.json").write_text("{oops")
    elif how == "garbage_pruned":
        (run / "pruned").mkdir(exist_ok=True)
        shutil.copy(run / "student" / "model.safetensors", run / "pruned" / "model.safetensors")
        (run / "pruned" / "config.json").write_text("[1, 2")


@pytest.mark.parametrize("case", list(DAMAGED_CASES))
def test_damaged_run_file(case, world, tmp_path, capsys):
    how, args, words = DAMAGED_CASES[case]
    run = shutil.copytree(world / "run", tmp_path / "run")
    _damage(run, how)
    watched = _digests(run)
    code, err = run_cli([*args, run], capsys)
    assert_clean_error(code, err, *words)
    assert _digests(run) == watched


def test_the_table_has_at_least_60_distinct_cases():
    assert len(RECIPE_CASES) + len(RUN_CASES) + len(DAMAGED_CASES) >= 60
