"""The tasks a recipe can name (``task:``), each a Task (stages/task.py)."""
from __future__ import annotations

import logging

from ..data import DataSplits, load_data
from ..models.text import TEXT_ZOO, is_hf_folder
from ..recipe import Recipe
from .causal_lm import CausalLMTask
from .classify import ClassifyTask
from .task import Task

TASKS: dict[str, Task] = {"classify": ClassifyTask(), "causal_lm": CausalLMTask()}


log = logging.getLogger(__name__)
PADDING_BLIND = {"bert"}  # zoo text models that mask padding, so cutting a batch's padding leaves their outputs as they are


def task_for(recipe: Recipe) -> Task:
    return TASKS[recipe.task]


def load_run_data(recipe: Recipe) -> DataSplits:
    """The recipe's data. Text batches are cut to their longest text (``Split.pad_id``) only when every model of the
    run is known to mask its padding (Hugging Face folders, the zoo's bert): the BiLSTM runs its backward direction
    over the padding, and a user's own module or an ONNX file may too, so for them each batch keeps the full length."""
    data = load_data(recipe.data, recipe.seed if recipe.data.split_seed is None else recipe.data.split_seed)
    if data.train.pad_id is None:
        return data
    models = [m.model for m in [recipe.student, *recipe.teachers]]
    others = [m for m in models if not (m in PADDING_BLIND or (m not in TEXT_ZOO and is_hf_folder(m)))]
    if others:
        log.info(f"data: text batches keep the data's length ({others[0]} may not mask padding, so its outputs would "
                 f"depend on how much padding a batch has)")
        return data.full_length()
    return data
