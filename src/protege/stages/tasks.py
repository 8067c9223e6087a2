"""The tasks a recipe can name (``task:``), each a Task (stages/task.py)."""
from __future__ import annotations

from ..recipe import Recipe
from .causal_lm import CausalLMTask
from .classify import ClassifyTask
from .task import Task

TASKS: dict[str, Task] = {"classify": ClassifyTask(), "causal_lm": CausalLMTask()}


def task_for(recipe: Recipe) -> Task:
    return TASKS[recipe.task]
