"""A Llama student initialised from every other teacher layer (protege.train.init_transformer)."""
import pytest
import torch

from protege.errors import ModelError
from protege.recipe import parse_recipe

from ..helpers import lm_recipe as _recipe, lm_teacher_and_data as _teacher_and_data


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
