"""Bad input: a one-line error naming the problem and the fix, exit code 2, no traceback, nothing lost."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch
import yaml

from protege.cli import main

from .conftest import HERE
from .helpers import assert_clean_error, run_cli


@pytest.fixture
def distill(tmp_path, tiny, write_recipe, capsys):
    """Write a recipe (after ``edit``) and run `protege distill` on it into tmp/out."""

    def go(edit=None, *extra: str, raw: str | None = None):
        if raw is not None:
            path = tmp_path / "r.yaml"
            path.write_text(raw)
        else:
            if edit:
                edit(tiny)
            path = write_recipe(tiny)
        return run_cli(["distill", path, "--out", tmp_path / "out", *extra], capsys)

    return go


def test_missing_recipe(tmp_path, capsys):
    assert_clean_error(*run_cli(["distill", tmp_path / "nope.yaml"], capsys), "nope.yaml", "not found")


def test_malformed_yaml(distill):
    assert_clean_error(*distill(raw="teacher: {model: mlp\n  train: [\n"), "malformed YAML", "line")


def test_unknown_field(distill):
    assert_clean_error(*distill(lambda r: r["train"].update(epoch=3)), "train.epoch", "did you mean 'epochs'")


def test_wrong_type(distill):
    assert_clean_error(*distill(lambda r: r["train"].update(epochs="many")), "train.epochs", "'many'", "integer")


def test_epochs_below_one(distill):
    assert_clean_error(*distill(lambda r: r["train"].update(epochs=0)), "train.epochs", "greater than or equal to 1")


def test_temperature_not_positive(distill):
    assert_clean_error(*distill(lambda r: r["distill"].update(temperature=0)), "distill.temperature", "greater than 0")


def test_alpha_outside_unit_interval(distill):
    assert_clean_error(*distill(lambda r: r["distill"].update(alpha=1.5)), "distill.alpha", "less than or equal to 1")


def test_unknown_response_lists_allowed(distill):
    assert_clean_error(*distill(lambda r: r["distill"].update(response="kld")), "distill.response", "'kl'", "'dkd'")


def test_bad_set_override(distill):
    assert_clean_error(*distill(None, "--set", "train.epochs"), "KEY=VALUE")


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


def test_csv_without_target_column(distill, tmp_path):
    p = _csv(tmp_path, "a,b,y\n1,2,0\n3,4,1\n")
    code, err = distill(lambda r: r.update(data={"source": "csv", "path": str(p), "target": "label"}))
    assert_clean_error(code, err, "'label' not found", "a, b, y")


def test_text_in_numeric_column(distill, tmp_path):
    rows = "".join(f"{i},{'x' if i == 7 else i},{i % 2}\n" for i in range(40))
    p = _csv(tmp_path, "a,b,y\n" + rows)
    code, err = distill(lambda r: r.update(data={"source": "csv", "path": str(p), "target": "y", "numeric": ["a", "b"]}))
    assert_clean_error(code, err, "column 'b'", "'x'", "data.categorical")


def test_teacher_classes_disagree_with_data(distill):
    assert_clean_error(*distill(lambda r: r["teacher"]["kwargs"].update(num_classes=3)), "teacher", "3", "10 classes")


def test_user_module_file_not_found(distill):
    assert_clean_error(*distill(lambda r: r["student"].update(model="nowhere/model.py:build")), "nowhere/model.py", "not found")


def test_user_factory_not_found(distill):
    ref = f"{HERE / 'slow_mlp.py'}:buidl"
    assert_clean_error(*distill(lambda r: r["student"].update(model=ref)), "no callable 'buidl'", "build")


def test_factory_returns_non_module(distill):
    ref = f"{HERE / 'slow_mlp.py'}:not_a_module"
    assert_clean_error(*distill(lambda r: r["student"].update(model=ref, kwargs={})), "not a torch.nn.Module")


def test_unknown_zoo_model(distill):
    assert_clean_error(*distill(lambda r: r["student"].update(model="resnet99")), "unknown model 'resnet99'", "resnet20")


class _Evil:
    marker: Path = Path()

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_refused_without_flag_and_never_unpickled(distill, tmp_path):
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    weights = tmp_path / "teacher.pt"
    weights.write_bytes(pickle.dumps({"x": _Evil()}))
    code, err = distill(lambda r: (r["teacher"].update(weights=str(weights)), r["teacher"].pop("train")))
    assert_clean_error(code, err, "pickle", "--allow-pickle", ".safetensors")
    assert not marker.exists()


def test_pickle_allowed_with_flag(tmp_path, tiny, write_recipe, capsys):
    from protege.models.zoo import MLP

    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(MLP((1, 8, 8), 10, hidden=[64]).state_dict(), weights)
    tiny["teacher"].update(weights=str(weights))
    tiny["teacher"].pop("train")
    tiny["train"]["epochs"] = 1
    code, err = run_cli(["distill", write_recipe(tiny), "--out", tmp_path / "out", "--allow-pickle"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "report.json").is_file()


def test_corrupt_safetensors(distill, tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_clean_error(*distill(lambda r: (r["teacher"].update(weights=str(bad)), r["teacher"].pop("train"))), "not a readable safetensors")


def test_corrupt_onnx(distill, tmp_path):
    bad = tmp_path / "t.onnx"
    bad.write_bytes(b"this is not protobuf")
    code, err = distill(lambda r: r.update(teacher={"model": str(bad)}))
    assert_clean_error(code, err, "not a valid ONNX model")


def test_existing_run_is_refused_and_kept(distill, tmp_path):
    tiny_run = distill(lambda r: (r["train"].update(epochs=1), r["teacher"]["train"].update(epochs=1)))
    assert tiny_run[0] == 0
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".protege.lock"}
    (out / "my_notes.txt").write_text("mine")
    code, err = distill()
    assert_clean_error(code, err, "already holds a run", "--resume", "--overwrite")
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name not in ("my_notes.txt", ".protege.lock")}
    assert after == before
    assert (out / "my_notes.txt").read_text() == "mine"


def test_non_run_folder_is_refused(distill, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data.csv").write_text("keep me")
    assert_clean_error(*distill(), "not empty")
    assert (tmp_path / "out" / "data.csv").read_text() == "keep me"


def test_fashion_mnist_missing_files(distill, tmp_path):
    code, err = distill(lambda r: r.update(data={"source": "fashion_mnist", "path": str(tmp_path / "none")}))
    assert_clean_error(code, err, "apt-get install dataset-fashion-mnist", "data.path")


def test_evaluate_folder_without_run(tmp_path, capsys):
    assert_clean_error(*run_cli(["evaluate", tmp_path], capsys), "not a run folder", "protege distill")


def test_export_run_without_student(tmp_path, tiny, capsys):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny))
    assert_clean_error(*run_cli(["export", tmp_path], capsys), "no finished student", "--resume")


def test_unknown_export_format(tmp_path, capsys):
    assert_clean_error(*run_cli(["export", tmp_path, "--format", "tflite"], capsys), "tflite", "onnx")


def test_model_kwargs_rejected_by_the_factory(distill):
    assert_clean_error(*distill(lambda r: r["teacher"].update(model="resnet", kwargs={"depth": 10})), "6n+2", "kwargs")


def test_model_that_does_not_fit_the_data(distill, tmp_path):
    p = _csv(tmp_path, "a,b,y\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(40)))
    code, err = distill(lambda r: (r.update(data={"source": "csv", "path": str(p), "target": "y"}),
                                   r["teacher"].update(model="cnn", kwargs={})))
    assert_clean_error(code, err, "teacher cannot run on this data")


def test_split_too_small_for_the_classes(distill):
    assert_clean_error(*distill(lambda r: r["data"].update(val_fraction=0.001)), "cannot hold all 10 classes")


def test_set_value_not_yaml(distill):
    assert_clean_error(*distill(None, "--set", "name=[a"), "not valid YAML")


def test_csv_not_utf8(distill, tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("a,y\n\xe9t\xe9,0\n".encode("latin-1"))
    assert_clean_error(*distill(lambda r: r.update(data={"source": "csv", "path": str(p), "target": "y"})),
                       "latin.csv: line 2, byte 1 (0xe9) is not UTF-8 text", "data.encoding")


def test_corrupt_pickle_with_flag(distill, tmp_path):
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"\x80\x04garbage")
    assert_clean_error(*distill(lambda r: (r["teacher"].update(weights=str(bad)), r["teacher"].pop("train")), "--allow-pickle"), "could not be unpickled")


def test_augment_on_a_table(distill, tmp_path):
    p = _csv(tmp_path, "a,b,y\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(40)))
    code, err = distill(lambda r: (r.update(data={"source": "csv", "path": str(p), "target": "y"}), r["train"].update(augment=True)))
    assert_clean_error(code, err, "augment is for images", "train.augment")


def test_unknown_quantize_target_in_the_recipe(distill, tmp_path):
    code, err = distill(lambda r: r.update(quantize={"mode": "static", "target": "avx512"}))
    assert_clean_error(code, err, "quantize.target", "'avx512'", "'portable'", "'this_cpu'")
    assert not (tmp_path / "out").exists()


def test_overwrite_removes_only_what_protege_wrote(distill, tmp_path):
    def short(r):
        r["train"].update(epochs=1)
        r["teacher"]["train"].update(epochs=1)

    assert distill(short)[0] == 0
    out = tmp_path / "out"
    assert (out / "teacher_cache").is_dir()
    mine = {"student/genome.txt": "g", "student/generated_by_me/data.csv": "a,b", "teacher_cache/my_features.npy": "x",
            "student/gen1_notes.txt": "n"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    code, err = distill(short, "--overwrite")
    assert code == 0, err
    assert all((out / rel).read_text() == text for rel, text in mine.items())
    assert any((p / "meta.json").is_file() for p in (out / "teacher_cache").iterdir())  # the cache was rebuilt beside them


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "a/b", ".."])
def test_recipe_name_must_be_a_plain_folder_name(distill, tmp_path, name):
    code, err = distill(lambda r: r.update(name=name))
    assert_clean_error(code, err, "must be a plain folder name", "runs/<name>")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, words", [(["distill", "r.yaml", "--bogus"], ["No such option: --bogus", "protege distill --help"]),
                                         (["compress", "runs/x", "--resume"], ["No such option: --resume", "protege compress --help"]),
                                         (["distill"], ["Missing argument", "protege distill --help"])])
def test_usage_errors_are_one_line_without_traceback(capsys, args, words):
    assert_clean_error(*run_cli(args, capsys), *words)


def test_no_arguments_prints_the_help_and_no_empty_error(capsys):
    old = sys.argv
    sys.argv = ["protege"]
    try:
        with pytest.raises(SystemExit) as exit_:
            main()
    finally:
        sys.argv = old
    out = capsys.readouterr()
    assert exit_.value.code == 2
    assert "Usage" in out.out + out.err and "error:" not in out.err and "Traceback" not in out.err
