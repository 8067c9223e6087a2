"""Hugging Face image classifiers from local folders (``AutoModelForImageClassification``: ViT, ConvNeXt, ResNet,
Swin, ...), as a teacher or a student: images (B, C, H, W) in, logits (B, classes) out. No torchvision needed.

The wrapped model keeps its module paths (``model.vit.layers.0``, ...; `protege inspect` lists them) for feature hooks."""
from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import ModelError
from ..logs import quiet_transformers
from .text import check_hf_folder, hf_config, hf_load


def is_image_classifier_folder(ref: str) -> bool:
    """A folder whose config.json names an image-classification architecture (or an image model type)."""
    config = Path(ref) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForImageClassification") for a in data.get("architectures") or []) or \
        "image_size" in data and "num_channels" in data and "vocab_size" not in data


class ImageClassifier(nn.Module):
    """A Hugging Face image classifier with the one-tensor interface: pixel values (B, C, H, W) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


@quiet_transformers()  # transformers and the torchao it imports log and print while loading
def hf_image_classifier(folder: str, num_classes: int, in_shape: Sequence[int], pretrained: bool = True,
                        allow_pickle: bool = False, **overrides: Any) -> ImageClassifier:
    """An image classifier from a local Hugging Face folder; ``overrides`` change the config (num_hidden_layers,
    hidden_size, ...). ``pretrained``: the folder's weights (a new head when the class count differs); otherwise random
    weights in the folder's architecture. The data's channels and (for fixed-size models such as ViT) image size must
    be the model's: checked here, before anything runs."""
    from transformers import AutoModelForImageClassification  # heavy: only image-folder runs need it

    check_hf_folder(folder, need_weights=pretrained, allow_pickle=allow_pickle)
    config = hf_config(folder, num_classes, overrides)
    _check_input(folder, config, tuple(in_shape))
    model = hf_load(AutoModelForImageClassification, folder, config, pretrained, allow_pickle, "an image classifier",
                    "use a folder of an *ForImageClassification model")
    return ImageClassifier(model)


def _check_input(folder: str, config: Any, in_shape: tuple[int, ...]) -> None:
    if len(in_shape) != 3:
        raise ModelError(f"model folder '{folder}' is an image classifier, but the data gives examples of shape "
                         f"{list(in_shape)}, not [channels, height, width]; use image data (or data.shape)")
    channels = getattr(config, "num_channels", None)
    if channels is not None and channels != in_shape[0]:
        raise ModelError(f"model folder '{folder}' reads images of {channels} channel(s) but the data has {in_shape[0]}; "
                         f"set data.channels: {channels} (images / hf_dataset), or for a model built here (pretrained: false) "
                         f"kwargs: {{num_channels: {in_shape[0]}}} with a matching normalize")
    size = getattr(config, "image_size", None)
    fixed = type(config).__name__.startswith(("ViT", "Vit", "DeiT", "Deit", "Beit", "Dinov2", "Swin"))  # one size of position embeddings
    if fixed and isinstance(size, int) and tuple(in_shape[1:]) != (size, size):
        raise ModelError(f"model folder '{folder}' reads {size}x{size} images but the data's are "
                         f"{in_shape[1]}x{in_shape[2]}; set data.image_size: [{size}, {size}]")


def folder_normalization(folder: str) -> Optional[tuple[list[float], list[float]]]:
    """(mean, std) from a Hugging Face folder's preprocessor_config.json when it normalises images, else None."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        raise ModelError(f"{path} cannot be read as JSON; fix it, or state the model's normalize: {{mean, std}} in the "
                         f"recipe") from None
    if not cfg.get("do_normalize", True) or "image_mean" not in cfg or "image_std" not in cfg:
        return None
    return [float(v) for v in cfg["image_mean"]], [float(v) for v in cfg["image_std"]]


def normalize_inputs_(model: nn.Module, mean: Sequence[float], std: Sequence[float], channels: int,
                      source: str = "its normalize setting") -> nn.Module:
    """``model`` with (x - mean) / std applied to its input by a forward pre-hook (so its state dict, module paths and
    exported graph stay the model's own, the normalisation inside the graph). One value applies to every channel."""
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise ModelError(f"{source} gives {len(mean)} mean and {len(std)} std values but the data has {channels} "
                         f"channel(s); set the model's normalize: {{mean: [...], std: [...]}} with one value or one per "
                         f"channel (or normalize: none)")
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)

    def normalize(_module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        shape = (1, -1) + (1,) * (x.dim() - 2) if x.dim() > 2 else (1, -1)
        return ((x - m.to(x.device).view(shape)) / s.to(x.device).view(shape), *args[1:])

    model.register_forward_pre_hook(normalize)
    model.input_normalization = {"mean": list(mean), "std": list(std), "source": source}
    return model


LIBRARIES = ("timm", "torchvision")


def is_library_model(ref: str) -> bool:
    return ref.split(":", 1)[0] in LIBRARIES and ":" in ref


def library_model(ref: str, in_shape: Sequence[int], num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """``timm:<name>`` or ``torchvision:<name>``: an image classifier built by name by that library, with random
    weights and ``num_classes`` outputs (trained weights come from the spec's ``weights`` file: no hub is reached).
    The packages are optional: their wheels need the standard torch build (README: the vision extra)."""
    lib, name = ref.split(":", 1)
    try:
        module = importlib.import_module(f"{lib}.models" if lib == "torchvision" else lib)  # optional dependency
    except Exception as e:  # ImportError, or torchvision's missing operators beside the CPU-only torch wheel
        raise ModelError(f"model '{ref}' needs the {lib} package, which does not load here ({type(e).__name__}); install "
                         f"it in an environment with the standard torch build: pip install -e '.[vision]' (README: "
                         f"Installing protege elsewhere)") from None
    known = list(module.list_models())
    if name not in known:
        near = difflib.get_close_matches(name, known, n=4)
        raise ModelError(f"{lib} has no model '{name}'" + (f"; nearest: {', '.join(near)}" if near else "") +
                         f" (the full list: {lib}.{'list_models()' if lib == 'timm' else 'models.list_models()'})")
    channels = int(in_shape[0]) if len(in_shape) == 3 else None
    if channels is None:
        raise ModelError(f"model '{ref}' takes images (C, H, W) but the data gives examples of shape {list(in_shape)}; "
                         f"use an image source or data.shape")
    try:
        if lib == "timm":
            return module.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels, **kwargs)
        if channels != 3:
            raise ModelError(f"torchvision's {name} takes 3-channel images but the data has {channels}; set data.channels: 3, "
                             f"or use timm:{name} (timm adapts the first layer to in_chans)")
        return module.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ModelError(f"model '{ref}': {e}; check its kwargs") from None
