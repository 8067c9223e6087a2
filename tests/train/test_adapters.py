"""Adapters between student and teacher features (protege.train.adapters): shapes they bridge and refuse."""
from __future__ import annotations

import pytest
import torch

from protege.errors import RecipeError
from protege.train.adapters import make_adapter


def test_attention_transfer_over_different_token_counts():
    import torch

    from protege.errors import RecipeError
    from protege.train.adapters import check_term_shapes

    with pytest.raises(RecipeError, match="same number of tokens"):
        check_term_shapes("at", torch.Size([2, 5, 8]), torch.Size([2, 7, 8]), "t")
    check_term_shapes("at", torch.Size([2, 5, 8]), torch.Size([2, 5, 16]), "t")  # widths may differ


def test_adapters_bridge_shapes_and_refuse_what_cannot_be_bridged():
    a = make_adapter((4, 8, 8), (16, 4, 4), "t")
    assert a(torch.randn(2, 4, 8, 8)).shape == (2, 16, 4, 4)
    assert make_adapter((4, 2, 2), (4, 4, 4), "t")(torch.randn(2, 4, 2, 2)).shape == (2, 4, 4, 4)
    assert make_adapter((5,), (9,), "t")(torch.randn(2, 5)).shape == (2, 9)
    assert make_adapter((7, 5), (7, 9), "t")(torch.randn(2, 7, 5)).shape == (2, 7, 9)
    with pytest.raises(RecipeError, match=r"no adapter can map shape \(4, 8, 8\) to \(16,\)"):
        make_adapter((4, 8, 8), (16,), "t")
