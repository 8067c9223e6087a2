"""Recipe files and --set overrides (protege.recipe.files): defaults and the round trip, YAML that is no recipe
(encodings, nesting, aliases, duplicate keys), and errors that name the file or the --set item and the field."""
import pytest
import yaml

from protege.errors import RecipeError
from protege.recipe import apply_overrides, dump_recipe, load_recipe, parse_recipe

from ..helpers import recipe_error as _error, recipe_file as _file


def test_defaults_and_round_trip(tmp_path, tiny):
    r = parse_recipe(tiny)
    assert r.distill.response == "kl" and r.export.tolerance == 1e-4 and r.train.optimizer == "adamw"
    dump_recipe(r, tmp_path / "r.yaml")
    assert parse_recipe(yaml.safe_load((tmp_path / "r.yaml").read_text())) == r


def test_overrides_parse_yaml_values(tiny):
    data = apply_overrides(tiny, ["train.epochs=7", "distill.response=dkd", "student.kwargs.hidden=[4, 4]", "train.augment=true"])
    r = parse_recipe(data)
    assert r.train.epochs == 7 and r.distill.response == "dkd" and r.student.kwargs["hidden"] == [4, 4] and r.train.augment


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


# Hostile recipes (issue 14): every one is a RecipeError of one line that names the file or --set item and the field.

def test_non_utf8_file(tmp_path, tiny):
    path = _file(tmp_path, yaml.safe_dump(tiny).encode() + "name: caf\xe9\n".encode("latin-1"))
    _error(lambda: load_recipe(path), "mine.yaml", "not UTF-8", "0xe9")


def test_binary_file(tmp_path):
    _error(lambda: load_recipe(_file(tmp_path, bytes(range(256)) * 4)), "mine.yaml", "not UTF-8")
    _error(lambda: load_recipe(_file(tmp_path, b"\x00\x01name: x\n")), "mine.yaml", "not allowed in YAML")


@pytest.mark.parametrize("deep", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "}" * 5000], ids=["lists", "mappings"])
def test_deep_nesting_in_the_file(tmp_path, tiny, deep):
    path = _file(tmp_path, yaml.safe_dump(tiny) + f"x: {deep}\n")
    _error(lambda: load_recipe(path), "mine.yaml", "nested more than 50 levels")


def test_deep_nesting_in_a_set_value(tmp_path, tiny):
    path = _file(tmp_path, tiny)
    _error(lambda: load_recipe(path, ["train.epochs=" + "[" * 5000 + "]" * 5000]), "--set train.epochs=", "nested more than")
    _error(lambda: load_recipe(path, ["teacher.kwargs.x=" + "{a: " * 5000 + "}" * 5000]), "--set teacher.kwargs.x=", "nested")


def test_an_alias_that_refers_to_itself(tmp_path, tiny):
    path = _file(tmp_path, yaml.safe_dump(tiny) + "extra: &a [*a]\n")
    _error(lambda: load_recipe(path), "mine.yaml", "refers to itself")


def test_duplicate_keys_name_the_key_and_lines(tmp_path, tiny):
    text = yaml.safe_dump(tiny, sort_keys=False)
    path = _file(tmp_path, text + "train: {epochs: 1}\n")
    first = text.splitlines().index("train:") + 1
    _error(lambda: load_recipe(path), "mine.yaml", "key 'train' is given twice", f"lines {first} and {len(text.splitlines()) + 1}")
    path = _file(tmp_path, text.replace("  lr: 0.01\n", "  lr: 0.01\n  epochs: 9\n"))
    _error(lambda: load_recipe(path), "mine.yaml", "key 'epochs' is given twice")
    _error(lambda: load_recipe(_file(tmp_path, tiny), ["teacher.kwargs={a: 1, a: 2}"]), "--set teacher.kwargs=", "'a'", "twice")


def test_merge_keys_may_override(tmp_path, tiny):
    del tiny["train"]
    path = _file(tmp_path, yaml.safe_dump(tiny) + "train:\n  <<: {epochs: 2, lr: 0.1}\n  epochs: 3\n")
    r = load_recipe(path)  # the key beside the merge wins, as YAML says: not a duplicate
    assert r.train.epochs == 3 and r.train.lr == 0.1


def test_set_unknown_field_is_blamed_on_the_option(tmp_path, tiny):
    path = _file(tmp_path, tiny)
    message = _error(lambda: load_recipe(path, ["test_path=null"]), "--set test_path=null: unknown field 'test_path'",
                     "did you mean 'data.test_path'?")
    assert "mine.yaml" not in message
    _error(lambda: load_recipe(path, ["data.tst_path=x"]), "--set data.tst_path=x", "did you mean 'data.test_path'?")
    _error(lambda: load_recipe(path, ["lr=3"]), "--set lr=3", "did you mean 'train.lr'?")


def test_set_wrong_type_is_blamed_on_the_option(tmp_path, tiny):
    message = _error(lambda: load_recipe(_file(tmp_path, tiny), ["train.epochs=many"]), "field 'train.epochs' is 'many'")
    assert message.startswith("--set train.epochs=many: ")
    tiny["train"]["epochs"] = "few"  # a bad value in the file is still the file's
    message = _error(lambda: load_recipe(_file(tmp_path, tiny), ["train.lr=0.1"]), "field 'train.epochs' is 'few'")
    assert message.startswith(str(tmp_path / "mine.yaml"))


@pytest.mark.parametrize("item, words", [("a..b=1", ["empty part"]), ("=3", ["no field name"]), (".x=1", ["empty part"]),
                                         ("train.epochs.x=1", ["'train.epochs' is 3, not a section"]),
                                         ("distill.features.7.weight=1", ["'distill.features' is a list"]),
                                         ("train.epochs", ["KEY=VALUE"]), ("x=\x00", ["not allowed in YAML"])])
def test_bad_set_keys(tmp_path, tiny, item, words):
    tiny["distill"]["features"] = [{"loss": "sp", "student": "body.0", "teacher": "body.0"}]
    _error(lambda: load_recipe(_file(tmp_path, tiny), [item]), "--set ", *words)


def test_set_reaches_list_items_and_empty_sections(tmp_path, tiny):
    tiny["distill"]["features"] = [{"loss": "sp", "student": "body.0", "teacher": "body.0"}]
    path = _file(tmp_path, yaml.safe_dump(tiny) + "prune:\n")
    r = load_recipe(path, ["distill.features.0.weight=2.5", "prune.ratio=0.5"])
    assert r.distill.features[0].weight == 2.5 and r.prune.ratio == 0.5


@pytest.mark.parametrize("content, words", [("", ["is empty", "teacher"]), ("# only a comment\n", ["is empty"]),
                                            ("- a\n- b\n", ["mapping", "list"]), ("42\n", ["mapping", "int"]),
                                            ("x: 2024-13-45\n", ["month must be in 1..12"])])
def test_files_that_are_no_recipe(tmp_path, content, words):
    _error(lambda: load_recipe(_file(tmp_path, content)), "mine.yaml", *words)


def test_paths_that_are_no_recipe_file(tmp_path):
    _error(lambda: load_recipe(tmp_path), str(tmp_path), "is a folder")
    _error(lambda: load_recipe(tmp_path / ("x" * 300 + ".yaml")), "cannot be looked up", "File name too long")
    _error(lambda: load_recipe("/dev/null"), "/dev/null", "not a regular file")
    _error(lambda: load_recipe(tmp_path / "a\nb.yaml"), "a\\nb.yaml", "not found")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    _error(lambda: load_recipe(big), "big.yaml", "too large")


def test_an_alias_bomb(tmp_path, tiny):
    bomb = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcde", "bcdef"))
    path = _file(tmp_path, yaml.safe_dump(tiny) + "bomb:\n" + "".join("  " + line + "\n" for line in bomb.splitlines()))
    _error(lambda: load_recipe(path), "mine.yaml", "more than 100,000 values")
