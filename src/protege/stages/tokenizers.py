"""One tokenizer feeds every model of a text run: which model folders hold another tokenizer, and the checks
that refuse a run that would feed a model ids it reads as other tokens."""
from __future__ import annotations

import json
from pathlib import Path

from ..data import DataSplits
from ..data.text import tokenizer_digest
from ..errors import RecipeError
from ..models.text import is_hf_folder
from ..recipe import Recipe


def foreign_tokenizer(recipe: Recipe, model: str) -> bool:
    """Whether the Hugging Face folder ``model`` holds a tokenizer other than data.tokenizer."""

    if not is_hf_folder(model):
        return False
    folder = Path(model)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model"))
    return has_tokenizer and tokenizer_digest(str(folder)) != tokenizer_digest(recipe.data.tokenizer)


def teacher_reads_other_text(recipe: Recipe) -> bool:
    """Whether a causal-LM run's teacher has another tokenizer, which is allowed in two cases (never with student.init):
    a run that learns from text alone (next-token CE, e.g. on a corpus the teacher wrote with `protege generate`),
    where the teacher is only measured (size, speed); and ULD, where it reads each block re-tokenised with its own
    tokenizer. Either way it is never fed the student's ids."""
    d = recipe.distill
    return (recipe.task == "causal_lm" and (d.alpha == 1.0 or d.response in ("none", "uld")) and not recipe.student.init
            and foreign_tokenizer(recipe, recipe.teacher.model))


def check_tokenizers(recipe: Recipe, data: DataSplits) -> None:
    """One tokenizer feeds every model of a text run: a Hugging Face folder holding another tokenizer would read
    the ids as other tokens (the teacher silently scoring the wrong text), so that is an error, not a warning.
    The one exception is a teacher that is never fed ids (``teacher_reads_other_text``)."""

    specs = [("student", recipe.student)] + [("teacher" if i == 0 else f"more_teachers[{i - 1}]", s)
                                             for i, s in enumerate(recipe.teachers) if not recipe.ema_teacher]
    for who, spec in specs:
        if not is_hf_folder(spec.model) or (who == "teacher" and teacher_reads_other_text(recipe)):
            continue
        folder = Path(spec.model)
        if foreign_tokenizer(recipe, spec.model):
            init = who == "teacher" and recipe.task == "causal_lm" and recipe.student.init
            fix = ("student.init copies the teacher's embeddings and layers, which needs one tokenizer: remove student.init, "
                   "or use the teacher's tokenizer") if init else \
                ("every model of a text run reads the same token ids, so use one tokenizer (models that share a vocabulary), "
                 "or distil through text the teacher writes (protege generate, then a next-token CE run: distill.alpha 1), "
                 "or use distill.response uld")
            raise RecipeError(f"the {who} ({folder}) has its own tokenizer, which differs from data.tokenizer "
                              f"({recipe.data.tokenizer}); {fix}")
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        vocab, positions = config.get("vocab_size"), {**config, **spec.kwargs}.get("max_position_embeddings")
        if positions is not None and data.input_shape[0] > positions:
            what = "data.block_size" if data.is_lm else "data.max_length"
            raise RecipeError(f"the {who} ({folder}) reads at most {positions} tokens but {what} gives {data.input_shape[0]}; "
                              f"lower {what} to {positions} or less")
        if vocab is not None and vocab < data.vocab_size:
            raise RecipeError(f"the {who} ({folder}) has a vocabulary of {vocab} tokens but data.tokenizer has {data.vocab_size}; "
                              f"use the tokenizer the model was trained with")


