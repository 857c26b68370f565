"""The training engine: datasets, the step-counted fit loop with early stopping, and batched prediction.

Torch only (no MLflow): the train and register stages call it and do the tracking, and benchmarks and tests
can run it on any device without a tracking server.

The recipe of :func:`fit`, driven by ``Config.train``:

- Length in optimiser steps (``steps``), not epochs: each step draws ``batch_size`` tiles from an endless stream of
  fresh shuffles of the training set (:class:`StepBatchSampler`), so the batch of step ``s`` depends only on the
  seed and ``s``. That is what makes a resumed run exact, and a recipe independent of how many tiles a fold has.
- AdamW (or Adam) with label smoothing and optional gradient-norm clipping (``grad_clip``); the learning rate
  follows ``scheduler`` per step: ``onecycle`` (torch's OneCycleLR: cosine warm-up from lr/25 to lr over
  ``warmup_fraction`` of the steps, then cosine annealing to lr/250000, with Adam's beta1 cycled the other way),
  ``cosine`` (linear warm-up, cosine to 0) or ``constant`` (linear warm-up). The schedule spans
  ``schedule_steps`` (default ``steps``): the refit stops earlier than the folds but sees the same rates.
- Early stopping: every ``eval_every`` steps the model, with its test-time views (:mod:`bonetumor.transforms.tta`),
predicts
  the early-stopping set; the best evaluation by ``monitor`` after the warm-up is kept, and ``patience``
  evaluations without improvement stop the run, never during warm-up or the head phase.
- Two-phase fine-tuning (``head_steps > 0``, needs ``fit(..., arch=...)``): steps ``1..head_steps`` train the head
  only, at ``lr``; from step ``head_steps + 1`` the layers that ``trainable`` names are unfrozen too and learn at
  ``lr * finetune_lr_factor`` while the head keeps ``lr``. One optimiser holds both groups from the start; frozen
  parameters get no gradient, so it leaves them (and their moments) untouched.
- Frozen BatchNorm layers (all their parameters frozen) stay in inference mode, so that a frozen layer is frozen
  entirely: its ImageNet running statistics are not drifted by the batches of the head phase.
- ``class_weighted_loss``: the training cross-entropy weights class ``c`` by ``N / (K * n_c)`` (see
  :func:`class_weights`); the reported ``val_loss`` stays the unweighted, unsmoothed cross-entropy.
- ``mixed_precision``: autocast on CUDA (bfloat16 where supported, else float16 with a gradient scaler); never on
  a CPU, where the same code runs with autocast and the scaler disabled (bfloat16 saves only 13-22 % per step
  on this project's 2-core CPU and costs accuracy checks).
- ``channels_last``: see :func:`channels_last_enabled`.
- Checkpoints (``checkpoint_dir`` given and ``checkpoint: true``): at every evaluation the whole loop state is
  written atomically; a rerun with the same fingerprint resumes after the last checkpointed step and ends exactly
  as an uninterrupted run would (on a CPU with ``num_workers: 0``; with loader workers the batch order is
  restored but the workers' augmentation draws are not). The file, its fingerprint and the random generators'
  state are :mod:`bonetumor.training.checkpoint`'s.
- Progress: a tqdm bar on stderr per fit (``progress: true``) besides the log lines.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset
from torchvision.transforms import v2
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bonetumor.config import Config, TrainConfig
from bonetumor.data.datasets import TileDataset, label_indices
from bonetumor.errors import ConfigError, DatasetError
from bonetumor.evaluation.metrics import macro_f1
from bonetumor.faults import fault_point
from bonetumor.training.checkpoint import (
    checkpoint_path,
    fit_fingerprint,
    read_checkpoint,
    restore_rng,
    rng_state,
    write_checkpoint,
)

# Re-exported: the callers of fit clear its checkpoint through the engine.
from bonetumor.training.checkpoint import clear_checkpoint as clear_checkpoint
from bonetumor.training.models import param_groups, set_trainable
from bonetumor.transforms.augment import AugmentPolicy, build_train_transform
from bonetumor.transforms.preprocess import tensor_tail, tile_ops
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import TestTimeViews, with_views
from bonetumor.utils import EtaTimer

log = logging.getLogger(__name__)

#: Seconds between progress lines inside one evaluation round (long rounds on the full data set or on a CPU).
BATCH_LOG_SECONDS = 30.0
#: torch OneCycleLR's defaults: the warm-up starts at lr / 25 and the annealing ends at lr / 25 / 1e4.
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4

#: Architectures whose CPU training step is faster in channels_last. Measured with
#: ``python -m benchmarks.train_throughput --archs resnet50 vgg19 vgg19_bn --sizes 128 --channels-last off on
#: --repeats 4`` (2 CPU threads shared with other jobs, torch 2.14.1, batch 16, 128 px), images/s off -> on:
#: bare step (forward, backward, Adam; median of 4 ABBA rounds, two runs): resnet50 16.9 -> 17.9 and
#: 14.1 -> 15.1 (+6%), vgg19 4.6 -> 5.7 and 4.2 -> 5.0 (+20%), vgg19_bn 4.1 -> 4.9 (+20%). Faster for every
#: architecture, so ``auto`` is on for all three; an architecture added later stays off until measured.
_CPU_CHANNELS_LAST_FASTER: frozenset[str] = frozenset({"resnet50", "vgg19", "vgg19_bn"})


def select_device(preference: str) -> torch.device:
    """Return the torch device for ``auto``, ``cpu`` or ``cuda``.

    Raises:
        ConfigError: ``cuda`` was asked for but no CUDA device is available.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def channels_last_enabled(setting: str, device: torch.device, arch: str | None) -> bool:
    """Decide whether to train in channels_last memory format.

    Args:
        setting: ``train.channels_last``: ``on``, ``off`` or ``auto``.
        device: The training device.
        arch: The architecture, or ``None`` when unknown.

    Returns:
        ``on``: True; ``off``: False; ``auto``: True on CUDA (cuDNN's tensor-core convolutions, used by mixed
        precision, want NHWC: PyTorch's and NVIDIA's guidance, not measurable here) and on a CPU only for the
        architectures measured faster there (:data:`_CPU_CHANNELS_LAST_FASTER`).

    Raises:
        ConfigError: ``setting`` is not one of ``auto``, ``on``, ``off``.
    """
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"train.channels_last={setting!r}; expected one of ['auto', 'on', 'off']")
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        return True
    return arch in _CPU_CHANNELS_LAST_FASTER


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Return the autocast dtype of mixed precision: bfloat16 or float16 on CUDA, ``None`` (off) elsewhere."""
    if not config.mixed_precision or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    # Always a real autocast context, disabled when dtype is None, so that one code path runs everywhere.
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def class_weights(labels: Sequence[int] | np.ndarray, num_classes: int) -> torch.Tensor:
    """Return inverse-frequency class weights, normalised so that the mean weight per training item is 1.

    Class ``c`` with ``n_c`` of the ``N`` items gets ``N / (K * n_c)``, where ``K`` counts the classes present
    (scikit-learn's ``balanced`` weights): each class then contributes equally to the loss, and the loss keeps
    the scale of the unweighted cross-entropy. An absent class gets 0 (it never is a target).

    Args:
        labels: Class index of every training item.
        num_classes: Number of classes (model outputs).

    Raises:
        DatasetError: A label is outside ``0..num_classes-1`` or there are no labels.
    """
    array = np.asarray(labels, dtype=np.int64)
    if array.size == 0:
        raise DatasetError("class_weighted_loss: the training set has no items to count classes in")
    if array.min() < 0 or array.max() >= num_classes:
        raise DatasetError(
            f"class_weighted_loss: training labels span {array.min()}..{array.max()}; expected 0..{num_classes - 1}"
        )
    counts = np.bincount(array, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = array.size / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def dataset_labels(dataset: Dataset[Any]) -> np.ndarray:
    """Return the class index of every item: from ``labels`` (TileDataset), the tensors, or by reading the items."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].cpu().numpy().astype(np.int64)
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    # Unknown dataset type: one pass over the items (decodes every tile once).
    return np.asarray([int(item[1]) for item in dataset], dtype=np.int64)  # type: ignore[attr-defined]


@dataclass
class FitResult:
    """A trained model (best evaluation's weights loaded) and how training went.

    Attributes:
        model: The trained network (without test-time views), in eval mode and the default memory format.
        history: One dict of metrics per evaluation (every ``eval_every`` steps; restored ones included).
        best_step: The optimiser step whose weights the model holds.
        stopped_early: Whether early stopping ended the run before ``steps``.
        resumed_from: Steps restored from a checkpoint instead of trained (0 = a fresh run).
    """

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    stopped_early: bool = False
    resumed_from: int = 0


class StepBatchSampler(Sampler[list[int]]):
    """The batches of steps ``start + 1 .. steps``, cut from an endless stream of shuffles of the training set.

    Consecutive ``batch_size`` slices of shuffles of ``0 .. n - 1`` (a new permutation, seeded by
    ``(seed, pass)``, each time one is used up). Every batch is full (a batch may run into the next shuffle, and
    with ``n < batch_size`` hold a tile twice), and the batch of step ``s`` depends only on ``seed`` and ``s``: a
    resumed run draws what the killed run would.
    """

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start: int = 0) -> None:
        if n < 1:
            raise DatasetError("the training set is empty; expected at least one tile to train on")
        self.n, self.batch_size, self.steps, self.seed, self.start = n, batch_size, steps, seed, start
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, index: int) -> np.ndarray:
        if index not in self._permutations:
            self._permutations = {index: np.random.default_rng([self.seed, index]).permutation(self.n)}
        return self._permutations[index]

    def batch(self, step: int) -> list[int]:
        """Return the tile indices of (0-based) step ``step``."""
        first = step * self.batch_size
        return [int(self._permutation(p // self.n)[p % self.n]) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(self.steps - self.start, 0)


def _eval_loader(dataset: Dataset[Any], config: TrainConfig) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)


def _improved(stats: dict[str, float], best: dict[str, float] | None, monitor: str) -> bool:
    if best is None:
        return True
    if monitor == "val_loss":
        return stats["val_loss"] < best["val_loss"]
    # Macro-F1 on a small early-stopping set ties often; a lower validation loss breaks the tie.
    return stats["val_macro_f1"] > best["val_macro_f1"] or (
        stats["val_macro_f1"] == best["val_macro_f1"] and stats["val_loss"] < best["val_loss"]
    )


def _memory_format(model: nn.Module) -> torch.memory_format:
    # A channels_last model has 4-D weights that are NHWC-contiguous but not NCHW-contiguous (1x1 kernels are both).
    for parameter in model.parameters():
        channels_last = parameter.is_contiguous(memory_format=torch.channels_last)
        if parameter.dim() == 4 and channels_last and not parameter.is_contiguous():
            return torch.channels_last
    return torch.contiguous_format


def _to_device(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=memory_format) if x.dim() == 4 else x


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    dataset: Dataset[Any],
    config: TrainConfig,
    device: torch.device,
    views: TestTimeViews | None = None,
) -> np.ndarray:
    """Return the model's logits for every item of ``dataset``, in order (N, classes).

    With ``views`` the model is run on each tile's test-time views and returns the log of their mean probabilities
    (:class:`bonetumor.transforms.tta.TestTimeAugmented`; a model already wrapped is used as it is). Inputs follow the
    model's memory format, and on CUDA ``mixed_precision`` autocasts as in training; the logits are float32.
    """
    model.eval()
    memory_format = _memory_format(model)
    evaluated = with_views(model, views) if views is not None else model
    dtype = autocast_dtype(config, device)
    outputs = []
    for x, _ in _eval_loader(dataset, config):
        with _autocast(device, dtype):
            outputs.append(evaluated(_to_device(x, device, memory_format)).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)


def _cosine(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def lr_multiplier(done: int, total: int, warmup: int, scheduler: str) -> float:
    """Return the factor on each group's peak learning rate for the step after ``done`` finished steps.

    Args:
        done: Optimiser steps already taken (0 for the first step).
        total: Length of the schedule in steps.
        warmup: Warm-up steps (``round(warmup_fraction * total)``).
        scheduler: ``onecycle``, ``cosine`` or ``constant`` (see the module docstring).

    Raises:
        ConfigError: Unknown scheduler.
    """
    if scheduler not in ("onecycle", "cosine", "constant"):
        raise ConfigError(f"train.scheduler={scheduler!r}; expected one of ['onecycle', 'cosine', 'constant']")
    if scheduler == "onecycle":
        low = 1.0 / ONECYCLE_DIV
        if done < warmup:
            return _cosine(low, 1.0, done / warmup)
        return _cosine(1.0, low / ONECYCLE_FINAL_DIV, (done - warmup) / max(total - warmup, 1))
    if done < warmup:
        return (done + 1) / (warmup + 1)
    if scheduler == "constant":
        return 1.0
    return _cosine(1.0, 0.0, (done - warmup) / max(total - warmup, 1))


def make_scheduler(
    optimizer: torch.optim.Optimizer, scheduler: str, schedule_steps: int, warmup: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Return the per-step learning-rate scheduler of ``train.scheduler`` over ``schedule_steps`` steps.

    ``onecycle`` is torch's ``OneCycleLR`` itself (cosine phases, and Adam's beta1 cycled from 0.95 down to 0.85
    and back, inversely to the rate), with its peak at ``warmup`` steps; each parameter group peaks at its own
    rate (the head and the backbone of two-phase fine-tuning). ``cosine`` and ``constant`` follow
    :func:`lr_multiplier`.

    Raises:
        ConfigError: Unknown scheduler.
    """
    # torch's phases need at least two warm-up steps and one after them; shorter schedules (tests, tiny demos)
    # follow the same curve through lr_multiplier, without the momentum cycle.
    if scheduler == "onecycle" and 2 <= warmup < schedule_steps:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=schedule_steps,
            pct_start=warmup / schedule_steps,
            div_factor=ONECYCLE_DIV,
            final_div_factor=ONECYCLE_FINAL_DIV,
        )
    lr_multiplier(0, schedule_steps, warmup, scheduler)  # an unknown name fails here, before training
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_multiplier(done, schedule_steps, warmup, scheduler)
    )


def warmup_steps(config: TrainConfig, schedule_steps: int) -> int:
    """Return the warm-up length in steps of a schedule of ``schedule_steps`` steps."""
    return round(config.warmup_fraction * schedule_steps)


def _train_mode(model: nn.Module) -> None:
    model.train()
    # A frozen BatchNorm would still update its running statistics in training mode; keep it in inference mode.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parameters = list(module.parameters(recurse=False))
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()


@dataclass
class _LoopState:
    """Everything of the loop besides model, optimiser and RNGs that a checkpoint must restore."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_step: int = 0
    stale: int = 0
    stopped_early: bool = False


@dataclass(frozen=True)
class _Phases:
    """Two-phase fine-tuning: steps ``1..head_steps`` train the head only, later ones the ``trainable`` layers too."""

    head_steps: int
    arch: str | None
    trainable: str

    def freeze_backbone(self, model: nn.Module) -> None:
        """Freeze all but the head for the head phase (nothing to do in a one-phase fit)."""
        if self.head_steps > 0 and self.arch is not None:
            set_trainable(model, self.arch, "head")

    def unfreeze(self, model: nn.Module) -> None:
        """Make the ``trainable`` layers trainable, as from the fine-tuning phase on (nothing to do in one phase)."""
        if self.head_steps > 0 and self.arch is not None:
            set_trainable(model, self.arch, self.trainable)

    def fine_tuning_starts(self, step: int) -> bool:
        """Return whether (1-based) ``step`` is the first step of the fine-tuning phase."""
        return self.head_steps > 0 and self.arch is not None and step == self.head_steps + 1

    def label(self, step: int) -> str:
        """Return the phase of ``step`` for the progress bar: empty in one phase, else `` head`` or `` fine-tune``."""
        return "" if self.head_steps == 0 else " head" if step <= self.head_steps else " fine-tune"


@dataclass(frozen=True)
class _StoppingRule:
    """Which evaluation is the best so far, and when evaluations without improvement stop the run."""

    steps: int
    warmup: int
    head_steps: int
    patience: int
    monitor: str
    has_val: bool

    def record(self, state: _LoopState, stats: dict[str, float], step: int, model: nn.Module) -> tuple[bool, bool]:
        """Add the evaluation after ``step`` to ``state``; return whether it is the new best and whether to stop."""
        state.history.append(stats)
        # An evaluation inside the warm-up is logged but never chosen: weights taken at a still-rising rate
        # are no model to keep, and a 5-tile early-stopping set would pick one by luck.
        eligible = step > self.warmup or step == self.steps
        improved = eligible and (not self.has_val or _improved(stats, state.best, self.monitor))
        if improved:
            state.best, state.stale, state.best_step = stats, 0, step
            if self.has_val:  # without validation the last step is kept: nothing to restore
                state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        elif eligible:
            state.stale += 1
        state.stopped_early = (
            self.has_val
            and step > max(self.head_steps, self.warmup)
            and state.stale >= self.patience
            and step < self.steps
        )
        return improved, state.stopped_early


class _StepOutput(NamedTuple):
    """One optimiser step's loss, logits and targets, and the learning rates it was taken at."""

    loss: torch.Tensor
    logits: torch.Tensor
    y: torch.Tensor
    used_lrs: list[float]


class _Trainer:
    """The model, optimiser, schedule, gradient scaler and loss of one fit, and one optimiser step with them."""

    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset[Any],
        config: TrainConfig,
        device: torch.device,
        arch: str | None,
        phases: _Phases,
        schedule: int,
        warmup: int,
        name: str,
    ) -> None:
        model.to(device)
        nhwc = channels_last_enabled(config.channels_last, device, arch)
        self.memory_format = torch.channels_last if nhwc else torch.contiguous_format
        model.to(memory_format=self.memory_format)
        phases.freeze_backbone(model)
        self.optimizer = _optimizer(model, config, arch, device)
        self.scheduler = make_scheduler(self.optimizer, config.scheduler, schedule, warmup)
        self.dtype = autocast_dtype(config, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.weights: torch.Tensor | None = None
        self.train_labels = dataset_labels(train_set) if config.class_weighted_loss else None
        self.model, self.config, self.device, self.name = model, config, device, name

    def step(self, x_cpu: torch.Tensor, y_cpu: torch.Tensor) -> _StepOutput:
        """Take one optimiser step on a batch; return its loss, logits, targets and the rates it was taken at."""
        x, y = _to_device(x_cpu, self.device, self.memory_format), y_cpu.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with _autocast(self.device, self.dtype):
            logits = self.model(x)
            loss = nn.functional.cross_entropy(
                logits.float(), y, weight=self._class_weights(logits), label_smoothing=self.config.label_smoothing
            )
        self.scaler.scale(loss).backward()
        if self.config.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the float16-scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        used_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return _StepOutput(loss, logits, y, used_lrs)

    def _class_weights(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Return the training loss's class weights (``None`` unless ``class_weighted_loss``), made at step one."""
        if self.train_labels is not None and self.weights is None:  # the model's output size counts the classes
            self.weights = class_weights(self.train_labels, logits.shape[1]).to(self.device)
            log.info("%s: class weights %s", self.name, [round(float(w), 4) for w in self.weights])
        return self.weights

    def state_dicts(self) -> dict[str, Any]:
        """Return the model's, optimiser's, scheduler's and scaler's state for a checkpoint."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load(self, restored: dict[str, Any]) -> None:
        """Load the states :meth:`state_dicts` saved into a checkpoint."""
        self.model.load_state_dict(restored["model"])
        self.optimizer.load_state_dict(restored["optimizer"])
        self.scheduler.load_state_dict(restored["scheduler"])
        if restored["scaler"]:  # empty when the scaler was off (CPU, bfloat16): a fresh scaler is then right
            self.scaler.load_state_dict(restored["scaler"])


class _Validation:
    """The early-stopping set of one fit (possibly none) and its metrics."""

    def __init__(
        self, val_set: Dataset[Any] | None, config: TrainConfig, device: torch.device, views: TestTimeViews | None
    ) -> None:
        self.val_set, self.config, self.device, self.views = val_set, config, device, views
        self.criterion = nn.CrossEntropyLoss()
        self.targets = torch.from_numpy(dataset_labels(val_set)) if val_set is not None else None

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Return the set's loss, accuracy and macro-F1 (empty without a set), leaving the model in training mode."""
        if self.val_set is None or self.targets is None:
            return {}
        logits = torch.from_numpy(predict_logits(model, self.val_set, self.config, self.device, self.views))
        metrics = {"val_loss": float(self.criterion(logits, self.targets))}
        predictions = logits.argmax(1)
        metrics["val_accuracy"] = float((predictions == self.targets).float().mean())
        metrics["val_macro_f1"] = macro_f1(self.targets.numpy(), predictions.numpy())
        _train_mode(model)
        return metrics


@dataclass
class _Tally:
    """Training loss and accuracy over the steps since the last evaluation, and when that round started."""

    started: float
    total_loss: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one step's batch."""
        self.total_loss += loss.item() * y.numel()
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += y.numel()

    def stats(self, step: int, used_lrs: list[float]) -> dict[str, float]:
        """Return the training part of the evaluation after ``step``, taken at the rates ``used_lrs``."""
        stats: dict[str, float] = {
            "step": step,
            "train_loss": self.total_loss / max(self.seen, 1),
            "train_accuracy": self.correct / max(self.seen, 1),
            "lr": used_lrs[0],  # the rate this step was taken at
        }
        if len(used_lrs) > 1:
            stats["lr_backbone"] = used_lrs[1]
        return stats


@dataclass
class _Progress:
    """What a fit shows while it trains: the progress bar, and a log line every ``BATCH_LOG_SECONDS``."""

    bar: tqdm
    name: str
    steps: int
    phases: _Phases
    timer: EtaTimer | None
    last_log: float

    def show(self, step: int, mean_loss: float) -> None:
        """Advance the bar past ``step``, with the running training loss."""
        self.bar.update()
        self.bar.set_postfix_str(
            f"step {step}/{self.steps}{self.phases.label(step)} loss {mean_loss:.4f}"
            + (f" job ETA {self.timer.eta()}" if self.timer is not None else ""),
            refresh=False,
        )
        if time.monotonic() - self.last_log > BATCH_LOG_SECONDS:
            self.last_log = time.monotonic()
            log.info("%s step %d/%d loss=%.4f", self.name, step, self.steps, mean_loss)

    def skip_rest(self, step: int) -> None:
        """Count the steps an early stop after ``step`` leaves out as done, on the timer and the bar."""
        if self.timer is not None:
            self.timer.step(self.steps - step)
        self.bar.update(self.bar.total - self.bar.n)


def _progress_bar(config: TrainConfig, steps: int, done: int, name: str) -> tqdm:
    """Return the tqdm bar of a fit over ``steps`` steps, ``done`` of them already taken (disabled unless progress)."""
    return tqdm(
        total=steps,
        initial=done,
        desc=name,
        unit="step",
        file=sys.stderr,
        disable=not config.progress,
        dynamic_ncols=True,
    )


def _step_loader(train_set: Dataset[Any], config: TrainConfig, steps: int, done: int) -> DataLoader[Any]:
    """Return the loader of the batches of steps ``done + 1 .. steps`` (see :class:`StepBatchSampler`)."""
    size = len(train_set)  # type: ignore[arg-type]
    sampler = StepBatchSampler(size, config.batch_size, steps, config.seed, start=done)
    # Its own generator: starting to iterate draws a worker seed from it, which from the global generator would
    # shift every augmentation draw of a resumed run against an uninterrupted one.
    return DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed + done),
    )


def _log_evaluation(
    name: str, step: int, steps: int, stats: dict[str, float], improved: bool, timer: EtaTimer | None
) -> None:
    """Log an evaluation's metrics; `` *`` marks a new best."""
    log.info(
        "%s step %d/%d %s%s (%.1fs%s)",
        name,
        step,
        steps,
        " ".join(
            f"{k}={v:.4g}" if k.startswith("lr") else f"{k}={v:.4f}"
            for k, v in stats.items()
            if k not in ("step", "seconds")
        ),
        " *" if improved else "",
        stats["seconds"],
        f", ETA {timer.eta()}" if timer is not None else "",
    )


@dataclass
class _Loop:
    """The training loop of one fit: its parts, its checkpoint, and whom it reports to."""

    trainer: _Trainer
    validation: _Validation
    rule: _StoppingRule
    phases: _Phases
    state: _LoopState
    steps: int
    name: str
    checkpoint: Path | None
    key: str
    on_eval: Callable[[dict[str, float]], None] | None
    timer: EtaTimer | None

    def resume(self, restored: dict[str, Any]) -> int:
        """Continue from a checkpoint: load it, replay its evaluations to ``on_eval``; return the steps it holds."""
        done = int(restored["step"])
        if done >= self.phases.head_steps:
            self.phases.unfreeze(self.trainer.model)
        self.trainer.load(restored)
        self.state = _LoopState(**restored["loop"])
        restore_rng(restored["rng"])
        log.info("%s: resuming after step %d from checkpoint %s", self.name, done, self.checkpoint)
        for restored_stats in self.state.history:
            if self.on_eval is not None:
                self.on_eval(restored_stats)
        if self.timer is not None:
            self.timer.step(self.steps if self.state.stopped_early else done)
        return done

    def run(self, train_set: Dataset[Any], done: int) -> None:
        """Train steps ``done + 1 .. steps``, evaluating every ``eval_every`` steps, until the end or an early stop."""
        config, model = self.trainer.config, self.trainer.model
        loader = _step_loader(train_set, config, self.steps, done)
        bar = _progress_bar(config, self.steps, done, self.name)
        redirect = logging_redirect_tqdm() if config.progress else contextlib.nullcontext()
        with bar, redirect:
            started = time.monotonic()
            tally, progress = _Tally(started), _Progress(bar, self.name, self.steps, self.phases, self.timer, started)
            _train_mode(model)
            for step, (x_cpu, y_cpu) in enumerate(loader, start=done + 1):
                fault_point("fit-step")
                if self.phases.fine_tuning_starts(step):
                    self.phases.unfreeze(model)
                    _train_mode(model)
                    self.state.stale = 0  # patience counts fine-tuning evaluations only
                loss, logits, y, used_lrs = self.trainer.step(x_cpu, y_cpu)
                tally.add(loss, logits, y)
                progress.show(step, tally.total_loss / tally.seen)
                if step % config.eval_every and step != self.steps:
                    continue
                stop = self._evaluate(step, tally, used_lrs)
                tally = _Tally(time.monotonic())
                if stop:
                    self._log_early_stop(step)
                    progress.skip_rest(step)
                    break

    def _evaluate(self, step: int, tally: _Tally, used_lrs: list[float]) -> bool:
        """Evaluate after ``step``: record, checkpoint, report and log it; return whether to stop early."""
        stats = tally.stats(step, used_lrs)
        stats.update(self.validation.metrics(self.trainer.model))
        stats["seconds"] = time.monotonic() - tally.started
        improved, stop = self.rule.record(self.state, stats, step, self.trainer.model)
        if self.checkpoint is not None:
            self._save(self.checkpoint, step)
        if self.on_eval is not None:
            self.on_eval(stats)
        if self.timer is not None:
            self.timer.step(tally.seen // self.trainer.config.batch_size)
        _log_evaluation(self.name, step, self.steps, stats, improved, self.timer)
        return stop

    def _save(self, path: Path, step: int) -> None:
        """Write the checkpoint of the loop after ``step`` to ``path``."""
        content = {"fingerprint": self.key, "step": step, **self.trainer.state_dicts()}
        content["loop"] = dict(vars(self.state))  # shallow: asdict would deep-copy the best weights
        content["rng"] = rng_state()
        write_checkpoint(path, content)

    def _log_early_stop(self, step: int) -> None:
        """Log why the run stops after ``step``."""
        log.info(
            "%s: early stop after step %d (no %s improvement in %d evaluations)",
            self.name,
            step,
            self.trainer.config.monitor,
            self.state.stale,
        )

    def result(self, resumed_from: int) -> FitResult:
        """Return the fit's result: the best weights loaded, the model in eval mode, frozen as ``trainable`` says."""
        model = self.trainer.model
        if self.state.best_state is not None:
            model.load_state_dict(self.state.best_state)
        # Back to the default layout: saved weights, ONNX export and Grad-CAM expect contiguous tensors.
        model.to(memory_format=torch.contiguous_format)
        self.phases.unfreeze(model)
        model.eval()
        return FitResult(
            model=model,
            history=self.state.history,
            best_step=self.state.best_step,
            stopped_early=self.state.stopped_early,
            resumed_from=resumed_from,
        )


def _optimizer(model: nn.Module, config: TrainConfig, arch: str | None, device: torch.device) -> torch.optim.Optimizer:
    if config.head_steps > 0 and arch is not None:
        groups: list[dict[str, Any]] = [
            g for g in param_groups(model, arch, config.trainable, config.lr, config.finetune_lr_factor) if g["params"]
        ]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # The fused kernel updates every parameter in one pass: measured 67 -> 38 ms per ResNet50 step on 2 CPU cores.
    fused = device.type in ("cpu", "cuda") and all(p.dtype.is_floating_point for g in groups for p in g["params"])
    return kind(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def fit(
    model: nn.Module,
    train_set: Dataset[Any],
    val_set: Dataset[Any] | None,
    config: TrainConfig,
    device: torch.device,
    steps: int,
    name: str,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    timer: EtaTimer | None = None,
    schedule_steps: int | None = None,
    *,
    arch: str | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    views: TestTimeViews | None = None,
) -> FitResult:
    """Train for ``steps`` optimiser steps with AdamW, a warm-up schedule, label smoothing and early stopping.

    The recipe (schedule, two-phase fine-tuning, class weights, mixed precision, channels_last, checkpoints,
    progress bar) follows ``config``; the module docstring says how each part works.

    Args:
        model: The network to train (moved to ``device``).
        train_set: Training items (augmented input tensor, class index).
        val_set: Early-stopping items (the tile tensor, at ``tile_size`` when ``views`` are given); without them
            every step runs and the last weights are kept.
        config: Learning rate, schedule, patience, monitor, batch size, seed and the recipe switches.
        device: Where to train.
        steps: Optimiser steps (at most; early stopping may end sooner).
        name: Label for progress lines and the progress bar, e.g. ``resnet50 fold 1/3``.
        on_eval: Called with each evaluation's metrics (``step`` first; for MLflow logging). After a resume it is
            first called with every restored evaluation, in order, so that a new tracking run gets the whole curve.
        timer: Shared ETA timer counting steps over the whole job.
        schedule_steps: Length of the learning-rate schedule (default ``steps``). The refit runs fewer steps
            than the folds did but must see the same learning rates, so it passes the folds' budget here.
        arch: The architecture (key of ``bonetumor.training.models.ARCHITECTURES``): needed for ``head_steps > 0``
            (which layers are the head) and used by ``channels_last: auto``.
        checkpoint_dir: Folder of this fit's checkpoint (one folder per fit, e.g. per fold); with
            ``config.checkpoint`` a checkpoint is written at every evaluation and a matching one is resumed.
        fingerprint: Identifies the data (and anything else outside ``config``) this fit trains on, e.g. a hash of
            the training and early-stopping tables. A checkpoint is resumed only if this, the train config
            (except device, workers, threads, progress), ``steps``, ``schedule_steps``, ``arch``, ``views`` and the
            model's parameter shapes all match.
        views: The test-time views the early-stopping set is predicted with (None: the model sees ``val_set``'s
            tensors as they are).

    Returns:
        The network with the best evaluation's weights, its history and the best step.

    Raises:
        ConfigError: ``head_steps > 0`` without ``arch``.
        DatasetError: An empty training set, or ``class_weighted_loss`` with labels outside the model's outputs.
    """
    head_steps = config.head_steps
    if head_steps > 0 and arch is None:
        raise ConfigError(
            f"train.head_steps={head_steps} (two-phase fine-tuning) needs to know the head: "
            "call fit(..., arch=<architecture>)"
        )
    schedule = schedule_steps or steps
    warmup = warmup_steps(config, schedule)
    phases = _Phases(head_steps, arch, config.trainable)
    trainer = _Trainer(model, train_set, config, device, arch, phases, schedule, warmup, name)
    validation = _Validation(val_set, config, device, views)
    rule = _StoppingRule(steps, warmup, head_steps, config.patience, config.monitor, val_set is not None)
    path = checkpoint_path(checkpoint_dir) if checkpoint_dir is not None and config.checkpoint else None
    key = fit_fingerprint(fingerprint, config, model, steps, schedule, arch, val_set is not None, views) if path else ""
    loop = _Loop(trainer, validation, rule, phases, _LoopState(), steps, name, path, key, on_eval, timer)
    restored = read_checkpoint(path, key, name) if path is not None else None
    resumed_from = loop.resume(restored) if restored is not None else 0
    # A checkpoint of a run that stopped early is a finished run: nothing left to train.
    loop.run(train_set, steps if loop.state.stopped_early else resumed_from)
    return loop.result(resumed_from)


def training_dataset(
    table: pd.DataFrame, config: Config, policy: AugmentPolicy, stain: StainNormalizer | None = None
) -> TileDataset:
    """Return the augmented training dataset of a training table (``file`` and ``label`` columns).

    Each tile is stain-normalised (``stain``, fitted on the training tiles) and resized to ``tile_size`` once and
    cached; every draw then takes a random ``input_size`` crop of it and the policy's other random steps.
    """
    return TileDataset(
        list(table["file"]),
        label_indices(table["label"], config.data.classes),
        build_train_transform(config.preprocess, policy, stain=stain),
        prepare=v2.Compose(tile_ops(config.preprocess.tile_size, stain)),
    )


def eval_dataset(
    files: Sequence[Path], labels: Sequence[str], config: Config, stain: StainNormalizer | None = None
) -> TileDataset:
    """Return a deterministic (un-augmented) dataset of whole tiles, preprocessed exactly as at serving time.

    Items are ``(3, tile_size, tile_size)`` tensors (:func:`bonetumor.transforms.preprocess.build_eval_transform`, with
    the deterministic part cached); predict them with the model's test-time views.
    """
    return TileDataset(
        list(files),
        label_indices(labels, config.data.classes),
        v2.Compose(tensor_tail(config.preprocess)),
        prepare=v2.Compose(tile_ops(config.preprocess.tile_size, stain)),
    )


def plot_history(histories: dict[str, list[dict[str, float]]], title: str, out_png: str | Path) -> Path:
    """Plot per fold and evaluation step the training loss, and the early-stopping set's loss and macro-F1.

    Without an early-stopping set (``train.inner_val_fraction: 0``) the right panel shows the learning rate of
    each step instead, so the figure still says how the run went.
    """
    fig = Figure(figsize=(10, 3.4))
    ax_loss, ax_right = fig.subplots(1, 2)
    with_val = any(history and "val_loss" in history[0] for history in histories.values())
    for name, history in histories.items():
        steps = [h["step"] for h in history]
        line = ax_loss.plot(steps, [h["train_loss"] for h in history], label=f"{name} train")[0]
        if history and "val_loss" in history[0]:
            ax_loss.plot(
                steps,
                [h["val_loss"] for h in history],
                "--",
                color=line.get_color(),
                label=f"{name} early-stopping set",
            )
            ax_right.plot(steps, [h["val_macro_f1"] for h in history], color=line.get_color(), label=name)
        elif not with_val:
            ax_right.plot(steps, [h["lr"] for h in history], color=line.get_color(), label=name)
    ax_loss.set(xlabel="optimiser step", ylabel="cross-entropy", title="loss (training: label-smoothed)")
    if with_val:
        ax_right.set(xlabel="optimiser step", ylabel="macro-F1", title="early-stopping set macro-F1", ylim=(0, 1.02))
    else:
        ax_right.set(
            xlabel="optimiser step",
            ylabel="learning rate",
            title="learning rate (no early-stopping set: every step runs)",
        )
    ax_loss.legend(fontsize=6)
    ax_right.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)
