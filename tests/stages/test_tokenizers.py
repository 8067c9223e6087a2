"""One tokenizer for every model of a text run (protege.stages.tokenizers)."""
import pytest

import protege
from protege.errors import RecipeError
from protege.recipe import parse_recipe

from ..text_fixtures import write_bert_folder
from ..helpers import text_recipe as _recipe


def test_a_model_folder_with_another_tokenizer_is_refused_for_logit_kd(folders, tmp_path):
    other = write_bert_folder(tmp_path / "other", layers=2)
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra", "good"])}
                      ).save_pretrained(str(other))  # a different vocabulary: id 5 means another word
    r = parse_recipe(_recipe(folders, student={"model": str(other), "kwargs": {}}))
    with pytest.raises(RecipeError, match="has its own tokenizer"):
        protege.distill(r, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()
