"""A Llama student initialised from every other teacher layer (protege.train.init_transformer)."""
import pytest
import torch

from protege.data import load_data
from protege.errors import ModelError
from protege.recipe import parse_recipe

from ..text_fixtures import write_corpus, write_llama_folder


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {"teacher": write_llama_folder(root / "teacher"), "corpus": write_corpus(root / "corpus.jsonl"), "root": root}


def _recipe(lm, **over) -> dict:
    r = {"name": "lm", "task": "causal_lm",
         "data": {"source": "lm_text", "path": str(lm["corpus"]), "block_size": 32, "val_fraction": 0.2, "test_fraction": 0.2},
         "teacher": {"model": str(lm["teacher"])},
         "student": {"model": str(lm["teacher"]), "kwargs": {"pretrained": False, "num_hidden_layers": 2}},
         "distill": {"response": "forward_kl", "temperature": 1.0, "alpha": 0.5},
         "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3}, "eval": {"threads": 1}}
    for k, v in over.items():
        r[k] = {**r.get(k, {}), **v} if isinstance(v, dict) else v
    return r


def _teacher_and_data(lm):
    from protege.models import build_model

    d = load_data(parse_recipe(_recipe(lm)).data, 0)
    r = parse_recipe(_recipe(lm))
    return build_model(r.teacher, d.input_shape, d.num_classes, d.model_args).eval(), d


def test_student_initialised_from_every_other_teacher_layer(lm):
    from protege.models import build_model
    from protege.train.init import init_from_teacher_

    teacher, d = _teacher_and_data(lm)
    spec = parse_recipe(_recipe(lm)).student
    student = build_model(spec, d.input_shape, d.num_classes, d.model_args)
    rep = init_from_teacher_(student, teacher, "select")
    assert [t for _, t in rep.mapping] == ["model.model.layers.0", "model.model.layers.2"]
    assert torch.equal(student.model.model.layers[1].mlp.up_proj.weight, teacher.model.model.layers[2].mlp.up_proj.weight)
    assert torch.equal(student.model.model.embed_tokens.weight, teacher.model.model.embed_tokens.weight)
    narrow = build_model(spec.model_copy(update={"kwargs": {"pretrained": False, "hidden_size": 16}}), d.input_shape,
                         d.num_classes, d.model_args)
    with pytest.raises(ModelError, match="change only num_hidden_layers"):
        init_from_teacher_(narrow, teacher, "select")
