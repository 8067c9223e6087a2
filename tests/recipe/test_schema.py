"""Recipe validation (protege.recipe.schema): fields that need each other, bounds on counts, floats and the
temperature, ignored fields, plain kwargs, and long values shortened in the message."""
from __future__ import annotations


import pytest
import yaml

from protege.errors import RecipeError
from protege.recipe import CausalLMRecipe, ClassifyRecipe, DistillConfig, LMDistillConfig, load_recipe, parse_recipe

from ..helpers import assert_clean_error, run_cli
from ..helpers import tiny_recipe_file as _recipe
from ..helpers import recipe_error as _error, recipe_file as _file


def test_teacher_needs_a_source(tiny):
    del tiny["teacher"]["train"]
    with pytest.raises(RecipeError, match="teacher needs"):
        parse_recipe(tiny, "r.yaml")


def test_long_model_name(tmp_path, tiny):
    from protege.recipe.schema import _is_dir

    tiny["teacher"]["model"] = "m" * 300
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "mine.yaml", "teacher.model", "too long")
    assert _is_dir("m" * 300) is False  # the validators' folder check never raises (OSError: File name too long)
    tiny["teacher"]["model"] = "mlp"
    tiny["data"] = {"source": "text", "path": "x/" * 3000}
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "mine.yaml", "data.path", "too long")


def test_seed_must_fit_numpy(tmp_path, tiny):
    tiny["seed"] = 10**22
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "mine.yaml", "seed", "4294967295")
    tiny["seed"] = 2**32 - 1
    assert load_recipe(_file(tmp_path, tiny)).seed == 2**32 - 1
    _error(lambda: load_recipe(_file(tmp_path, tiny), ["seed=-1"]), "--set seed=-1", "field 'seed'")


@pytest.mark.parametrize("field", ["train.epochs", "train.batch_size", "eval.threads", "eval.rounds", "distill.generations"])
def test_huge_counts_are_refused(tmp_path, tiny, field):
    _error(lambda: load_recipe(_file(tmp_path, tiny), [f"{field}={10**22}"]), f"--set {field}=", f"field '{field}'", "less than")


@pytest.mark.parametrize("item", ["train.lr=.inf", "train.lr=.nan", "teacher.train.lr=-.inf", "distill.alpha=.nan",
                                  "train.weight_decay=.inf", "export.tolerance=.inf"])
def test_floats_must_be_finite(tmp_path, tiny, item):
    field = item.split("=")[0]
    _error(lambda: load_recipe(_file(tmp_path, tiny), [item]), f"--set {item}", f"field '{field}'")


def test_temperature_has_an_upper_bound(tmp_path, tiny):
    tiny["distill"]["temperature"] = 1e300
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "mine.yaml", "distill.temperature", "less than or equal to 1000")
    tiny["distill"]["temperature"] = 1000.0
    assert load_recipe(_file(tmp_path, tiny)).distill.temperature == 1000


def test_onnx_teacher_with_ignored_fields(tmp_path, tiny):
    tiny["teacher"]["model"] = "teacher.onnx"
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "mine.yaml", "teacher.train is ignored", "remove teacher.train")
    tiny["teacher"] = {"model": "teacher.onnx", "weights": "t.safetensors"}
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "teacher.weights is ignored", "remove teacher.weights")
    tiny["teacher"] = {"model": "teacher.onnx", "kwargs": {"hidden": [8]}}
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "teacher.kwargs is ignored")
    tiny["teacher"] = {"model": "teacher.onnx"}
    tiny["more_teachers"] = [{"model": "t2.onnx", "train": {"epochs": 1}}]
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "more_teachers[0].train is ignored")
    tiny["more_teachers"] = []
    assert load_recipe(_file(tmp_path, tiny)).teacher.model == "teacher.onnx"


def test_other_ignored_fields(tmp_path, tiny):
    tiny["teacher"]["weights"] = "t.safetensors"  # loaded, so teacher.train would never run
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "teacher.train is ignored when teacher.weights", "remove teacher.train")
    del tiny["teacher"]["weights"]
    tiny["more_teachers"] = [{"model": "mlp", "weights": "m.safetensors", "train": {"epochs": 1}}]
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "more_teachers[0].train is ignored")
    tiny["more_teachers"] = []
    tiny["student"]["init_every"] = 2
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "student.init_every is used only with student.init")
    del tiny["student"]["init_every"]
    tiny["student"]["model"] = "student.onnx"
    _error(lambda: load_recipe(_file(tmp_path, tiny)), "student.model is an .onnx file")


def test_kwargs_hold_plain_values(tmp_path, tiny):
    path = _file(tmp_path, yaml.safe_dump(tiny).replace("    - 16\n", "    - 16\n    when: 2024-01-01\n"))
    _error(lambda: load_recipe(path), "student.kwargs", "'when' is datetime.date(2024, 1, 1)")
    _error(lambda: load_recipe(_file(tmp_path, tiny), ["student.kwargs.p=.nan"]), "--set student.kwargs.p=.nan", "finite")


def test_long_values_are_shortened(tmp_path, tiny):
    tiny["train"]["epochs"] = "e" * 10_000
    message = _error(lambda: load_recipe(_file(tmp_path, tiny)), "train.epochs", "...")
    assert len(message) < 400


def test_rounds_zero_is_a_recipe_error(tiny):
    tiny["eval"]["rounds"] = 0
    with pytest.raises(RecipeError, match=r"field 'eval.rounds' is 0"):
        parse_recipe(tiny, "r.yaml")
    tiny["eval"]["rounds"] = 3
    assert parse_recipe(tiny).eval.rounds == 3


@pytest.mark.parametrize("value", ["1e6", ".inf", "1.0e300"])
def test_absurd_learning_rates_are_refused_before_training(tmp_path, capsys, value):
    code, err = run_cli(["distill", _recipe(tmp_path), "--out", tmp_path / "out", "--set", f"train.lr={value}"], capsys)
    assert_clean_error(code, err, "train.lr")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- one recipe type per task
def test_the_task_picks_the_recipe_type_and_its_distill_config(tiny, tmp_path):
    classify = parse_recipe(tiny)
    (tmp_path / "tok").mkdir()  # a Hugging Face folder (as far as the recipe can tell)
    assert isinstance(classify, ClassifyRecipe) and isinstance(classify.distill, DistillConfig)
    lm = parse_recipe({"task": "causal_lm", "data": {"source": "lm_text", "path": "c.jsonl"},
                       "teacher": {"model": str(tmp_path / "tok")}, "student": {"model": str(tmp_path / "tok")},
                       "distill": {"topk": 8}})
    assert isinstance(lm, CausalLMRecipe) and isinstance(lm.distill, LMDistillConfig) and lm.distill.topk == 8
    assert "features" not in lm.distill.model_dump() and "topk" not in classify.distill.model_dump()


@pytest.mark.parametrize("distill, words", [
    ({"topk": 8}, ["'distill.topk' is for task: causal_lm, not for task: classify"]),
    ({"on_policy": 0.5}, ["'distill.on_policy' is for task: causal_lm"]),
    ({"response": "uld"}, ["'distill.response' is 'uld', which is for task: causal_lm", "allowed values for task: classify"]),
    ({"response": "nope"}, ["'distill.response' is 'nope'; allowed values: 'kl'"]),
])
def test_a_field_or_value_of_the_other_task_is_refused_by_the_type(tiny, distill, words):
    _error(lambda: parse_recipe({**tiny, "distill": distill}), *words)


def test_an_unknown_task_is_refused_with_the_tasks_there_are(tiny):
    _error(lambda: parse_recipe({**tiny, "task": "seq2seq"}), "field 'task' is 'seq2seq'", "'classify', 'causal_lm'")


def test_a_run_folder_written_before_the_split_still_loads(tiny):
    """recipe.yaml of earlier versions lists every distill field of both tasks at its default: still a recipe."""
    old = {**tiny, "distill": {**DistillConfig().model_dump(), "topk": None, "topk_cache": None, "on_policy": 0.0,
                               "prompt_tokens": 16}}
    assert parse_recipe(old).distill == DistillConfig()
    _error(lambda: parse_recipe({**old, "distill": {**old["distill"], "topk": 4}}), "'distill.topk' is for task: causal_lm")
