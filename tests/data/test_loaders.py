"""Data loaders (protege.data.loaders): seeded, stratified splits."""
import torch

from protege.data import load_data
from protege.recipe import DataConfig


def test_digits_split_is_seeded_and_stratified():
    a, b, c = load_data(DataConfig(), 0), load_data(DataConfig(), 0), load_data(DataConfig(), 1)
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.train.x, c.train.x)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    # stratified: every class is in every split
    assert all(len(set(s.y.tolist())) == 10 for s in (a.train, a.val, a.test))
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10

