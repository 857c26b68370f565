"""A tiny architecture registered by name for a test, so candidates train in a second."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from bonetumor.training.models import ARCHITECTURES, ArchSpec

TINY = "tiny"


class TinyNet(nn.Module):
    """A small CNN with the attribute layout an ArchSpec needs (features, fc head)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc: nn.Module = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _tiny_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(8, num_classes))


def register_tiny(monkeypatch: pytest.MonkeyPatch, name: str = TINY) -> str:
    """Add :class:`TinyNet` to the architectures under ``name`` for the duration of the test."""
    spec = ArchSpec(
        build=TinyNet,
        imagenet_weights=tvm.ResNet50_Weights.DEFAULT,  # never loaded: weights none
        replace_head=_tiny_head,
        head=lambda m: cast(TinyNet, m).fc,
        top_block=lambda m: cast(TinyNet, m).features,
        cam_layer=lambda m: cast(TinyNet, m).features[0],
    )
    monkeypatch.setitem(ARCHITECTURES, name, spec)
    return name
