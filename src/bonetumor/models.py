"""Model factory: every architecture is built by name through :func:`build_model` (as timm does).

Each architecture is a torchvision backbone with a new head: global average pooling, dropout, and one linear
layer with an output per class. The 120M-parameter ImageNet classifier of VGG19 and VGG19-BN is replaced by that
head too (as in Keras-style transfer learning): it would dominate memory, optimiser state and artifact size
(548 MB per model) while the convolutional features carry the transfer.

Pretrained weights are never downloaded at run time: ``imagenet`` reads torchvision's file from TORCH_HOME's
checkpoint cache and checks it against the hash in its name; a path loads a torchvision-layout state dict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torchvision import models as tvm

from bonetumor.errors import ConfigError, WeightsUnavailableError
from bonetumor.utils import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture and which of its parts are the head and the top block."""

    build: Callable[[], nn.Module]
    imagenet_weights: tvm.WeightsEnum
    replace_head: Callable[[nn.Module, int, float], None]
    head: Callable[[nn.Module], nn.Module]
    top_block: Callable[[nn.Module], nn.Module]
    #: The last convolutional block: what Grad-CAM explains.
    cam_layer: Callable[[nn.Module], nn.Module]


def _resnet50_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    resnet = cast(tvm.ResNet, model)
    resnet.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(resnet.fc.in_features, num_classes))


def _vgg_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    vgg = cast(tvm.VGG, model)
    vgg.avgpool = nn.AdaptiveAvgPool2d(1)
    vgg.classifier = nn.Sequential(nn.Flatten(1), nn.Dropout(p=dropout), nn.Linear(512, num_classes))
    # torchvision's VGG uses in-place ReLU, which breaks the backward hooks Grad-CAM registers.
    for module in vgg.features:
        if isinstance(module, nn.ReLU):
            module.inplace = False


def _vgg_top(model: nn.Module) -> nn.Module:
    # Block 5 of VGG19's features: everything after the 4th max-pooling (conv5_1..conv5_4 with their ReLUs, and
    # with the batch-norm variant their BatchNorms, and the last pooling): features[28:] of vgg19,
    # features[40:] of vgg19_bn. Found by position of the pooling so that both variants share one rule.
    features = cast(nn.Sequential, cast(tvm.VGG, model).features)
    pools = [i for i, module in enumerate(features) if isinstance(module, nn.MaxPool2d)]
    return cast(nn.Module, features[pools[3] + 1 :])


def _vgg_cam(model: nn.Module) -> nn.Module:
    # The ReLU after conv5_4 (and its BatchNorm in vgg19_bn): features[35] of vgg19, features[51] of vgg19_bn.
    features = cast(nn.Sequential, cast(tvm.VGG, model).features)
    return next(module for module in reversed(features) if isinstance(module, nn.ReLU))


def _resnet(model: nn.Module) -> tvm.ResNet:
    return cast(tvm.ResNet, model)


def _vgg(model: nn.Module) -> tvm.VGG:
    return cast(tvm.VGG, model)


ARCHITECTURES: dict[str, ArchSpec] = {
    "resnet50": ArchSpec(
        build=lambda: tvm.resnet50(weights=None),
        imagenet_weights=tvm.ResNet50_Weights.DEFAULT,
        replace_head=_resnet50_head,
        head=lambda m: _resnet(m).fc,
        top_block=lambda m: _resnet(m).layer4,
        cam_layer=lambda m: cast(nn.Module, _resnet(m).layer4[-1]),
    ),
    "vgg19": ArchSpec(
        build=lambda: tvm.vgg19(weights=None),
        imagenet_weights=tvm.VGG19_Weights.DEFAULT,
        replace_head=_vgg_head,
        head=lambda m: _vgg(m).classifier,
        top_block=_vgg_top,
        cam_layer=_vgg_cam,
    ),
    # VGG19 with a BatchNorm after every convolution; same head, top block and Grad-CAM layer rules as vgg19.
    "vgg19_bn": ArchSpec(
        build=lambda: tvm.vgg19_bn(weights=None),
        imagenet_weights=tvm.VGG19_BN_Weights.DEFAULT,  # vgg19_bn-c79401a0.pth
        replace_head=_vgg_head,
        head=lambda m: _vgg(m).classifier,
        top_block=_vgg_top,
        cam_layer=_vgg_cam,
    ),
}


def imagenet_weights_path(arch: str) -> Path:
    """Return where torchvision's ImageNet weight file for ``arch`` must be (TORCH_HOME's checkpoint cache)."""
    url = _spec(arch).imagenet_weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _spec(arch: str) -> ArchSpec:
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}") from None


def _load_imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    path = imagenet_weights_path(arch)
    url = _spec(arch).imagenet_weights.url
    if not path.is_file():
        raise WeightsUnavailableError(
            f"train.weights=imagenet: the ImageNet weights of {arch} are not at {path}, and this project never "
            f"downloads at run time. On a machine with internet, download {url} and copy it to {path} "
            f"(or point TORCH_HOME at a folder whose checkpoints/ holds it), or set train.weights to a file path "
            f"(use {{arch}} in the path for one file per architecture)."
        )
    # torchvision names its files <name>-<first 8 hex of sha256>.pth; check it so a corrupt copy is caught here.
    expected = path.stem.rsplit("-", 1)[-1]
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise WeightsUnavailableError(
            f"{path}: sha256 {actual[:16]}... does not match the hash prefix {expected!r} in its torchvision file "
            f"name; the file is corrupt or not {url}. Download it again."
        )
    return _read_state_dict(path)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise WeightsUnavailableError(f"{path}: cannot read a torch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise WeightsUnavailableError(
            f"{path}: expected a state dict (mapping of tensor names), got {type(state).__name__}"
        )
    return state


def build_model(
    arch: str,
    num_classes: int,
    dropout: float = 0.5,
    weights: str = "none",
    trainable: str = "all",
) -> nn.Module:
    """Build a classifier by architecture name.

    Args:
        arch: A key of :data:`ARCHITECTURES`.
        num_classes: Number of output logits.
        dropout: Dropout probability before the final linear layer.
        weights: ``none``, ``imagenet``, or a path to a torchvision-layout state dict of the backbone
            (``{arch}`` in the path is replaced by the architecture name).
        trainable: ``all``, ``top`` (last block and head) or ``head``: the other parameters are frozen.

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: Unknown architecture or ``trainable`` value.
        WeightsUnavailableError: Pretrained weights are missing, corrupt, or do not fit the architecture.
    """
    spec = _spec(arch)
    model = spec.build()
    if weights == "imagenet":
        state = _load_imagenet_state(arch)
    elif weights != "none":
        state = _read_state_dict(Path(weights.replace("{arch}", arch)))
    if weights != "none":
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsUnavailableError(
                f"weights {weights!r} do not fit torchvision's {arch} (expected its ImageNet state-dict layout): "
                f"{str(exc).splitlines()[0]}"
            ) from exc
    spec.replace_head(model, num_classes, dropout)
    set_trainable(model, arch, trainable)
    return model


TRAINABLE_CHOICES = ("all", "top", "head")


def trainable_parameters(model: nn.Module, arch: str, trainable: str) -> list[nn.Parameter]:
    """Return the parameters that ``trainable`` names (``all``, ``top`` block plus head, or ``head``), in model order.

    Raises:
        ConfigError: Unknown architecture or ``trainable`` value.
    """
    spec = _spec(arch)
    if trainable not in TRAINABLE_CHOICES:
        raise ConfigError(f"trainable={trainable!r}; expected one of {list(TRAINABLE_CHOICES)}")
    if trainable == "all":
        return list(model.parameters())
    chosen = {id(p) for p in spec.head(model).parameters()}
    if trainable == "top":
        chosen |= {id(p) for p in spec.top_block(model).parameters()}
    return [p for p in model.parameters() if id(p) in chosen]


def set_trainable(model: nn.Module, arch: str, trainable: str) -> None:
    """Freeze all parameters except those ``trainable`` names (``all``, ``top`` block plus head, or ``head``)."""
    chosen = {id(p) for p in trainable_parameters(model, arch, trainable)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in chosen)


def param_groups(
    model: nn.Module, arch: str, trainable: str, lr: float, finetune_lr_factor: float
) -> list[dict[str, Any]]:
    """Return optimiser parameter groups for two-phase fine-tuning: the head, then the unfrozen backbone layers.

    The head (new, randomly initialised) learns at ``lr``; the pretrained layers that ``trainable`` names besides
    the head learn at ``lr * finetune_lr_factor``, so that fine-tuning adapts them without destroying the
    ImageNet features. The backbone group is empty with ``trainable: head``.

    Args:
        model: A model built by :func:`build_model` for ``arch``.
        arch: A key of :data:`ARCHITECTURES`.
        trainable: ``all``, ``top`` or ``head``: which layers the second phase trains.
        lr: Learning rate of the head.
        finetune_lr_factor: Multiplier of ``lr`` for the backbone layers.

    Returns:
        ``[{"name": "head", "params": [...], "lr": lr}, {"name": "backbone", "params": [...], "lr": ...}]``,
        ready for a ``torch.optim`` optimiser (which keeps the extra ``name`` key in its param groups).

    Raises:
        ConfigError: Unknown architecture or ``trainable`` value.
    """
    head = list(_spec(arch).head(model).parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in trainable_parameters(model, arch, trainable) if id(p) not in head_ids]
    return [
        {"name": "head", "params": head, "lr": lr},
        {"name": "backbone", "params": backbone, "lr": lr * finetune_lr_factor},
    ]


def cam_layer(model: nn.Module, arch: str) -> nn.Module:
    """Return the layer whose activations Grad-CAM explains (the final convolutional block)."""
    return _spec(arch).cam_layer(model)
