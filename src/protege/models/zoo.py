"""A small zoo: MLP, plain CNN with width/depth knobs, CIFAR-style ResNet (He et al. 2016)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .lm import small_llama
from .text import TEXT_ZOO


def _flat(in_shape: Sequence[int]) -> int:
    n = 1
    for s in in_shape:
        n *= int(s)
    return n


class MLP(nn.Module):
    def __init__(self, in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = _flat(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, *in_shape) -> (B, classes)
        return self.head(self.body(x))


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNN(nn.Module):
    """Stages of ``depth`` 3x3 conv-BN-ReLU blocks; 2x2 max-pool between stages; global average pool head."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32, 64),
                 depth: int = 1, dropout: float = 0.0):
        super().__init__()
        cin, blocks = int(in_shape[0]), []
        for i, c in enumerate(channels):
            stage: list[nn.Module] = []
            for _ in range(depth):
                stage += _conv_bn(cin, c)
                cin = c
            if i < len(channels) - 1:
                stage.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*stage))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        return self.head(self.dropout(self.pool(self.features(x)).flatten(1)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2): three stages of n basic blocks at width w, 2w, 4w."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(int(in_shape[0]), width))
        stages, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.pool(x).flatten(1))


def _resnet(depth: int):
    def build(in_shape: Sequence[int], num_classes: int, width: int = 16) -> ResNet:
        return ResNet(in_shape, num_classes, depth=depth, width=width)

    return build


ZOO = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
    "resnet8": _resnet(8),
    "resnet20": _resnet(20),
    "resnet56": _resnet(56),
    **TEXT_ZOO,  # token-id inputs: bert (small, random init), bilstm
    "llama": small_llama,  # causal LM from scratch (task: causal_lm)
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
