"""Splits of a dataset: inputs as a float32 (or token id) tensor in memory, or ``Rows`` read on demand (stream.py)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

import kornia.augmentation as K
import torch

from .stream import Rows, fingerprint


@dataclass
class Split:
    x: Union[torch.Tensor, Rows]  # (N, *input_shape) float32 (in memory, or streamed); text: (N, L) int64 token ids
    y: torch.Tensor  # (N,) int64
    pad_id: Optional[int] = None  # text classification: the padding id; each batch is cut to its longest text

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    class_names: list[str] = field(default_factory=list)
    is_image: bool = False
    description: str = ""
    vocab_size: Optional[int] = None  # text only
    pad_id: int = 0  # text only: the id padded positions hold (models mask them)
    is_lm: bool = False  # a language-modelling corpus: x and y are (N, block) token ids, num_classes the vocabulary
    preprocessing: dict = field(default_factory=dict)  # how raw data became x (scaling, encoders, tokenizer): for users of the files

    @property
    def is_text(self) -> bool:
        return self.vocab_size is not None

    @property
    def model_args(self) -> dict:
        """What a model factory may need beyond the input shape and class count (text: vocabulary and padding)."""
        if not self.is_text:
            return {}
        args = {"vocab_size": self.vocab_size, "pad_id": self.pad_id, "max_length": self.input_shape[0]}
        return {**args, "task": "causal_lm"} if self.is_lm else args

    def fingerprint(self) -> str:
        """A short hash of the training inputs (with their shape) and labels (for caches)."""
        return fingerprint(self.train.x, self.train.y)

    def full_length(self) -> "DataSplits":
        """These splits with every text batch kept at the data's length (no cutting to the batch's longest text)."""
        keep = {k: dataclasses.replace(getattr(self, k), pad_id=None) for k in ("train", "val", "test")}
        return dataclasses.replace(self, **keep)

    @property
    def streamed(self) -> bool:
        """Whether the examples are read on demand from a memory-mapped file (``Rows``) rather than held in memory."""
        return isinstance(self.train.x, Rows)


def augment_images(x: torch.Tensor, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding by ``pad``, and (``flip``) random horizontal flip, per example, through kornia's
    batch augmentations. x: (B, C, H, W). The randomness comes from torch's global generator, which the fit loop
    seeds and its checkpoints save, so a run is seeded and a resumed run draws what the uninterrupted one drew."""
    ops = [K.RandomCrop(tuple(x.shape[-2:]), padding=pad, p=1.0)] + ([K.RandomHorizontalFlip(p=0.5)] if flip else [])
    return K.AugmentationSequential(*ops)(x).contiguous()
