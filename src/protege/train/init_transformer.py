"""Initialise a shallower transformer from its teacher's weights, in place (DistilBERT; Sanh et al. 2019).

The student has the teacher's architecture with fewer layers (same width, heads and vocabulary). Every
tensor outside the layer stack (embeddings, final norm, pooler, head) is copied; student layer i takes
teacher layer i * k (``select``; k = teacher depth / student depth, so every other layer for half the
depth, the first always kept) or the mean of teacher layers i * k .. i * k + k - 1 (``average``).

Works on any Hugging Face model whose layers sit in a numbered list (``encoder.layer.N`` in BERT,
``layers.N`` in Llama), through TextClassifier or bare.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .layer_pick import InitReport, pick_layers
from .layer_pick import fail as _fail

_LAYER = re.compile(r"^(.*?\.(?:layer|layers|h|block)\.)(\d+)\.(.+)$")


def _split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]], str]:
    """(tensors outside the layer stack, {layer index: {name inside the layer: tensor}}, the stack's prefix)."""
    outside, layers, prefixes = {}, {}, set()
    for k, v in state.items():
        m = _LAYER.match(k)
        if m:
            prefixes.add(m.group(1))
            layers.setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            outside[k] = v
    if len(prefixes) != 1:
        raise _fail(f"found {len(prefixes)} numbered layer stacks ({', '.join(sorted(prefixes)) or 'none'}); "
                    f"layer selection needs exactly one (an encoder or a decoder)")
    return outside, layers, prefixes.pop()


@torch.no_grad()
def init_transformer_(student: nn.Module, teacher: nn.Module, method: str = "select", every: int | None = None) -> InitReport:
    """Copy the teacher's embeddings, head and selected (or averaged) layers into the shallower ``student``."""
    s_state, t_state = student.state_dict(), teacher.state_dict()
    s_out, s_layers, s_prefix = _split(s_state)
    t_out, t_layers, t_prefix = _split(t_state)
    if s_prefix != t_prefix or set(s_out) != set(t_out):
        raise _fail("the student is not the teacher's architecture with fewer layers; build it from the teacher's "
                    "folder with kwargs {pretrained: false, num_hidden_layers: N}")
    bad = [k for k in s_out if s_out[k].shape != t_out[k].shape]
    bad += [f"{s_prefix}0.{k}" for k in s_layers[0] if k not in t_layers[0] or s_layers[0][k].shape != t_layers[0][k].shape]
    if bad:
        raise _fail(f"'{bad[0]}' differs in shape between student and teacher; layer selection keeps the width "
                    f"(hidden size, heads, vocabulary): change only num_hidden_layers")
    picks = pick_layers(len(s_layers), len(t_layers), method, every, "layer stack", "layers")
    for k, v in s_out.items():
        v.copy_(t_out[k])
    mapping = []
    for i, src in enumerate(picks):
        for name, dst in s_layers[i].items():
            vals = [t_layers[j][name] for j in src]
            dst.copy_(vals[0] if len(vals) == 1 or not dst.dtype.is_floating_point else torch.stack(vals).mean(0))
        mapping.append((f"{s_prefix}{i}", "+".join(f"{t_prefix}{j}" for j in src)))
    return InitReport(method, len(picks), mapping)
