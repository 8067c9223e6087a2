"""Initialise a zoo student from its teacher's weights ("knowledge stealing"), in place.

Depth: each student layer (CNN conv, MLP hidden layer, ResNet block) takes one teacher layer of the
same stage (``select``: every k-th, the first always kept, as DistilBERT (Sanh et al. 2019) keeps every
other BERT layer) or the mean of the k teacher layers it replaces (``average``; only teacher layers
whose weight shape equals the first one's are averaged, e.g. a stage's first conv, which changes the
channel count, is copied alone).

Width: where the student is narrower it keeps the teacher's most important output channels / neurons,
as in Minitron's importance-based width pruning (Muralidharan et al. 2024), and carries the SAME
selection into the next layer's input channels, the BatchNorm (weight, bias, running_mean,
running_var) and, in a ResNet, the whole residual stream of a stage (stem or shortcut and every
block's conv2 write into it, so one selection per stage). The head keeps all classes and takes the
sliced input features of the teacher's head.

Importance of an output channel: |gamma| of the BatchNorm after the layer, i.e. the channel's scale after
BN (as in Network Slimming, Liu et al. 2017); layers without BN (MLP hidden layers) use the L2 norm of
the neuron's weight row. A residual channel scores the sum over the copied layers writing into it. (On digits,
|gamma| kept more teacher accuracy than the raw filter norm or the filter norm with BN folded in.)

Depth selection preserves the function only where a residual stream carries the skipped layers'
inputs (ResNet, like the transformer DistilBERT prunes); in a plain CNN / MLP the layer after a skipped
one reads features it was not trained on, so expect near-chance accuracy before training there.
Where a skipped teacher layer leaves an input space of another width (an MLP whose hidden widths
differ), the input columns are chosen by their own L2 norm instead; a lossy fallback.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.lm import CausalLM
from ..models.text import TextClassifier
from ..models.zoo import CNN, MLP, ResNet
from .init_transformer import init_transformer_
from .layer_pick import InitReport, pick_layers
from .layer_pick import fail as _fail

_FAMILIES = ((MLP, "mlp"), (CNN, "cnn"), (ResNet, "resnet"))
_BN = ("weight", "bias", "running_mean", "running_var")
Pair = tuple[str, "str | None"]  # (Linear/Conv2d path, path of the BatchNorm after it or None)


@dataclass
class _Layer:
    s: Pair  # the student layer
    t: list[Pair]  # the teacher layers it copies (several: averaged)
    out: str  # the channel group its outputs write into
    inp: str  # the channel group its inputs read from ("data": the model input)


def _family(model: nn.Module, role: str) -> str:
    for cls, name in _FAMILIES:
        if isinstance(model, cls):
            return name
    raise _fail(f"the {role} is a {type(model).__name__}, not a protege zoo model (mlp, cnn, resnet) or a Hugging Face "
                f"model folder on both sides; "
                f"build it from the zoo or initialise it another way")


def _plan_mlp(s: MLP, t: MLP, method: str, every: int | None) -> tuple[list[_Layer], dict[str, str]]:
    sl, tl = ([f"body.{i}" for i, m in enumerate(x.body) if isinstance(m, nn.Linear)] for x in (s, t))
    layers, names, inp = [], {}, "data"
    for j, g in enumerate(pick_layers(len(sl), len(tl), method, every, "MLP body", "hidden layers")):
        names[sl[j]] = f"hidden layer {j + 1} ({sl[j]})"
        layers.append(_Layer((sl[j], None), [(tl[i], None) for i in g], sl[j], inp))
        inp = sl[j]
    return layers + [_Layer(("head", None), [("head", None)], "logits", inp)], names


def _stage_convs(model: CNN) -> list[list[Pair]]:
    """Per stage, the (conv, bn) paths: a stage is [conv, bn, relu] * depth (+ maxpool)."""
    return [[(f"features.{i}.{k}", f"features.{i}.{k + 1}") for k, m in enumerate(stage) if isinstance(m, nn.Conv2d)]
            for i, stage in enumerate(model.features)]


def _plan_cnn(s: CNN, t: CNN, method: str, every: int | None) -> tuple[list[_Layer], dict[str, str]]:
    ss, ts = _stage_convs(s), _stage_convs(t)
    if len(ss) != len(ts):
        raise _fail(f"student has {len(ss)} stages but the teacher {len(ts)}; "
                    f"build the student with as many channels entries as the teacher ({len(ts)})")
    layers, names, inp = [], {}, "data"
    for i, (sc, tc) in enumerate(zip(ss, ts)):
        for j, g in enumerate(pick_layers(len(sc), len(tc), method, every, f"stage {i + 1}", "conv layers")):
            names[sc[j][0]] = f"stage {i + 1} conv {j + 1} ({sc[j][0]})"
            layers.append(_Layer(sc[j], [tc[x] for x in g], sc[j][0], inp))
            inp = sc[j][0]
    return layers + [_Layer(("head", None), [("head", None)], "logits", inp)], names


def _plan_resnet(s: ResNet, t: ResNet, method: str, every: int | None) -> tuple[list[_Layer], dict[str, str]]:
    layers = [_Layer(("stem.0", "stem.1"), [("stem.0", "stem.1")], "res1", "data")]  # stem feeds stage 1's stream
    names, inp = {}, "res1"
    for i, name in enumerate(("layer1", "layer2", "layer3")):
        res = f"res{i + 1}"
        names[res] = f"stage {i + 1}"
        n_s, n_t = len(getattr(s, name)), len(getattr(t, name))
        for j, g in enumerate(pick_layers(n_s, n_t, method, every, f"stage {i + 1}", "blocks")):
            sb, tb = f"{name}.{j}", [f"{name}.{x}" for x in g]
            inner = f"{sb}.conv1"
            names[inner] = f"block {sb} (conv1)"
            for conv, bn, out, src in (("conv1", "bn1", inner, inp), ("conv2", "bn2", res, inner),
                                       ("shortcut.0", "shortcut.1", res, inp)):
                if conv == "shortcut.0" and not len(getattr(s, name)[j].shortcut):
                    continue  # identity shortcut: the stream passes through unchanged
                layers.append(_Layer((f"{sb}.{conv}", f"{sb}.{bn}"), [(f"{b}.{conv}", f"{b}.{bn}") for b in tb], out, src))
            inp = res
    return layers + [_Layer(("head", None), [("head", None)], "logits", inp)], names


def _source(teacher: nn.Module, members: list[Pair]) -> tuple[list[Pair], dict]:
    """The teacher tensors a student layer copies: the mean over ``members`` of equal shape to the first."""
    mods = dict(teacher.named_modules())
    shape = mods[members[0][0]].weight.shape
    used = [(c, b) for c, b in members if c in mods and mods[c].weight.shape == shape]
    out: dict = {"weight": torch.stack([mods[c].weight for c, _ in used]).mean(0)}  # (O, I[, kh, kw])
    if mods[used[0][0]].bias is not None:
        out["bias"] = torch.stack([mods[c].bias for c, _ in used]).mean(0)  # (O,)
    if used[0][1] is not None:
        for key in _BN:
            out["bn." + key] = torch.stack([getattr(mods[b], key) for _, b in used]).mean(0)  # (O,)
    return used, out


def _importance(src: dict) -> torch.Tensor:
    """(O,) BatchNorm |gamma| of each output channel, or the L2 norm of its weight row without BN."""
    if "bn.weight" in src:
        return src["bn.weight"].abs()
    return src["weight"].flatten(1).norm(dim=1)


def _top(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest scores, in their original order."""
    return score.topk(n).indices.sort().values


def _selections(student: nn.Module, layers: list[_Layer], srcs: list[dict], names: dict[str, str]) -> dict:
    """Channel group -> (teacher width, kept teacher indices (student width,))."""
    smods = dict(student.named_modules())
    score: dict[str, torch.Tensor] = {}
    for layer, src in zip(layers, srcs):
        imp = _importance(src)
        score[layer.out] = score[layer.out] + imp if layer.out in score else imp
    n_in = smods[layers[0].s[0]].weight.shape[1]
    sel = {"data": (n_in, torch.arange(n_in, device=srcs[0]["weight"].device))}
    for layer in layers:
        n_s, n_t = smods[layer.s[0]].weight.shape[0], score[layer.out].numel()
        unit = "channels" if smods[layer.s[0]].weight.dim() == 4 else "units"
        if layer.out == "logits" and n_s != n_t:
            raise _fail(f"student predicts {n_s} classes but the teacher {n_t}; build the student with num_classes={n_t}")
        if n_s > n_t:
            raise _fail(f"student {names[layer.out]} has {n_s} {unit} but the teacher only {n_t}; "
                        f"a student can only be narrower than or as wide as its teacher")
        sel[layer.out] = (n_t, _top(score[layer.out], n_s))
    return sel


def _sliced(student: nn.Module, layer: _Layer, src: dict, sel: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(student tensor, teacher slice to copy into it) for one layer and its BatchNorm."""
    mod = student.get_submodule(layer.s[0])
    w = src["weight"]  # (O_t, I_t[, kh, kw])
    out_idx = sel[layer.out][1]
    n_group, in_idx = sel[layer.inp]
    if w.shape[1] != n_group:  # a skipped teacher layer of another width: keep the heaviest input columns
        if mod.weight.shape[1] > w.shape[1]:
            raise _fail(f"student {layer.s[0]} takes {mod.weight.shape[1]} inputs but its teacher layer {layer.t[0][0]} "
                        f"only {w.shape[1]}; make the student narrower there or pick other layers with every")
        in_idx = _top(w.transpose(0, 1).flatten(1).norm(dim=1), mod.weight.shape[1])
    pairs = [(mod.weight, w[out_idx][:, in_idx])]  # (O_s, I_s[, kh, kw])
    if mod.bias is not None:
        pairs.append((mod.bias, src["bias"][out_idx]))
    if layer.s[1] is not None:
        bn = student.get_submodule(layer.s[1])
        pairs += [(getattr(bn, key), src["bn." + key][out_idx]) for key in _BN]
    return pairs


_PLANS = {"mlp": _plan_mlp, "cnn": _plan_cnn, "resnet": _plan_resnet}


@torch.no_grad()
def init_from_teacher_(student: nn.Module, teacher: nn.Module, method: str = "select", every: int | None = None) -> InitReport:
    """Overwrite ``student``'s weights with (depth-selected or averaged, width-sliced) teacher weights.

    Supports mlp->mlp, cnn->cnn (same number of stages) and resnet->resnet; the student may be shallower
    and narrower per stage, never deeper or wider. Hugging Face text models go to init_transformer_ (depth
    only). The teacher is only read.
    """
    if method not in ("select", "average"):
        raise _fail(f"unknown method {method!r}; use 'select' or 'average'")
    if every is not None and every < 1:
        raise _fail(f"every must be 1 or more, got {every}; leave it unset to infer it from the depths")

    if all(isinstance(m, (TextClassifier, CausalLM)) for m in (student, teacher)):
        return init_transformer_(student, teacher, method, every)
    fs, ft = _family(student, "student"), _family(teacher, "teacher")
    if fs != ft:
        raise _fail(f"the student is a {fs} but the teacher a {ft}; both must be the same zoo family")
    layers, names = _PLANS[fs](student, teacher, method, every)
    n_s, n_t = (m.get_submodule(layers[0].s[0]).weight.shape[1] for m in (student, teacher))
    if n_s != n_t:
        raise _fail(f"student takes {n_s} input channels/features but the teacher {n_t}; build both for the same data")
    used, srcs = zip(*(_source(teacher, layer.t) for layer in layers))
    sel = _selections(student, layers, list(srcs), names)
    pairs = [p for layer, src in zip(layers, srcs) for p in _sliced(student, layer, src, sel)]
    for dst, val in pairs:  # only once every check has passed: on an error the student is untouched
        dst.copy_(val)
    mapping = [(layer.s[0], "+".join(c for c, _ in u)) for layer, u in zip(layers, used)]
    return InitReport(method, len(layers), mapping)


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, x: torch.Tensor, batch_size: int = 256, max_examples: int = 4096) -> int:
    """Re-estimate every BatchNorm's running mean/variance on training inputs (forward passes only, no labels).

    Sliced or re-stacked layers see other input statistics than the teacher's BN layers were fitted to;
    an exact running average over a few thousand inputs repairs much of that before any training. Returns
    the number of BatchNorm layers updated (0: nothing to do).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    was_training, saved = model.training, [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for start in range(0, min(len(x), max_examples), batch_size):
        model(x[start:start + batch_size])
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
    return len(bns)
