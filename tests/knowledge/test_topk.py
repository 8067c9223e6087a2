"""The teacher's top-k token cache (protege.knowledge.topk) on a tiny Llama."""
import pytest
import torch

from protege.errors import DataError
from protege.knowledge.topk import load_or_build_topk

from ..log_capture import logged
from ..helpers import lm_teacher_and_data as _teacher_and_data


def test_topk_cache_holds_the_teachers_top_tokens_and_is_keyed(lm, tmp_path):
    teacher, d = _teacher_and_data(lm)
    key = {"teacher": "abc", "data": d.fingerprint()}
    cache = load_or_build_topk(tmp_path / "c", key, teacher, d.train.x, 5, 2.0)
    idx = torch.tensor([3, 0, 7])
    ids, buckets = cache.get(idx)
    with torch.no_grad():
        full = torch.log_softmax(teacher(d.train.x[idx]).float() / 2.0, -1)
    top = full.topk(5, -1)
    assert torch.equal(ids, top.indices)  # in the caller's order, not sorted
    assert torch.allclose(buckets[..., :5], top.values, atol=2e-3)  # fp16 log-probabilities
    assert torch.allclose(buckets[..., 5].exp(), 1 - top.values.exp().sum(-1), atol=2e-3)  # the tail: the rest, exactly
    assert torch.allclose(buckets.exp().sum(-1), torch.ones(3, 32), atol=1e-5)
    assert cache.nbytes() < cache.full_bytes() and 0 < cache.tail_mass() < 1
    messages = []
    with logged(messages):
        load_or_build_topk(tmp_path / "c", {**key, "teacher": "other"}, teacher, d.train.x, 5, 2.0)
    assert "another teacher" in messages[0] and "rebuilding" in messages[0]
    with pytest.raises(DataError, match="made for another corpus"):
        load_or_build_topk(tmp_path / "c", {**key, "teacher": "other", "data": "x"}, teacher, d.train.x, 5, 2.0, strict=True)
    with pytest.raises(DataError, match="blocks of shape"):  # same tokens cut into other blocks
        load_or_build_topk(tmp_path / "c", {**key, "teacher": "other"}, teacher, d.train.x.reshape(-1, 16), 5, 2.0, strict=True)
    with pytest.raises(DataError, match="lower distill.topk"):
        load_or_build_topk(tmp_path / "big", key, teacher, d.train.x, 10_000, 1.0)
