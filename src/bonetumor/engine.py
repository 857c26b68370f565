"""The training engine: datasets, the fit loop with early stopping, and batched prediction.

Torch only (no MLflow): the train and register stages call it and do the tracking, and benchmarks and tests
can run it on any device without a tracking server.

The recipe of :func:`fit`, driven by ``Config.train``:

- Two-phase fine-tuning (``head_epochs > 0``, needs ``fit(..., arch=...)``): epochs ``1..head_epochs`` train the
  head only, at ``lr``; from epoch ``head_epochs + 1`` the layers that ``trainable`` names are unfrozen too and
  learn at ``lr * finetune_lr_factor`` while the head keeps ``lr`` (discriminative learning rates: the new head
  still has most to learn, the pretrained layers should only adapt). One Adam optimiser holds both groups from
  the start; frozen parameters get no gradient, so Adam leaves them (and their moments) untouched.
- Learning-rate schedule: ``cosine`` keeps the rates constant during the head phase and anneals both groups to 0
  over the fine-tuning epochs (``schedule_epochs - head_epochs``); a short head phase is a warm-up, and the
  annealing then covers the phase that changes the backbone. ``plateau`` halves the rates when the early-stopping
  loss stalls, counted in the fine-tuning phase only. Without two phases both are the usual schedules.
- Early stopping never stops in the head phase: patience counts fine-tuning epochs only (the best epoch may
  still be a head-phase epoch, if fine-tuning never beats it).
- Frozen BatchNorm layers (all their parameters frozen) stay in inference mode, so that a frozen layer is frozen
  entirely: its ImageNet running statistics are not drifted by the batches of the head phase.
- ``class_weighted_loss``: the training cross-entropy weights class ``c`` by ``N / (K * n_c)`` (see
  :func:`class_weights`); the reported ``val_loss`` stays the unweighted cross-entropy, comparable across runs.
- ``mixed_precision``: autocast on CUDA (bfloat16 where supported, else float16 with a gradient scaler); never on
  a CPU, where the same code runs with autocast and the scaler disabled.
- ``channels_last``: see :func:`channels_last_enabled`.
- Checkpoints (``checkpoint_dir`` given and ``checkpoint: true``): after every epoch the whole loop state is
  written atomically; a rerun with the same fingerprint resumes after the last finished epoch and ends exactly
  as an uninterrupted run would (on a CPU with ``num_workers: 0``; with loader workers the shuffling order is
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bonetumor.augment import AugmentPolicy, build_train_transform
from bonetumor.config import Config, TrainConfig
from bonetumor.datasets import TileDataset, label_indices
from bonetumor.errors import ConfigError, DatasetError
from bonetumor.metrics import macro_f1
from bonetumor.models import param_groups, set_trainable
from bonetumor.preprocess import build_eval_transform
from bonetumor.stain import StainNormalizer
from bonetumor.utils import EtaTimer

log = logging.getLogger(__name__)

#: Seconds between progress lines inside one epoch (long epochs on the full data set or on a CPU).
BATCH_LOG_SECONDS = 30.0
#: File name of the checkpoint inside ``checkpoint_dir``.
CHECKPOINT_FILE = "checkpoint.pt"
#: Bump when the checkpoint content changes; an older checkpoint is then ignored (training starts over).
CHECKPOINT_FORMAT = 1
#: Train settings that do not change what is computed, so changing them keeps a checkpoint valid.
_RESUME_NEUTRAL_FIELDS = frozenset({"architectures", "progress", "checkpoint", "num_workers", "num_threads", "device"})

#: Architectures whose CPU training step is faster in channels_last. Measured with
#: ``python -m benchmarks.train_throughput --archs resnet50 vgg19 vgg19_bn --sizes 128 --channels-last off on
#: --repeats 4`` (2 CPU threads shared with other jobs, torch 2.14.1, batch 16, 128 px), images/s off -> on:
#: bare step (forward, backward, Adam; median of 4 ABBA rounds, two runs): resnet50 16.9 -> 17.9 and
#: 14.1 -> 15.1 (+6%), vgg19 4.6 -> 5.7 and 4.2 -> 5.0 (+20%), vgg19_bn 4.1 -> 4.9 (+20%); whole fit loop:
#: resnet50 12.9 -> 18.8 and 13.0 -> 13.9, vgg19 4.2 -> 5.0 and 4.1 -> 4.8, vgg19_bn 3.5 -> 6.0. Faster for
#: every architecture, so ``auto`` is on for all three; an architecture added later stays off until measured.
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
    """A trained model (best epoch's weights loaded) and how training went.

    Attributes:
        model: The trained model, in eval mode and the default (contiguous) memory format.
        history: One dict of metrics per epoch run (restored epochs included).
        best_epoch: The 1-based epoch whose weights the model holds.
        stopped_early: Whether early stopping ended the run before ``epochs``.
        resumed_from: Epochs restored from a checkpoint instead of trained (0 = a fresh run).
    """

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from: int = 0


def _loader(
    dataset: Dataset[Any], config: TrainConfig, shuffle: bool, seed: int, generator: torch.Generator | None = None
) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        # A last training batch of one tile breaks batch norm where the feature map is 1x1 (small inputs);
        # dropping it loses one tile per epoch, a different one each time since the order is shuffled.
        drop_last=shuffle and len(dataset) > config.batch_size and len(dataset) % config.batch_size == 1,  # type: ignore[arg-type]
        num_workers=config.num_workers,
        generator=generator if generator is not None else torch.Generator().manual_seed(seed),
        persistent_workers=config.num_workers > 0,
    )


def _improved(stats: dict[str, float], best: dict[str, float] | None, monitor: str) -> bool:
    if best is None:
        return True
    if monitor == "val_loss":
        return stats["val_loss"] < best["val_loss"]
    # Macro-F1 on a small fold ties often; a lower validation loss breaks the tie.
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
def predict_logits(model: nn.Module, dataset: Dataset[Any], config: TrainConfig, device: torch.device) -> np.ndarray:
    """Return the model's logits for every item of ``dataset``, in order (N, classes).

    Inputs follow the model's memory format, and on CUDA ``mixed_precision`` autocasts as in training; the
    logits are always float32.
    """
    model.eval()
    memory_format = _memory_format(model)
    dtype = autocast_dtype(config, device)
    outputs = []
    for x, _ in _loader(dataset, config, shuffle=False, seed=0):
        with _autocast(device, dtype):
            outputs.append(model(_to_device(x, device, memory_format)).float().cpu())
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)


def lr_multiplier(epoch: int, scheduler: str, schedule_epochs: int, head_epochs: int = 0) -> float:
    """Return the factor on each group's base learning rate in (1-based) ``epoch`` for ``scheduler``.

    ``cosine``: 1 through the head phase, then ``(1 + cos(pi * t / T)) / 2`` with ``t`` the fine-tuning epochs
    already done and ``T = schedule_epochs - head_epochs`` (so the first fine-tuning epoch runs at the full
    rate). With ``head_epochs = 0`` this is torch's ``CosineAnnealingLR(T_max=schedule_epochs)``. ``plateau`` and
    ``none``: 1 (plateau lowers the rates itself).
    """
    if scheduler != "cosine" or epoch <= head_epochs:
        return 1.0
    span = max(schedule_epochs - head_epochs, 1)
    done = min(epoch - head_epochs - 1, span)
    return 0.5 * (1.0 + math.cos(math.pi * done / span))


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
    epochs: int,
    schedule_epochs: int,
    arch: str | None,
    has_val: bool,
) -> str:
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUME_NEUTRAL_FIELDS}
    shapes = [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "caller": fingerprint,
        "train": train,
        "epochs": epochs,
        "schedule_epochs": schedule_epochs,
        "arch": arch,
        "early_stopping_set": has_val,
        "model": shapes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [bit_generator, torch.from_numpy(np.asarray(key, dtype=np.int64)), pos, has_gauss, cached_gaussian],
        "python": random.getstate(),
        "loader": generator.get_state(),
    }


def _restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    bit_generator, key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, key.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    generator.set_state(state["loader"])


def _write_checkpoint(path: Path, content: dict[str, Any]) -> None:
    # Temporary file + rename: a run killed while writing leaves the previous checkpoint intact.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(content, handle)
            handle.flush()
            os.fsync(handle.fileno())
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
    best_epoch: int = 0
    stale: int = 0
    stopped_early: bool = False


def fit(
    model: nn.Module,
    train_set: Dataset[Any],
    val_set: Dataset[Any] | None,
    config: TrainConfig,
    device: torch.device,
    epochs: int,
    name: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    timer: EtaTimer | None = None,
    schedule_epochs: int | None = None,
    *,
    arch: str | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
) -> FitResult:
    """Train with Adam, a learning-rate schedule, cross-entropy and (given a validation set) early stopping.

    The recipe (two-phase fine-tuning, class weights, mixed precision, channels_last, checkpoints, progress bar)
    follows ``config``; the module docstring says how each part works.

    Args:
        model: The model to train (moved to ``device``).
        train_set: Training items (tensor, class index).
        val_set: Validation (early-stopping) items; without them every epoch runs and the last one is kept.
        config: Learning rate, schedule, patience, monitor, batch size, seed and the recipe switches.
        device: Where to train.
        epochs: Maximum number of epochs.
        name: Label for progress lines and the progress bar, e.g. ``resnet50 fold 1/3``.
        on_epoch: Called with each epoch's metrics (for MLflow logging). After a resume it is first called with
            every restored epoch, in order, so that a new tracking run gets the whole curve.
        timer: Shared ETA timer counting epochs over the whole job.
        schedule_epochs: Length of the learning-rate schedule (default ``epochs``). The refit runs fewer epochs
            than the folds did but must see the same learning rates, so it passes the folds' epoch budget here.
        arch: The architecture (key of ``bonetumor.models.ARCHITECTURES``): needed for ``head_epochs > 0`` (which
            layers are the head) and used by ``channels_last: auto``.
        checkpoint_dir: Folder of this fit's checkpoint (one folder per fit, e.g. per fold); with
            ``config.checkpoint`` a checkpoint is written after every epoch and a matching one is resumed.
        fingerprint: Identifies the data (and anything else outside ``config``) this fit trains on, e.g. a hash of
            the training and early-stopping tables. A checkpoint is resumed only if this, the train config
            (except device, workers, threads, progress), ``epochs``, ``schedule_epochs``, ``arch`` and the model's
            parameter shapes all match.

    Returns:
        The model with the best epoch's weights, its history and the best epoch (1-based).

    Raises:
        ConfigError: ``head_epochs > 0`` without ``arch``.
        DatasetError: ``class_weighted_loss`` with labels outside the model's outputs.
    """
    head_epochs = config.head_epochs
    if head_epochs > 0 and arch is None:
        raise ConfigError(
            f"train.head_epochs={head_epochs} (two-phase fine-tuning) needs to know the head: "
            "call fit(..., arch=<architecture>)"
        )
    schedule = schedule_epochs or epochs
    model.to(device)
    memory_format = (
        torch.channels_last if channels_last_enabled(config.channels_last, device, arch) else torch.contiguous_format
    )
    model.to(memory_format=memory_format)

    if head_epochs > 0 and arch is not None:
        groups = [
            g for g in param_groups(model, arch, config.trainable, config.lr, config.finetune_lr_factor) if g["params"]
        ]
        optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler: Any = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step + 1, "cosine", schedule, head_epochs)
        )
    elif config.scheduler == "plateau" and val_set is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
    dtype = autocast_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    weights: torch.Tensor | None = None
    train_labels = dataset_labels(train_set) if config.class_weighted_loss else None
    val_criterion = nn.CrossEntropyLoss()
    val_targets = torch.from_numpy(dataset_labels(val_set)) if val_set is not None else None
    generator = torch.Generator().manual_seed(config.seed)
    loader = _loader(train_set, config, shuffle=True, seed=config.seed, generator=generator)

    state = _LoopState()
    result = FitResult(model=model)
    path = checkpoint_path(checkpoint_dir) if checkpoint_dir is not None and config.checkpoint else None
    key = _fingerprint(fingerprint, config, model, epochs, schedule, arch, val_set is not None) if path else ""
    restored = _read_checkpoint(path, key, name) if path is not None else None
    first_epoch = 1
    if restored is not None:
        model.load_state_dict(restored["model"])
        optimizer.load_state_dict(restored["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(restored["scheduler"])
        if restored["scaler"]:  # empty when the scaler was off (CPU, bfloat16): a fresh scaler is then right
            scaler.load_state_dict(restored["scaler"])
        state = _LoopState(**restored["loop"])
        _restore_rng(restored["rng"], generator)
        first_epoch = int(restored["epoch"]) + 1
        result.resumed_from = int(restored["epoch"])
        log.info("%s: resuming after epoch %d from checkpoint %s", name, result.resumed_from, path)
        for restored_stats in state.history:
            if on_epoch is not None:
                on_epoch(restored_stats)
        if timer is not None:
            timer.step(epochs if state.stopped_early else result.resumed_from)
        if state.stopped_early:
            first_epoch = epochs + 1  # finished run: nothing left to train

    bar = tqdm(
        total=epochs * len(loader),
        initial=(first_epoch - 1) * len(loader) if first_epoch <= epochs else epochs * len(loader),
        desc=name,
        unit="batch",
        file=sys.stderr,
        disable=not config.progress,
        dynamic_ncols=True,
    )
    redirect = logging_redirect_tqdm() if config.progress else contextlib.nullcontext()
    with bar, redirect:
        for epoch in range(first_epoch, epochs + 1):
            started = time.monotonic()
            if head_epochs > 0 and arch is not None:
                set_trainable(model, arch, "head" if epoch <= head_epochs else config.trainable)
                if epoch == head_epochs + 1:
                    state.stale = 0  # patience counts fine-tuning epochs only
            _train_mode(model)
            phase = "head" if epoch <= head_epochs else "fine-tune" if head_epochs else ""
            total_loss, correct, seen, last_log = 0.0, 0, 0, started
            for batch, (x_cpu, y_cpu) in enumerate(loader, start=1):
                x, y = _to_device(x_cpu, device, memory_format), y_cpu.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    logits = model(x)
                    if train_labels is not None and weights is None:
                        weights = class_weights(train_labels, logits.shape[1]).to(device)
                        log.info("%s: class weights %s", name, [round(float(w), 4) for w in weights])
                    loss = nn.functional.cross_entropy(logits.float(), y, weight=weights)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total_loss += loss.item() * y.numel()
                correct += int((logits.argmax(1) == y).sum())
                seen += y.numel()
                bar.update()
                bar.set_postfix_str(
                    f"epoch {epoch}/{epochs}{' ' + phase if phase else ''} loss {total_loss / seen:.4f}"
                    + (f" job ETA {timer.eta()}" if timer is not None else ""),
                    refresh=False,
                )
                if time.monotonic() - last_log > BATCH_LOG_SECONDS:
                    last_log = time.monotonic()
                    log.info(
                        "%s epoch %d/%d batch %d/%d loss=%.4f",
                        name,
                        epoch,
                        epochs,
                        batch,
                        len(loader),
                        total_loss / seen,
                    )
            stats: dict[str, float] = {
                "epoch": epoch,
                "train_loss": total_loss / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "lr": optimizer.param_groups[0]["lr"],
            }
            if len(optimizer.param_groups) > 1:
                stats["lr_backbone"] = optimizer.param_groups[1]["lr"]
            if val_set is not None and val_targets is not None:
                logits_val = torch.from_numpy(predict_logits(model, val_set, config, device))
                targets = val_targets
                stats["val_loss"] = float(val_criterion(logits_val, targets))
                predictions = logits_val.argmax(1)
                stats["val_accuracy"] = float((predictions == targets).float().mean())
                stats["val_macro_f1"] = macro_f1(targets.numpy(), predictions.numpy())
            stats["seconds"] = time.monotonic() - started
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if epoch > head_epochs:
                    scheduler.step(stats["val_loss"])
            elif scheduler is not None:
                scheduler.step()
            state.history.append(stats)
            improved = val_set is None or _improved(stats, state.best, config.monitor)
            if improved:
                state.best, state.stale, state.best_epoch = stats, 0, epoch
                if val_set is not None:  # without validation the last epoch is kept: nothing to restore
                    state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                state.stale += 1
            stop = val_set is not None and epoch > head_epochs and state.stale >= config.patience and epoch < epochs
            state.stopped_early = stop
            if path is not None:
                _write_checkpoint(
                    path,
                    {
                        "fingerprint": key,
                        "epoch": epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "scaler": scaler.state_dict(),
                        "loop": dict(vars(state)),  # shallow: asdict would deep-copy the best weights
                        "rng": _rng_state(generator),
                    },
                )
            if on_epoch is not None:
                on_epoch(stats)
            if timer is not None:
                timer.step()
            log.info(
                "%s epoch %d/%d %s%s (%.1fs%s)",
                name,
                epoch,
                epochs,
                " ".join(
                    f"{k}={v:.4g}" if k.startswith("lr") else f"{k}={v:.4f}"
                    for k, v in stats.items()
                    if k not in ("epoch", "seconds")
                ),
                " *" if improved else "",
                stats["seconds"],
                f", ETA {timer.eta()}" if timer is not None else "",
            )
            if stop:
                log.info(
                    "%s: early stop after epoch %d (no %s improvement for %d epochs)",
                    name,
                    epoch,
                    config.monitor,
                    state.stale,
                )
                if timer is not None:
                    timer.step(epochs - epoch)
                bar.update(bar.total - bar.n)
                break
    result.history = state.history
    result.best_epoch = state.best_epoch
    result.stopped_early = state.stopped_early
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    # Back to the default layout: saved weights, ONNX export and Grad-CAM expect contiguous tensors.
    model.to(memory_format=torch.contiguous_format)
    if head_epochs > 0 and arch is not None:
        set_trainable(model, arch, config.trainable)
    model.eval()
    return result


def training_dataset(
    table: pd.DataFrame, config: Config, policy: AugmentPolicy, stain: StainNormalizer | None = None
) -> TileDataset:
    """Return the augmented training dataset of a training table (``file`` and ``label`` columns).

    ``stain`` is the normaliser fitted on the training tiles, applied before augmentation.
    """
    transform = build_train_transform(config.preprocess, policy, stain=stain)
    return TileDataset(list(table["file"]), label_indices(table["label"], config.data.classes), transform)


def eval_dataset(
    files: Sequence[Path], labels: Sequence[str], config: Config, stain: StainNormalizer | None = None
) -> TileDataset:
    """Return a deterministic (un-augmented) dataset, preprocessed exactly as at serving time."""
    transform = build_eval_transform(config.preprocess, stain=stain)
    return TileDataset(list(files), label_indices(labels, config.data.classes), transform)


def plot_history(histories: dict[str, list[dict[str, float]]], title: str, out_png: str | Path) -> Path:
    """Plot per fold and epoch the training loss, and the loss and macro-F1 of the early-stopping set."""
    fig = Figure(figsize=(10, 3.4))
    ax_loss, ax_f1 = fig.subplots(1, 2)
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        line = ax_loss.plot(epochs, [h["train_loss"] for h in history], label=f"{name} train")[0]
        if history and "val_loss" in history[0]:
            ax_loss.plot(
                epochs,
                [h["val_loss"] for h in history],
                "--",
                color=line.get_color(),
                label=f"{name} early-stopping set",
            )
            ax_f1.plot(epochs, [h["val_macro_f1"] for h in history], color=line.get_color(), label=name)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_f1.set(xlabel="epoch", ylabel="macro-F1", title="early-stopping set macro-F1", ylim=(0, 1.02))
    ax_loss.legend(fontsize=6)
    ax_f1.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)
