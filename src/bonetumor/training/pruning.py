"""Structured (channel) pruning of VGG models for small machines, and the rebuild of a pruned architecture.

:func:`prune_vgg` ranks the filters of every convolution in ``model.features`` by their L1 norm (Li et al.,
"Pruning Filters for Efficient ConvNets", 2017) and physically removes the weakest ones: the convolution gets
fewer output channels, its BatchNorm (``vgg*_bn``) and the next convolution's input channels are sliced to match,
and the head's linear layer loses the inputs of the last convolution's removed filters. The result is a smaller,
faster dense model (no masks). Torch-Pruning's dependency graph does the slicing, so every layer coupled to a
removed channel is sliced consistently.

A pruned model's layer widths are not torchvision's, so its saved state dict only loads into a model rebuilt with
the same widths: :func:`channel_plan` lists them and :func:`build_pruned_vgg` rebuilds the module tree from that
list (no pickled modules needed).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch_pruning as tp
from torch import nn

from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.training.models import build_model

#: No convolution is pruned below this many output channels.
MIN_CHANNELS = 8


@dataclass(frozen=True)
class PruneSummary:
    """What pruning changed.

    Attributes:
        amount: Share of each convolution's filters that was asked to be removed.
        plan_before: Output channels of every convolution in ``features`` before pruning.
        plan_after: The same after pruning (the argument :func:`build_pruned_vgg` needs).
        params_before: Parameter count before pruning.
        params_after: Parameter count after pruning.
        macs_before: Multiply-accumulates of one forward pass of ``example_input`` before pruning.
        macs_after: The same after pruning.
    """

    amount: float
    plan_before: tuple[int, ...]
    plan_after: tuple[int, ...]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def params_ratio(self) -> float:
        """Parameters after pruning as a share of those before."""
        return self.params_after / self.params_before

    @property
    def macs_ratio(self) -> float:
        """MACs after pruning as a share of those before."""
        return self.macs_after / self.macs_before if self.macs_before else math.nan


def _features(model: nn.Module) -> nn.Sequential:
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential) or not any(isinstance(m, nn.Conv2d) for m in features):
        raise ConfigError(
            f"{type(model).__name__}: expected a torchvision VGG whose `features` is an nn.Sequential of Conv2d "
            f"layers (arch vgg19 or vgg19_bn); only VGGs can be pruned here"
        )
    return features


def _head_linear(model: nn.Module) -> tuple[nn.Sequential, int]:
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential):
        linears = [i for i, m in enumerate(classifier) if isinstance(m, nn.Linear)]
        if len(linears) == 1:
            return classifier, linears[0]
    raise ConfigError(
        f"{type(model).__name__}: expected the project's VGG head (classifier = Flatten, Dropout, one Linear), "
        f"as bonetumor.models.build_model makes it"
    )


def channel_plan(model: nn.Module) -> list[int]:
    """Return the output channels of every convolution in a VGG's ``features``, in order.

    Args:
        model: A VGG built by :func:`bonetumor.training.models.build_model`, pruned or not.

    Returns:
        One width per convolution (16 for VGG19), e.g. ``[64, 64, 128, ...]`` before pruning.

    Raises:
        ConfigError: The model is not a VGG.
    """
    return [m.out_channels for m in _features(model) if isinstance(m, nn.Conv2d)]


def kept_channels(channels: int, amount: float, min_channels: int = MIN_CHANNELS) -> int:
    """Return how many of ``channels`` filters pruning by ``amount`` keeps (rounded, at least ``min_channels``)."""
    return min(channels, max(min_channels, round(channels * (1.0 - amount))))


def _count(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    # Torch-Pruning counts on a deep copy in eval mode, so the model's mode and BatchNorm statistics stay.
    macs, _ = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), sum(p.numel() for p in model.parameters())


def prune_vgg(
    model: nn.Module, amount: float, example_input: torch.Tensor, min_channels: int = MIN_CHANNELS
) -> tuple[nn.Module, PruneSummary]:
    """Remove the lowest-L1 filters of every convolution of a VGG, physically (a smaller dense model).

    Filters are ranked per layer on the unpruned weights (the "independent" strategy of Li et al.), so a layer's
    ranking does not depend on the order layers are pruned in. Each convolution keeps
    ``round(out_channels * (1 - amount))`` filters, never fewer than ``min_channels``. The BatchNorm after a
    convolution (if any), the next convolution's input channels and, for the last one, the head's linear inputs
    are sliced to match. The pruned model needs fine-tuning afterwards (the engine's ``fit``).

    Args:
        model: A VGG built by :func:`bonetumor.training.models.build_model` (``vgg19`` or ``vgg19_bn``); left unchanged.
        amount: Share of each convolution's filters to remove, in [0, 1).
        example_input: A batch the model accepts (e.g. ``torch.randn(1, 3, 128, 128)``), used to trace the
            layer dependencies and count MACs.
        min_channels: Lower bound on the filters a convolution keeps.

    Returns:
        The pruned copy (same training mode and ``requires_grad`` flags as ``model``) and a summary.

    Raises:
        ConfigError: ``amount`` or ``min_channels`` is out of range, or the model is not such a VGG.
    """
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"pruning amount={amount}; expected a share in [0, 1)")
    if min_channels < 1:
        raise ConfigError(f"min_channels={min_channels}; expected at least 1")
    _features(model)
    _head_linear(model)
    pruned = copy.deepcopy(model)
    was_training = pruned.training
    requires_grad = {name: p.requires_grad for name, p in pruned.named_parameters()}
    plan_before = channel_plan(pruned)
    macs_before, params_before = _count(pruned, example_input)

    convs = [m for m in _features(pruned) if isinstance(m, nn.Conv2d)]
    # Rank every layer before any slicing: removing a layer's inputs would change the next layer's L1 norms.
    drops: list[list[int]] = []
    for conv in convs:
        l1 = conv.weight.detach().abs().sum(dim=(1, 2, 3))
        order = torch.argsort(l1, descending=True, stable=True)
        drops.append(sorted(order[kept_channels(conv.out_channels, amount, min_channels) :].tolist()))

    # The dependency graph follows autograd: frozen parameters (trainable=top/head) would hide the early layers.
    pruned.requires_grad_(True)
    pruned.eval()  # tracing runs a forward pass: it must not update BatchNorm statistics (tp sets eval too)
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(pruned, example_inputs=example_input)
    for conv, drop in zip(convs, drops, strict=True):
        if drop:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()

    for name, param in pruned.named_parameters():
        param.requires_grad_(requires_grad[name])
    pruned.train(was_training)
    classifier, index = _head_linear(pruned)
    plan_after = channel_plan(pruned)
    in_features = _as_linear(classifier[index]).in_features
    if in_features != plan_after[-1]:
        raise ConfigError(
            f"pruning left the head's linear layer with {in_features} inputs but the last convolution with "
            f"{plan_after[-1]} channels; expected the project's head (global average pooling, then Linear)"
        )
    macs_after, params_after = _count(pruned, example_input)
    summary = PruneSummary(
        amount=amount,
        plan_before=tuple(plan_before),
        plan_after=tuple(plan_after),
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
    )
    return pruned, summary


def _as_linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"expected an nn.Linear head layer, got {type(module).__name__}")
    return module


def build_pruned_vgg(arch: str, channel_plan: Sequence[int], num_classes: int, dropout: float = 0.5) -> nn.Module:
    """Rebuild a pruned VGG's module tree from its channel plan, ready for ``load_state_dict(strict=True)``.

    The module names are those of :func:`bonetumor.training.models.build_model`, so a state dict saved from the output
    of :func:`prune_vgg` loads strictly. Weights are freshly initialised: load the saved ones.

    Args:
        arch: VGG architecture name known to :func:`bonetumor.training.models.build_model` (``vgg19``, ``vgg19_bn``).
        channel_plan: Output channels of every convolution in ``features`` (:attr:`PruneSummary.plan_after`).
        num_classes: Number of output logits.
        dropout: Dropout probability of the head.

    Returns:
        The model on the CPU, in training mode, all parameters trainable.

    Raises:
        ConfigError: Unknown architecture, or not a VGG.
        ArtifactError: The plan does not have one positive width per convolution of ``arch``.
    """
    # Build on the meta device: initialising the full-width VGG only to replace its layers costs seconds.
    with torch.device("meta"):
        model = build_model(arch, num_classes, dropout)
        features = _features(model)
        classifier, index = _head_linear(model)
        n_convs = sum(isinstance(m, nn.Conv2d) for m in features)
        plan = list(channel_plan)
        if len(plan) != n_convs or any(not isinstance(c, int) or c < 1 for c in plan):
            raise ArtifactError(
                f"channel plan {plan} does not fit {arch}: expected {n_convs} positive integers (one output width "
                f"per convolution of features)"
            )
        widths = iter(plan)
        channels = 3
        for i, module in enumerate(features):
            if isinstance(module, nn.Conv2d):
                out = next(widths)
                features[i] = nn.Conv2d(
                    channels,
                    out,
                    kernel_size=cast(tuple[int, int], module.kernel_size),
                    stride=cast(tuple[int, int], module.stride),
                    padding=cast(tuple[int, int], module.padding),
                    dilation=cast(tuple[int, int], module.dilation),
                    bias=module.bias is not None,
                )
                channels = out
            elif isinstance(module, nn.BatchNorm2d):
                features[i] = nn.BatchNorm2d(
                    channels,
                    eps=module.eps,
                    momentum=module.momentum,
                    affine=module.affine,
                    track_running_stats=module.track_running_stats,
                )
        classifier[index] = nn.Linear(channels, num_classes)
    model.to_empty(device="cpu")
    for module in model.modules():
        # Fresh initialisation (PyTorch defaults), so the model is never left holding uninitialised memory.
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            module.reset_parameters()
    return model
