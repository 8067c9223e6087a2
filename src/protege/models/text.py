"""Text models: Hugging Face encoders from local folders, a small BERT and a BiLSTM, all taking token ids.

Every text model maps input ids (B, L) int64 to logits (B, classes); the attention mask is derived from the
padding id, so the same one-tensor interface serves training, caching, ONNX export and latency.

A transformer's hidden states and attention maps are reachable by module path through identity "taps":
``hidden.0`` (embeddings) .. ``hidden.N`` (last layer), each (B, L, D), and ``attention.0`` .. ``attention.N-1``,
each (B, heads, L, L). Padded positions are zeroed in both, so feature losses compare real tokens only.
The model only asks the encoder for them when a hook is attached (``protege inspect`` lists them).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ModelError
from ..logs import quiet_transformers

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
HF_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def takes_token_ids(model: nn.Module) -> bool:
    """Whether a model reads token ids (text models here, or any model whose first layer is an embedding)."""
    if getattr(model, "pad_id", None) is not None:
        return True
    first = next((m for m in model.modules() if not list(m.children())), None)
    return isinstance(first, nn.Embedding)


def example_input(model: nn.Module, in_shape, batch: int = 2) -> torch.Tensor:
    """A dry-run input: ids of 1 (not padding in the tokenizers here) for text models, else zeros."""
    if takes_token_ids(model):
        return torch.ones(batch, *in_shape, dtype=torch.long)
    return torch.zeros(batch, *in_shape)


def is_hf_folder(ref: str) -> bool:
    return Path(ref).is_dir()


def check_hf_folder(folder: str | Path, need_weights: bool = True, allow_pickle: bool = False) -> None:
    """A Hugging Face model folder must hold config.json and (to load pretrained) safetensors weights."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder '{folder}' has no config.json; give a folder written by save_pretrained "
                         f"(config.json + model.safetensors)")
    if not need_weights or any((folder / w).is_file() for w in HF_WEIGHTS):
        return
    if any((folder / w).is_file() for w in HF_PICKLE_WEIGHTS):
        if not allow_pickle:
            raise ModelError(f"model folder '{folder}' has only pickle weights (pytorch_model.bin), and unpickling can run "
                             f"arbitrary code; re-save it with save_pretrained(safe_serialization=True), or set "
                             f"`allow_pickle: true` if you trust it")
        return
    raise ModelError(f"model folder '{folder}' has no weights (model.safetensors); copy them in, or set "
                     f"kwargs: {{pretrained: false}} to build the architecture with random weights")


class TextClassifier(nn.Module):
    """A Hugging Face sequence classifier behind the one-tensor interface: ids (B, L) -> logits (B, C)."""

    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)
        layers = int(model.config.num_hidden_layers)
        self.hidden = nn.ModuleList(nn.Identity() for _ in range(layers + 1))
        self.attention = nn.ModuleList(nn.Identity() for _ in range(layers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()  # (B, L)
        want_h = any(t._forward_hooks for t in self.hidden)
        want_a = any(t._forward_hooks for t in self.attention)
        out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=want_h, output_attentions=want_a)
        keep = mask.to(out.logits.dtype)
        if want_h:
            for tap, h in zip(self.hidden, out.hidden_states):  # (B, L, D)
                tap(h * keep[:, :, None])
        if want_a:
            for tap, a in zip(self.attention, out.attentions):  # (B, heads, L, L): rows of padded queries zeroed
                tap(a * keep[:, None, :, None])
        return out.logits


@quiet_transformers()  # transformers and the torchao it imports log and print while loading
def hf_classifier(folder: str, num_classes: int, pad_id: int = 0, pretrained: bool = True, allow_pickle: bool = False,
                  **overrides: Any) -> TextClassifier:
    """A sequence classifier from a local Hugging Face folder; ``overrides`` change the config (e.g. num_hidden_layers).

    ``pretrained``: load the folder's weights (a new classification head when the label count differs);
    otherwise random weights in the folder's architecture (a student that ``init: select`` fills from the teacher).
    """
    from transformers import AutoModelForSequenceClassification  # heavy: only Hugging Face text folders need it

    check_hf_folder(folder, need_weights=pretrained, allow_pickle=allow_pickle)
    config = hf_config(folder, num_classes, overrides)
    config._attn_implementation = "eager"  # attention maps for feature losses; the same maths as SDPA
    model = hf_load(AutoModelForSequenceClassification, folder, config, pretrained, allow_pickle,
                    "a sequence classifier", "use an encoder folder (BERT-style)")
    return TextClassifier(model, pad_id)


def hf_config(folder: str, num_classes: int, overrides: dict[str, Any]) -> Any:
    """The folder's config.json with ``num_classes`` labels and the model kwargs applied; unreadable: a ModelError."""
    from transformers import AutoConfig  # heavy: imported only where a Hugging Face folder is used

    try:
        return AutoConfig.from_pretrained(folder, num_labels=num_classes, **overrides)
    except (ValueError, OSError, TypeError, json.JSONDecodeError) as e:
        raise ModelError(f"model folder '{folder}': config.json cannot be read ({str(e).splitlines()[0][:160]}); "
                         f"check it, and the model kwargs {sorted(overrides)}") from None


def hf_load(auto_class: Any, folder: str, config: Any, pretrained: bool, allow_pickle: bool, what: str, fix: str) -> nn.Module:
    """``auto_class`` (an AutoModelFor... class) from the folder's weights (a new head when the label count differs)
    or, not ``pretrained``, with random weights in its architecture; a folder that is not ``what``: a ModelError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if pretrained:
                return auto_class.from_pretrained(folder, config=config, ignore_mismatched_sizes=True,
                                                  use_safetensors=not allow_pickle or None)
            return auto_class.from_config(config)
        except (ValueError, OSError, KeyError) as e:
            raise ModelError(f"model folder '{folder}' cannot be loaded as {what} ({str(e).splitlines()[0][:160]}); "
                             f"{fix}") from None


@quiet_transformers()  # transformers and the torchao it imports log and print while loading
def small_bert(vocab_size: int, num_classes: int, pad_id: int = 0, max_length: int = 512, hidden: int = 128,
               layers: int = 2, heads: int = 2, intermediate: Optional[int] = None, dropout: float = 0.1) -> TextClassifier:
    """A BERT encoder with random weights (Devlin et al. 2019), sized by the arguments; for students from scratch."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max(max_length, 8),
                     num_labels=num_classes, pad_token_id=pad_id, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    cfg._attn_implementation = "eager"
    return TextClassifier(BertForSequenceClassification(cfg), pad_id)


class BiLSTM(nn.Module):
    """Embedding -> bidirectional LSTM -> masked mean and max pooling -> linear (Tang et al. 2019 distil BERT into one).

    ``features`` is the pooled (B, 4 * hidden) vector, for relation terms.
    """

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int = 0, embed: int = 128, hidden: int = 128,
                 layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.pad_id = int(pad_id)
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=self.pad_id)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.features = nn.Identity()
        self.head = nn.Linear(4 * hidden, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, classes)
        keep = (input_ids != self.pad_id).unsqueeze(-1)  # (B, L, 1)
        h, _ = self.lstm(self.drop(self.embed(input_ids)))  # (B, L, 2H)
        mean = (h * keep).sum(1) / keep.sum(1).clamp_min(1)
        mx = h.masked_fill(~keep, torch.finfo(h.dtype).min).max(1).values
        return self.head(self.drop(self.features(torch.cat([mean, mx], -1))))


TEXT_ZOO = {"bert": small_bert, "bilstm": BiLSTM}
