"""A structurally pruned VGG: each fold's trained VGG with its weakest filters removed, then fine-tuned.

Smaller and faster on a CPU, for small machines. Built from the fold model of the VGG it prunes
(``<arch>_pruned``, one per VGG in ``train.architectures`` with ``candidates.pruned_vgg19``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bonetumor.config import Config
from bonetumor.errors import ConfigError
from bonetumor.training.candidates.base import Candidate, FitContext, FittedModel, TrainingSet
from bonetumor.training.candidates.network import TorchFitted, fit_title, stop_dataset
from bonetumor.training.engine import fit, training_dataset
from bonetumor.training.pruning import PruneSummary, prune_vgg
from bonetumor.transforms.tta import TestTimeViews
from bonetumor.utils import EtaTimer, seed_everything

log = logging.getLogger(__name__)

#: Architectures :func:`fit_pruned_vgg` accepts (structured pruning is written for torchvision's VGG layout).
PRUNABLE_ARCHITECTURES: frozenset[str] = frozenset({"vgg19", "vgg19_bn"})


def fit_pruned_vgg(
    model: nn.Module,
    arch: str,
    train_set: torch.utils.data.Dataset[Any],
    stop_set: torch.utils.data.Dataset[Any] | None,
    config: Config,
    device: torch.device,
    name: str,
    timer: EtaTimer | None = None,
    *,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    views: TestTimeViews | None = None,
) -> tuple[nn.Module, PruneSummary]:
    """Prune a trained VGG's weakest filters (``candidates.prune_amount``) and fine-tune the smaller model.

    Fine-tuning runs :func:`bonetumor.training.engine.fit` for ``candidates.prune_finetune_steps`` steps (also the
    schedule length) with ``config.train`` otherwise, except: no head-only phase (the head is trained already),
    and with two-phase fine-tuning configured (``head_steps > 0``, pretrained weights) the learning rate is
    ``lr * finetune_lr_factor``, the rate the backbone was fine-tuned at, so the surviving pretrained filters
    adapt rather than being retrained. Parameters frozen by ``trainable`` stay frozen.

    Args:
        model: The fold's trained VGG (left unchanged).
        arch: ``vgg19`` or ``vgg19_bn``.
        train_set: The fold's augmented training set (3-class labels), as the plain model trained on.
        stop_set: The early-stopping set, or None.
        config: Uses ``candidates`` (prune_amount, prune_finetune_steps), ``preprocess.input_size`` and ``train``.
        device: Where to fine-tune.
        name: Label for progress lines.
        timer: Shared ETA timer (stepped per fine-tuning step).
        on_eval: Called with each fine-tuning evaluation's metrics.
        checkpoint_dir: Checkpoint folder of the fine-tuning, as for :func:`bonetumor.training.engine.fit`.
        fingerprint: Identifies the data, as for :func:`bonetumor.training.engine.fit`.
        views: Test-time views of the early-stopping evaluation.

    Returns:
        The pruned, fine-tuned model (eval mode, on ``device``) and what pruning changed (rebuild the module from
        ``summary.plan_after`` with :func:`bonetumor.training.pruning.build_pruned_vgg`).

    Raises:
        ConfigError: ``arch`` is not a VGG, or the model is not the project's VGG.
    """
    if arch not in PRUNABLE_ARCHITECTURES:
        raise ConfigError(
            f"candidates.pruned_vgg19: cannot prune arch {arch!r}; structured pruning is only implemented for "
            f"{sorted(PRUNABLE_ARCHITECTURES)}"
        )
    size = config.preprocess.input_size
    # Torch-Pruning traces a forward pass: the example must live where the model's weights do.
    weight_device = next(model.parameters()).device
    example = torch.zeros(1, 3, size, size, device=weight_device)
    pruned, summary = prune_vgg(model, config.candidates.prune_amount, example)
    log.info(
        "%s: pruned %.0f%% of each convolution's filters: %.1fM -> %.1fM parameters (%.0f%%), MACs %.0f%%",
        name,
        100 * summary.amount,
        summary.params_before / 1e6,
        summary.params_after / 1e6,
        100 * summary.params_ratio,
        100 * summary.macs_ratio,
    )
    train = config.train
    steps = config.candidates.prune_finetune_steps
    finetune = dataclasses.replace(
        train,
        head_steps=0,
        lr=train.lr * train.finetune_lr_factor if train.head_steps > 0 else train.lr,
        eval_every=min(train.eval_every, steps),
    )
    result = fit(
        pruned,
        train_set,
        stop_set,
        finetune,
        device,
        steps,
        name,
        on_eval,
        timer,
        schedule_steps=steps,
        arch=arch,
        checkpoint_dir=checkpoint_dir,
        fingerprint=f"{fingerprint}-pruned-{summary.plan_after}",
        views=views,
    )
    return result.model.eval(), summary


class PrunedCandidate(Candidate):
    """``<arch>_pruned``: the fold's ``arch`` model, pruned by ``candidates.prune_amount`` and fine-tuned."""

    kind: ClassVar[str] = "pruned"

    def __init__(self, arch: str) -> None:
        super().__init__(f"{arch}_pruned", arch=arch, bases=(arch,))
        self.network = arch

    @classmethod
    def from_config(cls, config: Config) -> list[Candidate]:
        """One per prunable architecture of ``train.architectures`` with ``candidates.pruned_vgg19``."""
        if not config.candidates.pruned_vgg19:
            return []
        return [cls(arch) for arch in config.train.architectures if arch in PRUNABLE_ARCHITECTURES]

    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> TorchFitted:
        """Prune the base's fitted model and fine-tune it on the same training tiles."""
        base = bases[self.bases[0]]
        if not isinstance(base, TorchFitted):
            raise ConfigError(f"{self.name}: its base {self.bases[0]!r} is not a torch model; expected a VGG")
        config = self.settings(context.config)
        # Seeded like every other fit, so its figures do not depend on which candidates ran before it.
        seed_everything(data.seed)
        pruned, summary = fit_pruned_vgg(
            base.model,
            self.network,
            training_dataset(data.fit_table, config, context.policy, stain=data.stain),
            stop_dataset(data, config),
            config,
            context.device,
            f"{self.name} {fit_title(data)}",
            context.timer,
            views=TestTimeViews.from_config(config.preprocess),
        )
        ratios = {"pruned_params_ratio": summary.params_ratio, "pruned_macs_ratio": summary.macs_ratio}
        return PrunedFitted(pruned, self.network, config, data.stain, context.device, extra=ratios, summary=summary)

    def planned_steps(self, config: Config, n_folds: int) -> int:
        """The fine-tuning steps of every fold."""
        return n_folds * config.candidates.prune_finetune_steps


class PrunedFitted(TorchFitted):
    """A pruned VGG; its bundle also records the channel plan that rebuilds the smaller module tree.

    Args:
        summary: What pruning changed.
        *args: As for :class:`TorchFitted`.
        **kwargs: As for :class:`TorchFitted`.
    """

    def __init__(self, *args: Any, summary: PruneSummary, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.summary = summary

    def export(self, out_dir: Path, provenance: Mapping[str, Any] | None = None, referral: Any = None) -> Path:
        """Write the bundle with the channel plan (``pruning.plan_after``) in its provenance."""
        return super().export(out_dir, {**(provenance or {}), "pruned_plan": list(self.summary.plan_after)}, referral)
