"""The training engine: datasets, the fit loop with early stopping, and batched prediction.

Torch only (no MLflow): the train and register stages call it and do the tracking, and benchmarks and tests
can run it on any device without a tracking server.
"""

from __future__ import annotations

import copy
import logging
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
from torch.utils.data import DataLoader, Dataset

from bonetumor.augment import AugmentPolicy, build_train_transform
from bonetumor.config import Config, TrainConfig
from bonetumor.datasets import TileDataset, label_indices
from bonetumor.errors import ConfigError
from bonetumor.metrics import macro_f1
from bonetumor.preprocess import build_eval_transform
from bonetumor.utils import EtaTimer

log = logging.getLogger(__name__)

#: Seconds between progress lines inside one epoch (long epochs on the full data set or on a CPU).
BATCH_LOG_SECONDS = 30.0


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


@dataclass
class FitResult:
    """A trained model (best epoch's weights loaded) and how training went."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False


def _loader(dataset: Dataset[Any], config: TrainConfig, shuffle: bool, seed: int) -> DataLoader[Any]:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(seed),
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


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset[Any], config: TrainConfig, device: torch.device) -> np.ndarray:
    """Return the model's logits for every item of ``dataset``, in order (N, classes)."""
    model.eval()
    outputs = [model(x.to(device)).float().cpu() for x, _ in _loader(dataset, config, shuffle=False, seed=0)]
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), dtype=np.float32)


def fit(
    model: nn.Module,
    train_set: Dataset[Any],
    val_set: TileDataset | None,
    config: TrainConfig,
    device: torch.device,
    epochs: int,
    name: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    timer: EtaTimer | None = None,
    schedule_epochs: int | None = None,
) -> FitResult:
    """Train with Adam, a learning-rate schedule, cross-entropy and (given a validation set) early stopping.

    Args:
        model: The model to train (moved to ``device``).
        train_set: Training items (tensor, class index).
        val_set: Validation items; without them every epoch runs and the last one is kept.
        config: Learning rate, schedule, patience, monitor, batch size, seed.
        device: Where to train.
        epochs: Maximum number of epochs.
        name: Label for progress lines, e.g. ``resnet50 fold 1/3``.
        on_epoch: Called with each epoch's metrics (for MLflow logging).
        timer: Shared ETA timer counting epochs over the whole job.
        schedule_epochs: Length of the cosine schedule (default ``epochs``). The refit runs fewer epochs than
            the folds did but must see the same learning rates, so it passes the folds' epoch budget here.

    Returns:
        The model with the best epoch's weights, its history and the best epoch (1-based).
    """
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler: Any = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule_epochs or epochs)
    elif config.scheduler == "plateau" and val_set is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=1)
    criterion = nn.CrossEntropyLoss()
    loader = _loader(train_set, config, shuffle=True, seed=config.seed)
    result = FitResult(model=model)
    best: dict[str, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale = 0
    for epoch in range(1, epochs + 1):
        started = time.monotonic()
        model.train()
        total_loss, correct, seen, last_log = 0.0, 0, 0, started
        for batch, (x, y) in enumerate(loader, start=1):
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = criterion(logits, y)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            seen += y.numel()
            if time.monotonic() - last_log > BATCH_LOG_SECONDS:
                last_log = time.monotonic()
                log.info(
                    "%s epoch %d/%d batch %d/%d loss=%.4f", name, epoch, epochs, batch, len(loader), total_loss / seen
                )
        stats: dict[str, float] = {
            "epoch": epoch,
            "train_loss": total_loss / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if val_set is not None:
            logits_val = torch.from_numpy(predict_logits(model, val_set, config, device))
            targets = torch.tensor(val_set.labels)
            stats["val_loss"] = float(criterion(logits_val, targets))
            predictions = logits_val.argmax(1)
            stats["val_accuracy"] = float((predictions == targets).float().mean())
            stats["val_macro_f1"] = macro_f1(targets.numpy(), predictions.numpy())
        stats["seconds"] = time.monotonic() - started
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(stats["val_loss"])
        elif scheduler is not None:
            scheduler.step()
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if timer is not None:
            timer.step()
        improved = val_set is None or _improved(stats, best, config.monitor)
        if improved:
            best, stale = stats, 0
            result.best_epoch = epoch
            if val_set is not None:  # without validation the last epoch is kept: nothing to restore
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
        log.info(
            "%s epoch %d/%d %s%s (%.1fs%s)",
            name,
            epoch,
            epochs,
            " ".join(f"{k}={v:.4f}" for k, v in stats.items() if k not in ("epoch", "seconds")),
            " *" if improved else "",
            stats["seconds"],
            f", ETA {timer.eta()}" if timer is not None else "",
        )
        if val_set is not None and stale >= config.patience and epoch < epochs:
            log.info(
                "%s: early stop after epoch %d (no %s improvement for %d epochs)", name, epoch, config.monitor, stale
            )
            result.stopped_early = True
            if timer is not None:
                timer.step(epochs - epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def training_dataset(table: pd.DataFrame, config: Config, policy: AugmentPolicy) -> TileDataset:
    """Return the augmented training dataset of a training table (``file`` and ``label`` columns)."""
    transform = build_train_transform(config.preprocess, policy)
    return TileDataset(list(table["file"]), label_indices(table["label"], config.data.classes), transform)


def eval_dataset(files: Sequence[Path], labels: Sequence[str], config: Config) -> TileDataset:
    """Return a deterministic (un-augmented) dataset, preprocessed exactly as at serving time."""
    return TileDataset(list(files), label_indices(labels, config.data.classes), build_eval_transform(config.preprocess))


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
