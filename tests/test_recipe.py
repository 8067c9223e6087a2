"""The recipe schema: defaults, overrides, and the resolved recipe round trip."""
import pytest
import yaml

from protege.errors import RecipeError
from protege.recipe import apply_overrides, dump_recipe, load_recipe, parse_recipe


def test_defaults_and_round_trip(tmp_path, tiny):
    r = parse_recipe(tiny)
    assert r.distill.response == "kl" and r.export.tolerance == 1e-4 and r.train.optimizer == "adamw"
    dump_recipe(r, tmp_path / "r.yaml")
    assert parse_recipe(yaml.safe_load((tmp_path / "r.yaml").read_text())) == r


def test_overrides_parse_yaml_values(tiny):
    data = apply_overrides(tiny, ["train.epochs=7", "distill.response=dkd", "student.kwargs.hidden=[4, 4]", "train.augment=true"])
    r = parse_recipe(data)
    assert r.train.epochs == 7 and r.distill.response == "dkd" and r.student.kwargs["hidden"] == [4, 4] and r.train.augment


def test_teacher_needs_a_source(tiny):
    del tiny["teacher"]["train"]
    with pytest.raises(RecipeError, match="teacher needs"):
        parse_recipe(tiny, "r.yaml")


def test_recipe_must_be_a_mapping(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)


def test_errors_name_file_and_field(tmp_path, tiny):
    tiny["eval"]["threads"] = 0
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(tiny))
    with pytest.raises(RecipeError, match=r"mine.yaml: field 'eval.threads' is 0"):
        load_recipe(p)
