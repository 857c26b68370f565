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
  restored but the workers' augmentation draws are not).
- Progress: a tqdm bar on stderr per fit (``progress: true``) besides the log lines.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from bonetumor.training.models import param_groups, set_trainable
from bonetumor.transforms.augment import AugmentPolicy, build_train_transform
from bonetumor.transforms.preprocess import tensor_tail, tile_ops
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import TestTimeViews, with_views
from bonetumor.utils import EtaTimer

log = logging.getLogger(__name__)

#: Seconds between progress lines inside one evaluation round (long rounds on the full data set or on a CPU).
BATCH_LOG_SECONDS = 30.0
#: File name of the checkpoint inside ``checkpoint_dir``.
CHECKPOINT_FILE = "checkpoint.pt"
#: Bump when the checkpoint content changes; an older checkpoint is then ignored (training starts over).
CHECKPOINT_FORMAT = 2
#: Train settings that do not change what is computed, so changing them keeps a checkpoint valid.
_RESUME_NEUTRAL_FIELDS = frozenset(
    {"architectures", "per_arch", "progress", "checkpoint", "num_workers", "num_threads", "device"}
)
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


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    """Return the checkpoint file :func:`fit` writes into ``checkpoint_dir``."""
    return Path(checkpoint_dir) / CHECKPOINT_FILE


def clear_checkpoint(checkpoint_dir: str | Path) -> None:
    """Delete the checkpoint of a finished fit (and ``checkpoint_dir`` when that leaves it empty)."""
    path = checkpoint_path(checkpoint_dir)
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (other files) or already gone: leave it
        path.parent.rmdir()


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


def _fingerprint(
    fingerprint: str,
    config: TrainConfig,
    model: nn.Module,
    steps: int,
    schedule_steps: int,
    arch: str | None,
    has_val: bool,
    views: TestTimeViews | None,
) -> str:
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUME_NEUTRAL_FIELDS}
    shapes = [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "caller": fingerprint,
        "train": train,
        "steps": steps,
        "schedule_steps": schedule_steps,
        "arch": arch,
        "early_stopping_set": has_val,
        "views": None if views is None else views.to_dict(),
        "model": shapes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _rng_state() -> dict[str, Any]:
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [bit_generator, torch.from_numpy(np.asarray(key, dtype=np.int64)), pos, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    bit_generator, key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, key.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _write_checkpoint(path: Path, content: dict[str, Any]) -> None:
    # Temporary file + rename: a run killed while writing leaves the previous checkpoint intact. No fsync: it
    # tripled the cost of a write (1 s of every evaluation of a ResNet50 on 2 cores), and what it guards against,
    # a power cut between write and flush, leaves an unreadable checkpoint that the next run detects and replaces.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(content, handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_checkpoint(path: Path, fingerprint: str, name: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        log.warning("%s: cannot read checkpoint %s (%s); training from scratch and overwriting it", name, path, exc)
        return None
    if not isinstance(content, dict) or content.get("fingerprint") != fingerprint:
        log.warning(
            "%s: checkpoint %s belongs to another config, data set or model (fingerprint differs); "
            "training from scratch and overwriting it",
            name,
            path,
        )
        return None
    return content


@dataclass
class _LoopState:
    """Everything of the loop besides model, optimiser and RNGs that a checkpoint must restore."""

    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_step: int = 0
    stale: int = 0
    stopped_early: bool = False


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
    model.to(device)
    memory_format = (
        torch.channels_last if channels_last_enabled(config.channels_last, device, arch) else torch.contiguous_format
    )
    model.to(memory_format=memory_format)
    if head_steps > 0 and arch is not None:
        set_trainable(model, arch, "head")
    optimizer = _optimizer(model, config, arch, device)
    scheduler = make_scheduler(optimizer, config.scheduler, schedule, warmup)
    dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    weights: torch.Tensor | None = None
    train_labels = dataset_labels(train_set) if config.class_weighted_loss else None
    val_criterion = nn.CrossEntropyLoss()
    val_targets = torch.from_numpy(dataset_labels(val_set)) if val_set is not None else None

    state = _LoopState()
    result = FitResult(model=model)
    path = checkpoint_path(checkpoint_dir) if checkpoint_dir is not None and config.checkpoint else None
    key = _fingerprint(fingerprint, config, model, steps, schedule, arch, val_set is not None, views) if path else ""
    restored = _read_checkpoint(path, key, name) if path is not None else None
    done = 0
    if restored is not None:
        done = int(restored["step"])
        if head_steps > 0 and arch is not None and done >= head_steps:
            set_trainable(model, arch, config.trainable)
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        scheduler.load_state_dict(restored["scheduler"])
        if restored["scaler"]:  # empty when the scaler was off (CPU, bfloat16): a fresh scaler is then right
            scaler.load_state_dict(restored["scaler"])
        state = _LoopState(**restored["loop"])
        _restore_rng(restored["rng"])
        result.resumed_from = done
        log.info("%s: resuming after step %d from checkpoint %s", name, done, path)
        for restored_stats in state.history:
            if on_eval is not None:
                on_eval(restored_stats)
        if timer is not None:
            timer.step(steps if state.stopped_early else done)
        if state.stopped_early:
            done = steps  # finished run: nothing left to train

    size = len(train_set)  # type: ignore[arg-type]
    sampler = StepBatchSampler(size, config.batch_size, steps, config.seed, start=done)
    # Its own generator: starting to iterate draws a worker seed from it, which from the global generator would
    # shift every augmentation draw of a resumed run against an uninterrupted one.
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed + done),
    )
    bar = tqdm(
        total=steps,
        initial=done,
        desc=name,
        unit="step",
        file=sys.stderr,
        disable=not config.progress,
        dynamic_ncols=True,
    )
    redirect = logging_redirect_tqdm() if config.progress else contextlib.nullcontext()
    with bar, redirect:
        started = last_log = time.monotonic()
        total_loss, correct, seen = 0.0, 0, 0
        _train_mode(model)
        for step, (x_cpu, y_cpu) in enumerate(loader, start=done + 1):
            if head_steps > 0 and arch is not None and step == head_steps + 1:
                set_trainable(model, arch, config.trainable)
                _train_mode(model)
                state.stale = 0  # patience counts fine-tuning evaluations only
            x, y = _to_device(x_cpu, device, memory_format), y_cpu.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                logits = model(x)
                if train_labels is not None and weights is None:  # the model's output size counts the classes
                    weights = class_weights(train_labels, logits.shape[1]).to(device)
                    log.info("%s: class weights %s", name, [round(float(w), 4) for w in weights])
                loss = nn.functional.cross_entropy(
                    logits.float(), y, weight=weights, label_smoothing=config.label_smoothing
                )
            scaler.scale(loss).backward()
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)  # clip the true gradients, not the float16-scaled ones
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            used_lrs = [group["lr"] for group in optimizer.param_groups]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total_loss += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            bar.update()
            phase = "" if head_steps == 0 else " head" if step <= head_steps else " fine-tune"
            bar.set_postfix_str(
                f"step {step}/{steps}{phase} loss {total_loss / seen:.4f}"
                + (f" job ETA {timer.eta()}" if timer is not None else ""),
                refresh=False,
            )
            if time.monotonic() - last_log > BATCH_LOG_SECONDS:
                last_log = time.monotonic()
                log.info("%s step %d/%d loss=%.4f", name, step, steps, total_loss / seen)
            if step % config.eval_every and step != steps:
                continue
            stats: dict[str, float] = {
                "step": step,
                "train_loss": total_loss / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "lr": used_lrs[0],  # the rate this step was taken at
            }
            if len(used_lrs) > 1:
                stats["lr_backbone"] = used_lrs[1]
            if val_set is not None and val_targets is not None:
                logits_val = torch.from_numpy(predict_logits(model, val_set, config, device, views))
                stats["val_loss"] = float(val_criterion(logits_val, val_targets))
                predictions = logits_val.argmax(1)
                stats["val_accuracy"] = float((predictions == val_targets).float().mean())
                stats["val_macro_f1"] = macro_f1(val_targets.numpy(), predictions.numpy())
                _train_mode(model)
            stats["seconds"] = time.monotonic() - started
            state.history.append(stats)
            # An evaluation inside the warm-up is logged but never chosen: weights taken at a still-rising rate
            # are no model to keep, and a 5-tile early-stopping set would pick one by luck.
            eligible = step > warmup or step == steps
            improved = eligible and (val_set is None or _improved(stats, state.best, config.monitor))
            if improved:
                state.best, state.stale, state.best_step = stats, 0, step
                if val_set is not None:  # without validation the last step is kept: nothing to restore
                    state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            elif eligible:
                state.stale += 1
            stop = (
                val_set is not None
                and step > max(head_steps, warmup)
                and state.stale >= config.patience
                and step < steps
            )
            state.stopped_early = stop
            if path is not None:
                _write_checkpoint(
                    path,
                    {
                        "fingerprint": key,
                        "step": step,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "loop": dict(vars(state)),  # shallow: asdict would deep-copy the best weights
                        "rng": _rng_state(),
                    },
                )
            if on_eval is not None:
                on_eval(stats)
            if timer is not None:
                timer.step(seen // config.batch_size)
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
            started, total_loss, correct, seen = time.monotonic(), 0.0, 0, 0
            if stop:
                log.info(
                    "%s: early stop after step %d (no %s improvement in %d evaluations)",
                    name,
                    step,
                    config.monitor,
                    state.stale,
                )
                if timer is not None:
                    timer.step(steps - step)
                bar.update(bar.total - bar.n)
                break
    result.history = state.history
    result.best_step = state.best_step
    result.stopped_early = state.stopped_early
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    # Back to the default layout: saved weights, ONNX export and Grad-CAM expect contiguous tensors.
    model.to(memory_format=torch.contiguous_format)
    if head_steps > 0 and arch is not None:
        set_trainable(model, arch, config.trainable)
    model.eval()
    return result


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
