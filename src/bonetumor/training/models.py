"""Model factory: every architecture is built by name through :func:`build_model` (as timm does).

Each architecture is a torchvision backbone with a new head: global average pooling, dropout, and one linear
layer with an output per class. The 120M-parameter ImageNet classifier of VGG19 and VGG19-BN is replaced by that
head too (as in Keras-style transfer learning): it would dominate memory, optimiser state and artifact size
(548 MB per model) while the convolutional features carry the transfer.

Where the starting weights come from is decided once per architecture by :func:`resolve_weights`:

- ``auto`` (the default): torchvision's ImageNet file from TORCH_HOME's checkpoint cache when it is there;
  otherwise downloaded by torchvision's own mechanism (``WeightsEnum.get_state_dict`` with its SHA-256 check)
  when the machine is online; otherwise random initialisation, with one warning, and the fallback recorded as
  :attr:`InitWeights.tag` (``scratch (no ImageNet weights available)``) on every run and model it makes.
- ``imagenet``: the same file, strictly: missing weights are an error saying which file to put where. It never
  downloads, so an air-gapped run fails loudly instead of silently training from scratch.
- ``none``: random initialisation; a path: a torchvision-layout state dict.

A file in TORCH_HOME is always checked against the hash prefix torchvision puts in its name; a corrupt file is an
error for ``auto`` too (the user put it there on purpose). ``bonetumor weights fetch`` downloads the files ahead of
time (:func:`fetch_imagenet_weights`). ``BONETUMOR_OFFLINE=1`` skips the download attempt of ``auto``.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torchvision import models as tvm

from bonetumor.errors import ConfigError, WeightsCorruptError, WeightsUnavailableError
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


#: Seconds a download of ImageNet weights may stall before ``auto`` gives up and trains from scratch.
DOWNLOAD_TIMEOUT_S = 30.0
#: Environment variable that, set to 1, makes ``train.weights: auto`` skip the download attempt.
OFFLINE_ENV = "BONETUMOR_OFFLINE"


def _build_resnet50() -> nn.Module:
    # zero_init_residual: each residual branch starts as the identity (Goyal et al. 2017), which trains a ResNet50
    # from random initialisation markedly faster; ImageNet weights overwrite it when they are loaded.
    return tvm.resnet50(weights=None, zero_init_residual=True)


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
        build=_build_resnet50,
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


@dataclass(frozen=True)
class InitWeights:
    """Where an architecture's starting weights come from, decided once by :func:`resolve_weights`.

    Attributes:
        arch: The architecture.
        source: ``imagenet``, ``file`` (a user's state dict) or ``scratch`` (random initialisation).
        detail: The file, or why there are no pretrained weights.
        fallback: ``train.weights: auto`` wanted ImageNet weights and fell back to random initialisation.
        state: The backbone state dict to load (None for ``scratch``).
    """

    arch: str
    source: Literal["imagenet", "file", "scratch"]
    detail: str
    fallback: bool = False
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from trained weights."""
        return self.source != "scratch"

    @property
    def tag(self) -> str:
        """One line for runs, model versions, reports and ``/model_info``, e.g. ``scratch (no ImageNet ...)``."""
        return f"{self.source} ({self.detail})"


def _check_imagenet_file(path: Path, url: str) -> dict[str, torch.Tensor]:
    # torchvision names its files <name>-<first 8 hex of sha256>.pth; check it so a corrupt copy is caught here.
    expected = path.stem.rsplit("-", 1)[-1]
    actual = sha256_file(path)
    if not actual.startswith(expected):
        raise WeightsCorruptError(
            f"{path}: sha256 {actual[:16]}... does not match the hash prefix {expected!r} in its torchvision file "
            f"name; the file is corrupt or not {url}. Delete it and run `bonetumor weights fetch`, or download it "
            "again."
        )
    return _read_state_dict(path)


def _load_imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    path = imagenet_weights_path(arch)
    url = _spec(arch).imagenet_weights.url
    if not path.is_file():
        raise WeightsUnavailableError(
            f"train.weights=imagenet: the ImageNet weights of {arch} are not at {path}, and `imagenet` never "
            f"downloads. Run `bonetumor weights fetch {arch}` (or download {url}) on a machine with internet and "
            f"copy the file to {path} (or point TORCH_HOME at a folder whose hub/checkpoints/ holds it), use "
            f"train.weights: auto "
            f"(downloads when online, else trains from scratch), or set train.weights to a file path (use {{arch}} "
            f"in the path for one file per architecture)."
        )
    return _check_imagenet_file(path, url)


def download_imagenet_state(arch: str, timeout: float = DOWNLOAD_TIMEOUT_S, progress: bool = True) -> Path:
    """Download torchvision's ImageNet weights of ``arch`` into TORCH_HOME, hash-checked, and return the file.

    Uses torchvision's own mechanism (``WeightsEnum.get_state_dict(check_hash=True)``, i.e.
    ``torch.hub.load_state_dict_from_url``), so the file lands where torchvision and ``train.weights: imagenet``
    look for it, and a download whose SHA-256 does not match the file name is rejected.

    Args:
        arch: A key of :data:`ARCHITECTURES`.
        timeout: Seconds a connection may stall.
        progress: Show torch's download progress bar.

    Raises:
        WeightsUnavailableError: The machine is offline or the server cannot be reached.
        WeightsCorruptError: The download does not match its hash.
    """
    spec = _spec(arch)
    path = imagenet_weights_path(arch)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # urllib inside torch.hub takes no timeout of its own
    try:
        spec.imagenet_weights.get_state_dict(progress=progress, check_hash=True)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsUnavailableError(
            f"cannot download the ImageNet weights of {arch} from {spec.imagenet_weights.url} ({reason})"
        ) from exc
    except RuntimeError as exc:  # torch.hub's hash check
        raise WeightsCorruptError(
            f"the download of {spec.imagenet_weights.url} is corrupt ({exc}); nothing was kept at {path}"
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)
    return path


def resolve_weights(arch: str, weights: str) -> InitWeights:
    """Decide where ``arch``'s starting weights come from (``train.weights``), loading them once.

    Args:
        arch: A key of :data:`ARCHITECTURES`.
        weights: ``auto``, ``imagenet``, ``none`` or a path (``{arch}`` is replaced by the architecture).

    Returns:
        The decision and, unless ``scratch``, the state dict. With ``auto`` and neither a file in TORCH_HOME nor
        a working download, ``scratch`` with ``fallback=True``, after one warning.

    Raises:
        ConfigError: Unknown architecture.
        WeightsUnavailableError: ``imagenet`` without the file, a corrupt file in TORCH_HOME, a download that fails
            its hash check, or a path that does not hold a state dict.
    """
    spec = _spec(arch)
    if weights == "none":
        return InitWeights(arch, "scratch", "train.weights: none")
    if weights == "imagenet":
        return InitWeights(arch, "imagenet", imagenet_weights_path(arch).name, state=_load_imagenet_state(arch))
    if weights != "auto":
        path = Path(weights.replace("{arch}", arch))
        return InitWeights(arch, "file", str(path), state=_read_state_dict(path))
    path = imagenet_weights_path(arch)
    if not path.is_file():
        if os.environ.get(OFFLINE_ENV) == "1":
            reason = f"{OFFLINE_ENV}=1"
        else:
            try:
                download_imagenet_state(arch, progress=False)
                reason = ""
            except WeightsCorruptError:
                raise
            except WeightsUnavailableError as exc:
                reason = str(exc)
        if not path.is_file():
            log.warning(
                "train.weights=auto: no ImageNet weights for %s (%s, nothing at %s); training from random "
                "initialisation. For transfer learning run `bonetumor weights fetch %s` where there is internet and "
                "copy the file there.",
                arch,
                reason or "download left no file",
                path,
                arch,
            )
            return InitWeights(arch, "scratch", "no ImageNet weights available", fallback=True)
    return InitWeights(arch, "imagenet", path.name, state=_check_imagenet_file(path, spec.imagenet_weights.url))


def fetch_imagenet_weights(archs: list[str]) -> list[Path]:
    """Download (or find, hash-checked) the ImageNet files of ``archs`` in TORCH_HOME; ``bonetumor weights fetch``.

    Raises:
        ConfigError: Unknown architecture.
        WeightsUnavailableError: A download failed or a file is corrupt.
    """
    paths = []
    for arch in archs:
        spec = _spec(arch)
        path = imagenet_weights_path(arch)
        if not path.is_file():
            download_imagenet_state(arch)
        _check_imagenet_file(path, spec.imagenet_weights.url)
        paths.append(path)
    return paths


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found; expected a torchvision-layout state dict")
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
    weights: str | InitWeights = "none",
    trainable: str = "all",
) -> nn.Module:
    """Build a classifier by architecture name.

    Args:
        arch: A key of :data:`ARCHITECTURES`.
        num_classes: Number of output logits.
        dropout: Dropout probability before the final linear layer.
        weights: An :class:`InitWeights` from :func:`resolve_weights` (what training passes, resolved once per
            architecture), or ``train.weights`` itself (``none``, ``auto``, ``imagenet`` or a path), resolved here.
        trainable: ``all``, ``top`` (last block and head) or ``head``: the other parameters are frozen.

    Returns:
        The model, in training mode.

    Raises:
        ConfigError: Unknown architecture or ``trainable`` value, or frozen layers on a randomly initialised
            backbone (``auto`` fell back to scratch).
        WeightsUnavailableError: Pretrained weights are missing, corrupt, or do not fit the architecture.
    """
    spec = _spec(arch)
    init = weights if isinstance(weights, InitWeights) else resolve_weights(arch, weights)
    if init.arch != arch:
        raise ConfigError(f"build_model: weights resolved for {init.arch!r} cannot initialise {arch!r}")
    if not init.pretrained and trainable != "all":
        raise ConfigError(
            f"train.trainable={trainable!r} freezes layers, but {arch} starts from random initialisation "
            f"({init.detail}); use trainable: all, or provide ImageNet weights (`bonetumor weights fetch {arch}`)"
        )
    model = spec.build()
    if init.state is not None:
        try:
            model.load_state_dict(init.state)
        except RuntimeError as exc:
            raise WeightsUnavailableError(
                f"weights {init.tag} do not fit torchvision's {arch} (expected its ImageNet state-dict layout): "
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
