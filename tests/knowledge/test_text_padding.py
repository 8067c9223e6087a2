"""Text batches padded per batch (protege.data.stream.trim): token ids are cut to each batch's longest text in
training, validation and the teacher cache, whose sequence axes are found and cut to match."""
from __future__ import annotations

import pytest
import torch

from protege.data.stream import batches, trim
from protege.knowledge import Teacher, load_or_build_cache
from protege.knowledge.teacher import predict_logits
from protege.models.text import hf_classifier

from ..log_capture import logged
from ..text_fixtures import write_bert_folder


def test_trim_cuts_a_batch_to_its_longest_text():
    x = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0], [8, 9, 3, 0, 0]])
    assert torch.equal(trim(x, 0), x[:, :3])
    assert trim(torch.zeros(2, 4, dtype=torch.long), 0).shape == (2, 1)  # nothing but padding: one position
    assert trim(x, None) is x  # not text: untouched
    got = [b[0].shape[1] for b in batches(x, torch.arange(3), [torch.tensor([1]), torch.tensor([0, 2])], pad_id=0)]
    assert got == [1, 3]


def _ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Right-padded ids (pad 0) of 2 to ``length`` tokens, ids 5..30."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, length, dtype=torch.long)
    for i, k in enumerate(torch.randint(2, length // 2, (n,), generator=g).tolist()):
        x[i, :k] = torch.randint(5, 30, (k,), generator=g)
    return x


def test_cached_hidden_states_and_attention_are_cut_to_the_batch(tmp_path):
    model = hf_classifier(str(write_bert_folder(tmp_path / "bert", layers=2)), num_classes=2, pad_id=0).eval()
    x = _ids(40, 24)
    paths = ["hidden.2", "attention.1", "logits"]
    cache = load_or_build_cache(tmp_path / "c", {"teacher": "t", "data": "d"}, model, x, paths[:2], pad_id=0)
    dims = {name: e["seq_dims"] for name, e in cache.meta["entries"].items()}
    assert dims == {"logits": [], "hidden.2": [1], "attention.1": [2, 3]}  # (B, L, H) and (B, heads, L, L)
    for idx in (torch.tensor([3, 0, 17]), torch.arange(40)):
        xb = trim(x[idx], 0)
        assert xb.shape[1] < 24  # the longest text of the batch, not the data's length
        cached, live = Teacher(model, cache, paths)(xb, idx), Teacher(model, None, paths)(xb, idx)
        for p in paths[:2]:
            assert cached.features[p].shape == live.features[p].shape
            torch.testing.assert_close(cached.features[p], live.features[p], atol=2e-3, rtol=2e-3)  # float16 on disk
        torch.testing.assert_close(cached.logits, live.logits, atol=1e-5, rtol=1e-5)
    full = Teacher(model, cache, paths)(x[:4], torch.arange(4))  # a batch at the full length gets the full length
    assert full.features["attention.1"].shape[-1] == 24


def test_a_masked_encoder_gives_the_same_logits_cut_or_padded(tmp_path):
    model = hf_classifier(str(write_bert_folder(tmp_path / "bert", layers=2)), num_classes=2, pad_id=0).eval()
    x = _ids(64, 32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(model, x, batch_size=16, pad_id=0), predict_logits(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("student, cut", [("bert", True), ("bilstm", False), ("folder", True)])
def test_batches_are_cut_only_when_every_model_masks_its_padding(folders, student, cut):
    """The BiLSTM runs its backward direction over the padding, so a run with one keeps every batch at the data's
    length; Hugging Face folders and the zoo's bert mask padding, so theirs are cut."""
    from protege.recipe import parse_recipe
    from protege.stages.tasks import load_run_data

    teacher = str(folders["teacher"])
    recipe = parse_recipe({"name": "t", "data": {"source": "text", "path": str(folders["data"]), "max_length": 24},
                           "teacher": {"model": teacher},
                           "student": {"model": teacher if student == "folder" else student}})
    with logged([]) as said:
        data = load_run_data(recipe)
    assert all((s.pad_id is not None) == cut for s in (data.train, data.val, data.test))
    assert any("may not mask padding" in m for m in said) == (not cut)
