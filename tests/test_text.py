"""Text classification: CSV/JSONL readers, cached tokenisation, Hugging Face folders, text students, the whole
pipeline (fine-tuned teacher -> DistilBERT-style student -> ONNX -> dynamic int8), and bad input.
All on tiny, randomly initialised Hugging Face configs, offline."""
import json
import warnings

import pytest
import torch

import protege
from protege.data import load_data
from protege.errors import DataError, ModelError, ProtegeError, RecipeError
from protege.models import build_model
from protege.recipe import parse_recipe

from .text_fixtures import write_bert_folder, write_text_data, write_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"teacher": write_bert_folder(root / "teacher", layers=4), "data": write_text_data(root / "train.csv", n=320),
            "test": write_text_data(root / "test.jsonl", n=80, seed=1), "root": root}


def _recipe(folders, **over) -> dict:
    r = {"name": "text", "data": {"source": "text", "path": str(folders["data"]), "test_path": str(folders["test"]), "max_length": 16},
         "teacher": {"model": str(folders["teacher"]), "train": {"epochs": 6, "batch_size": 16, "lr": 3e-3}},
         "student": {"model": "bilstm", "kwargs": {"hidden": 16, "embed": 16}},
         "train": {"epochs": 4, "batch_size": 16, "lr": 3e-3}, "distill": {"temperature": 2.0, "alpha": 0.5},
         "eval": {"warmup": 1, "repeats_b1": 2, "repeats_b32": 1}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def test_text_data_from_csv_and_jsonl_is_tokenised_once_and_cached(folders, monkeypatch):
    r = parse_recipe(_recipe(folders))
    assert r.data.tokenizer == str(folders["teacher"])  # defaults to the teacher's folder
    d = load_data(r.data, 0)
    assert d.is_text and d.train.x.dtype == torch.int64 and d.class_names == ["neg", "pos"]
    assert len(d.test) == 80 and len(d.train) + len(d.val) == 320
    assert d.test.x.shape[1] == d.train.x.shape[1] == d.input_shape[0] <= 16
    assert (d.train.x[:, 0] == 2).all()  # [CLS] first: the tokenizer really ran
    import protege.data.text as text

    monkeypatch.setattr(text, "load_tokenizer", lambda *_: pytest.fail("tokenised again instead of reading the cache"))
    again = load_data(r.data, 0)
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)


def test_long_texts_are_truncated_with_a_warning_or_refused(folders, tmp_path):
    r = parse_recipe(_recipe(folders, data={"max_length": 6, "test_path": None}))
    with pytest.warns(UserWarning, match="truncated"):
        d = load_data(r.data, 0)
    assert d.input_shape == (6,) and (d.train.x[:, -1] != 0).any()
    r = parse_recipe(_recipe(folders, data={"max_length": 6, "too_long": "error", "test_path": None}))
    with pytest.raises(DataError, match="longer than data.max_length = 6.*too_long: truncate"):
        load_data(r.data, 0)


def test_max_length_beyond_what_the_model_allows_is_capped_with_a_warning_or_refused(folders):
    with pytest.warns(UserWarning, match="more than the 64 tokens the model allows; using 64"):
        load_data(parse_recipe(_recipe(folders, data={"max_length": 100})).data, 0)
    with pytest.raises(DataError, match="lower data.max_length to 64"):
        load_data(parse_recipe(_recipe(folders, data={"max_length": 100, "too_long": "error"})).data, 0)


@pytest.mark.parametrize("content, match", [
    ("words,label\nhello,pos\n", "has no column 'text'.*columns are: words, label"),
    ("text,label\ngood movie,pos\n  ,neg\n", "row 2 has an empty 'text'"),
    ("text,label\n", "has no rows"),
])
def test_bad_text_files_get_one_line_errors(folders, tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    r = parse_recipe(_recipe(folders, data={"path": str(path), "test_path": None}))
    with pytest.raises(DataError, match=match):
        load_data(r.data, 0)


def test_a_test_label_unknown_to_training_and_a_missing_file_are_errors(folders, tmp_path):
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"text": "good day", "label": "meh"}) + "\n")
    with pytest.raises(DataError, match="label 'meh' does not occur"):
        load_data(parse_recipe(_recipe(folders, data={"test_path": str(bad)})).data, 0)
    with pytest.raises(DataError, match="not found"):
        load_data(parse_recipe(_recipe(folders, data={"path": str(tmp_path / "nope.csv")})).data, 0)


def test_text_without_a_tokenizer_is_refused_at_validation(folders):
    with pytest.raises(RecipeError, match="data.tokenizer"):
        parse_recipe(_recipe(folders, teacher={"model": "mlp", "train": {"epochs": 1}}))


def test_model_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        build_model(protege.recipe.ModelSpec(model=str(empty)), (8,), 2)
    no_weights = write_bert_folder(tmp_path / "nw")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no weights.*pretrained: false"):
        build_model(protege.recipe.ModelSpec(model=str(no_weights)), (8,), 2)
    built = build_model(protege.recipe.ModelSpec(model=str(no_weights), kwargs={"pretrained": False}), (8,), 2)
    assert built(torch.ones(2, 8, dtype=torch.long)).shape == (2, 2)
    pickled = write_bert_folder(tmp_path / "pk", safetensors=False)
    with pytest.raises(ModelError, match="only pickle weights.*allow_pickle"):
        build_model(protege.recipe.ModelSpec(model=str(pickled)), (8,), 2)
    loaded = build_model(protege.recipe.ModelSpec(model=str(pickled), allow_pickle=True), (8,), 2)
    assert loaded(torch.ones(2, 8, dtype=torch.long)).shape == (2, 2)


def test_a_model_folder_with_another_tokenizer_is_refused_for_logit_kd(folders, tmp_path):
    other = write_bert_folder(tmp_path / "other", layers=2)
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra", "good"])}
                      ).save_pretrained(str(other))  # a different vocabulary: id 5 means another word
    r = parse_recipe(_recipe(folders, student={"model": str(other), "kwargs": {}}))
    with pytest.raises(RecipeError, match="has its own tokenizer"):
        protege.distill(r, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()


def test_inspect_lists_hidden_state_and_attention_taps(folders):
    from protege.api import inspect

    table = inspect(str(folders["teacher"]), "12")
    assert "hidden.4" in table and "attention.3" in table and "2x12x12" in table and "12x32" in table


def test_text_students_run_on_token_ids(folders):
    d = load_data(parse_recipe(_recipe(folders)).data, 0)
    for spec in ({"model": "bilstm"}, {"model": "bert", "kwargs": {"hidden": 16, "layers": 1, "heads": 2}}):
        m = build_model(protege.recipe.ModelSpec(**spec), d.input_shape, d.num_classes, d.model_args)
        assert m(d.val.x[:3]).shape == (3, 2)


@pytest.fixture(scope="module")
def distilbert_run(folders, tmp_path_factory):
    """Fine-tune the tiny teacher, distil a half-depth student initialised from its layers, export, dynamic int8."""
    r = parse_recipe(_recipe(folders, student={"model": str(folders["teacher"]), "kwargs": {"pretrained": False, "num_hidden_layers": 2},
                                               "init": "select"},
                             distill={"features": [{"loss": "hint", "student": "hidden.2", "teacher": "hidden.4"},
                                                   {"loss": "cosine", "student": "hidden.1", "teacher": "hidden.2"},
                                                   {"loss": "attention_kl", "student": "attention.1", "teacher": "attention.3"}]},
                             quantize={"mode": "auto"}))
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore")
        mp.setenv("PROTEGE_CACHE", str(tmp_path_factory.mktemp("cache")))
        return protege.distill(r, tmp_path_factory.mktemp("runs") / "distilbert")


def test_distilbert_style_student_through_the_whole_pipeline(distilbert_run):
    rep = distilbert_run.report
    assert rep["teacher"]["accuracy"] >= 0.9  # the words decide the label: a fine-tuned teacher gets it
    assert rep["student"]["accuracy"] >= 0.9
    assert rep["student"]["params"] < rep["teacher"]["params"]
    assert rep["onnx_max_abs_diff"] <= 1e-4 and rep["student_onnx"]["accuracy"] == rep["student"]["accuracy"]
    q = rep["quantization"]
    assert {c["name"] for c in q["candidates"]} == {"fp32", "dynamic"}  # static int8 is not tried on token ids
    assert (distilbert_run.path / "quantized" / "dynamic.onnx").is_file()
    metrics = [json.loads(line) for line in (distilbert_run.path / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if m["stage"] == "student")
    assert {"hint0", "cosine1", "attention_kl2"} <= set(first)


def test_the_initialised_student_starts_well_above_chance(distilbert_run, folders):
    from protege.train.init import init_from_teacher_

    data = load_data(distilbert_run.recipe.data, 0)
    teachers, _ = distilbert_run.load_models(data)
    fresh = build_model(distilbert_run.recipe.student.model_copy(update={"init": None}), data.input_shape, 2, data.model_args)
    report = init_from_teacher_(fresh, teachers[0], "select")
    assert report.mapping[1][1].endswith("layer.2")  # every other layer, as DistilBERT
    acc = float((protege.knowledge.predict_logits(fresh, data.test.x).argmax(-1) == data.test.y).float().mean())
    assert acc >= 0.75  # chance is 0.5; no training yet


def test_static_int8_is_refused_for_token_ids(distilbert_run):
    from protege.recipe import QuantizeConfig

    with pytest.raises(ProtegeError, match="token ids.*dynamic"):
        protege.compress(distilbert_run.path, quantize=QuantizeConfig(mode="static"))
