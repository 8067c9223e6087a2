"""One tokenizer for every model of a text run (protege.stages.tokenizers)."""
import pytest

import protege
from protege.errors import RecipeError
from protege.recipe import parse_recipe

from ..text_fixtures import write_bert_folder, write_text_data


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


def test_a_model_folder_with_another_tokenizer_is_refused_for_logit_kd(folders, tmp_path):
    other = write_bert_folder(tmp_path / "other", layers=2)
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zebra", "good"])}
                      ).save_pretrained(str(other))  # a different vocabulary: id 5 means another word
    r = parse_recipe(_recipe(folders, student={"model": str(other), "kwargs": {}}))
    with pytest.raises(RecipeError, match="has its own tokenizer"):
        protege.distill(r, tmp_path / "run")
    assert not (tmp_path / "run" / "recipe.yaml").exists()
