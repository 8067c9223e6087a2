"""Text models (protege.models.text): Hugging Face folder errors and students that run on token ids."""
import pytest
import torch

import protege
from protege.data import load_data
from protege.errors import ModelError
from protege.models import build_model
from protege.recipe import parse_recipe

from ..text_fixtures import write_bert_folder
from ..helpers import text_recipe as _recipe


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


def test_text_students_run_on_token_ids(folders):
    d = load_data(parse_recipe(_recipe(folders)).data, 0)
    for spec in ({"model": "bilstm"}, {"model": "bert", "kwargs": {"hidden": 16, "layers": 1, "heads": 2}}):
        m = build_model(protege.recipe.ModelSpec(**spec), d.input_shape, d.num_classes, d.model_args)
        assert m(d.val.x[:3]).shape == (3, 2)
