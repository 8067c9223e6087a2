"""Language-model corpora (protege.data.lm): split by document, cut into blocks, and bad corpus settings."""
import pytest
import torch

from protege.data import load_data
from protege.errors import DataError
from protege.recipe import parse_recipe

from ..text_fixtures import write_corpus
from ..helpers import lm_recipe as _recipe


def test_corpus_is_split_by_document_and_cut_into_blocks(lm):
    d = load_data(parse_recipe(_recipe(lm)).data, 0)
    assert d.is_lm and d.train.x.shape[1] == 32 and d.train.x.dtype == torch.int64
    assert torch.equal(d.train.x, d.train.y)  # labels are the ids, shifted inside the loss
    # 12 documents: 2 test, 2 validation, 8 train, whole documents each (about 7 blocks of 32 per document)
    assert len(d.test) < len(d.train) and len(d.val) < len(d.train)
    assert (d.train.x == 1).sum() >= 7  # <eos> joins the training documents
    limited = load_data(parse_recipe(_recipe(lm, data={"limit": 10})).data, 0)
    assert len(limited.train) == 10 and torch.equal(limited.test.x, d.test.x)


@pytest.mark.parametrize("over, match", [
    ({"data": {"block_size": 4096}}, "fewer than data.block_size"),
    ({"data": {"path": "/nonexistent/corpus.jsonl"}}, "not found"),
])
def test_bad_corpus_settings(lm, over, match):
    with pytest.raises(DataError, match=match):
        load_data(parse_recipe(_recipe(lm, **over)).data, 0)


def test_a_corpus_of_too_few_documents_is_refused(lm, tmp_path):
    path = write_corpus(tmp_path / "two.jsonl", docs=2)
    with pytest.raises(DataError, match="needs at\\s+least 3"):
        load_data(parse_recipe(_recipe(lm, data={"path": str(path)})).data, 0)
