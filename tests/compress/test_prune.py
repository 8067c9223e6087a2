"""Pruning (protege.compress.prune): structured channels removed for real and reloadable, parameter targets,
unstructured sparsity and its masks, iterative plans, and the errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from protege import PruneConfig, prune_
from protege.compress.prune import make_permanent, plan
from protege.errors import CompressError
from protege.models import save_weights
from protege.models.loading import resize_to
from protege.models.zoo import CNN, MLP, ResNet


X28 = torch.randn(2, 1, 28, 28)


def _convs(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("build", [lambda: CNN((1, 28, 28), 10, (16, 32, 64), 2), lambda: ResNet((1, 28, 28), 10, 20)])
def test_structured_pruning_removes_channels_for_real(build):
    torch.manual_seed(0)
    model = build().eval()
    before, channels = sum(p.numel() for p in model.parameters()), _convs(model)
    res = prune_(model, PruneConfig(ratio=0.5), X28)
    after = sum(p.numel() for p in model.parameters())
    assert res.params_after == after < 0.4 * before  # conv weights scale with in x out channels
    assert _convs(model) == [c // 2 for c in channels]  # every conv kept exactly half its channels
    assert model.head.out_features == 10  # the output layer is never pruned
    assert model(X28).shape == (2, 10)  # residual additions stay consistent (dependency graph)


def test_pruned_weights_reload_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    model = ResNet((1, 28, 28), 10, 8).eval()
    prune_(model, PruneConfig(ratio=0.4), X28)
    save_weights(model, tmp_path / "p.safetensors")
    fresh = resize_to(ResNet((1, 28, 28), 10, 8).eval(), tmp_path / "p.safetensors")
    assert torch.equal(model(X28), fresh(X28))


def test_depthwise_pruned_model_reloads(tmp_path):
    from protege.compress.prune import conv_groups

    def build():
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                             nn.ReLU(), nn.Conv2d(16, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()

    torch.manual_seed(0)
    model = build()
    prune_(model, PruneConfig(ratio=0.5), X28)
    assert model[3].groups == model[3].out_channels == 8  # the depthwise conv shrank with its input
    save_weights(model, tmp_path / "dw.safetensors")
    fresh = resize_to(build(), tmp_path / "dw.safetensors", conv_groups(model))
    assert torch.equal(model(X28), fresh(X28))


def test_parameter_target_with_small_layers_is_found_without_emptying_them():
    model = CNN((1, 8, 8), 10, (8, 16, 32)).eval()
    res = prune_(model, PruneConfig(target_params=3_000), torch.randn(2, 1, 8, 8))
    assert res.params_after <= 3_000 and min(_convs(model)) >= 1


def test_parameter_target_is_met_from_below():
    model = CNN((1, 28, 28), 10, (32, 64, 128), 2).eval()
    res = prune_(model, PruneConfig(target_params=30_000), X28)
    assert 25_000 < res.params_after <= 30_000


def test_unstructured_global_and_per_layer_sparsity_and_masks_survive_training():
    torch.manual_seed(0)
    for scope in ("layer", "global"):
        model = MLP((64,), 10, (128, 64))
        res = prune_(model, PruneConfig(method="unstructured", ratio=0.6, scope=scope), torch.randn(2, 64))
        body = [m for m in model.body if isinstance(m, nn.Linear)]
        shares = [float((m.weight == 0).float().mean()) for m in body]
        if scope == "layer":
            assert all(abs(s - 0.6) < 0.01 for s in shares)
        assert abs(sum(float((m.weight == 0).sum()) for m in body) / sum(m.weight.numel() for m in body) - 0.6) < 0.01
        assert float((model.head.weight == 0).float().mean()) < 0.05  # the output layer is left alone
        assert "no speedup" in res.note
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        zeros = [(m.weight == 0) for m in body]
        loss = model(torch.randn(16, 64)).pow(2).mean()
        loss.backward()
        opt.step()
        for m, z in zip(body, zeros):
            assert bool((m.weight[z] == 0).all())  # masked weights stay zero while fine-tuning
        make_permanent(model)
        assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())


def test_iterative_plan_composes_to_the_requested_amount():
    cfg = PruneConfig(ratio=0.75, steps=2)
    ratios = plan(CNN((1, 8, 8), 10), torch.randn(2, 1, 8, 8), cfg)
    assert len(ratios) == 2 and ratios[0] == pytest.approx(0.5)
    model = MLP((64,), 10, (200,))
    for r in plan(model, torch.randn(2, 64), PruneConfig(method="unstructured", ratio=0.75, steps=3)):
        prune_(model, PruneConfig(method="unstructured", ratio=0.75, steps=3), torch.randn(2, 64), ratio=r)
    assert float((model.body[1].weight == 0).float().mean()) == pytest.approx(0.75, abs=0.01)


def test_prune_errors_name_the_problem():
    with pytest.raises(CompressError, match="every channel of"):
        prune_(CNN((1, 8, 8), 10, (8, 16)), PruneConfig(ratio=0.95), torch.randn(2, 1, 8, 8))
    with pytest.raises(CompressError, match="no module 'features.9'.*nearest paths"):
        prune_(CNN((1, 8, 8), 10, (8, 16)), PruneConfig(ratio=0.5, keep=["features.9"]), torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="exactly one of"):
        PruneConfig(ratio=0.5, target_params=100)
    with pytest.raises(ValueError):
        PruneConfig(ratio=1.0)


def test_kept_layer_is_not_pruned():
    model = CNN((1, 8, 8), 10, (8, 16))
    prune_(model, PruneConfig(ratio=0.5, keep=["features.0.0"]), torch.randn(2, 1, 8, 8))
    assert _convs(model) == [8, 8]
