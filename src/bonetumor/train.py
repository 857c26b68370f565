"""Train: every architecture on every fold, with early stopping, tracked in MLflow.

Per architecture, one parent MLflow run holds the cross-validation; each fold is a nested run with per-epoch
metrics. The best epoch of each fold (by ``train.monitor``) gives the out-of-fold predictions that evaluation
scores, and the median best epoch sets the length of the final refit on all tiles (see ``register``).
"""

from __future__ import annotations

import copy
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bonetumor.augment import AugmentPolicy, build_train_transform, load_policy
from bonetumor.config import Config, TrainConfig, save_resolved
from bonetumor.datasets import TileDataset, label_indices, load_training_table, split_tables
from bonetumor.errors import ConfigError
from bonetumor.manifest import read_manifest, resolve_paths
from bonetumor.metrics import macro_f1
from bonetumor.models import build_model
from bonetumor.preprocess import build_eval_transform
from bonetumor.split import read_folds
from bonetumor.tracking import flatten_params, provenance_tags, setup_mlflow
from bonetumor.utils import EtaTimer, atomic_dir, seed_everything, write_json

log = logging.getLogger(__name__)

#: Seconds between progress lines inside one epoch (long epochs on the full data set or on a CPU).
BATCH_LOG_SECONDS = 30.0
RUNS_FILE = "runs.json"
TRAIN_SECTIONS = ("data", "preprocess", "split", "augment", "balance", "train")


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

    Returns:
        The model with the best epoch's weights, its history and the best epoch (1-based).
    """
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler: Any = None
    if config.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
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
        if scheduler is not None:
            scheduler.step(stats["val_loss"]) if config.scheduler == "plateau" else scheduler.step()
        result.history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if timer is not None:
            timer.step()
        improved = val_set is None or _improved(stats, best, config.monitor)
        if improved:
            best, stale = stats, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            result.best_epoch = epoch
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
    """Plot training and validation loss and validation macro-F1 per epoch for each fold."""
    fig = Figure(figsize=(10, 3.4))
    ax_loss, ax_f1 = fig.subplots(1, 2)
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        line = ax_loss.plot(epochs, [h["train_loss"] for h in history], label=f"{name} train")[0]
        if history and "val_loss" in history[0]:
            ax_loss.plot(epochs, [h["val_loss"] for h in history], "--", color=line.get_color(), label=f"{name} val")
            ax_f1.plot(epochs, [h["val_macro_f1"] for h in history], color=line.get_color(), label=name)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_f1.set(xlabel="epoch", ylabel="macro-F1", title="validation macro-F1", ylim=(0, 1.02))
    ax_loss.legend(fontsize=6)
    ax_f1.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


def run_cross_validation(
    config: Config,
    manifest_path: str | Path,
    folds_path: str | Path,
    policy_path: str | Path,
    balance_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path,
) -> dict[str, Any]:
    """Train every architecture on every fold and write out-of-fold predictions.

    Args:
        config: The whole config (train, preprocess, data, tracking sections are used).
        manifest_path: The data set manifest.
        folds_path: The folds file from the split stage.
        policy_path: The augmentation policy from the augment stage.
        balance_dir: The balance stage's output (one training manifest per fold).
        out_dir: Output folder: ``<arch>/oof.csv``, ``<arch>/history.json``, ``<arch>/learning_curves.png``
            and ``runs.json`` (MLflow run ids for the evaluate and register stages).
        project_dir: Base folder for relative tracking URIs and the git commit.

    Returns:
        The content of ``runs.json``.
    """
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    dataset_dir = manifest_path.parent
    folds = read_folds(folds_path, manifest)
    policy = load_policy(policy_path)
    device = select_device(config.train.device)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    experiment_id = setup_mlflow(config.tracking, project_dir)
    tags = provenance_tags(config, manifest_path, project_dir)
    n_folds = len(folds["folds"])
    timer = EtaTimer(len(config.train.architectures) * n_folds * config.train.epochs)
    log.info(
        "training %s on %d folds (up to %d epochs each) on %s; policy %s",
        list(config.train.architectures),
        n_folds,
        config.train.epochs,
        device,
        policy.digest(),
    )
    runs: dict[str, Any] = {
        "experiment_id": experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
        "architectures": {},
    }
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, TRAIN_SECTIONS)
        for arch in config.train.architectures:
            runs["architectures"][arch] = _cross_validate_arch(
                arch,
                config,
                manifest,
                dataset_dir,
                folds,
                policy,
                Path(balance_dir),
                tmp / arch,
                device,
                tags,
                timer,
                [tmp / "config.resolved.yaml", Path(policy_path)],
            )
        write_json(tmp / RUNS_FILE, runs)
    log.info("cross-validation finished in %.0fs", timer.elapsed)
    return runs


def _cross_validate_arch(
    arch: str,
    config: Config,
    manifest: pd.DataFrame,
    dataset_dir: Path,
    folds: dict[str, Any],
    policy: AugmentPolicy,
    balance_dir: Path,
    out_dir: Path,
    device: torch.device,
    tags: dict[str, str],
    timer: EtaTimer,
    artifacts: Sequence[Path],
) -> dict[str, Any]:
    classes = config.data.classes
    out_dir.mkdir(parents=True, exist_ok=True)
    n_folds = len(folds["folds"])
    oof_parts: list[pd.DataFrame] = []
    histories: dict[str, list[dict[str, float]]] = {}
    fold_runs: list[dict[str, Any]] = []
    with mlflow.start_run(
        run_name=f"cv-{arch}", tags={**tags, "bonetumor.stage": "train", "bonetumor.arch": arch}
    ) as parent:
        mlflow.log_params(
            {**flatten_params(config, TRAIN_SECTIONS), "arch": arch, "augment.policy_digest": policy.digest()}
        )
        for artifact in artifacts:
            if artifact.is_file():
                mlflow.log_artifact(str(artifact))
        for fold_info in folds["folds"]:
            k = int(fold_info["fold"])
            name = f"{arch} fold {k + 1}/{n_folds}"
            _, val_rows = split_tables(manifest, folds, k)
            train_table = load_training_table(balance_dir, f"fold-{k}", dataset_dir)
            val_files = resolve_paths(val_rows, dataset_dir)
            train_set = training_dataset(train_table, config, policy)
            val_set = eval_dataset(val_files, list(val_rows["label"]), config)
            seed_everything(config.train.seed + k)
            model = build_model(arch, len(classes), config.train.dropout, config.train.weights, config.train.trainable)
            with mlflow.start_run(
                run_name=f"cv-{arch}-fold{k}", nested=True, tags={**tags, "bonetumor.fold": str(k)}
            ) as run:
                mlflow.log_params(
                    {
                        "fold": k,
                        "n_train_real": int((~train_table["synthetic"]).sum()),
                        "n_train_synthetic": int(train_table["synthetic"].sum()),
                        "n_val": len(val_rows),
                        "val_groups": ",".join(fold_info["val_groups"])[:6000],
                    }
                )

                def log_epoch(stats: dict[str, float]) -> None:
                    mlflow.log_metrics({k2: v for k2, v in stats.items() if k2 != "epoch"}, step=int(stats["epoch"]))

                result = fit(
                    model, train_set, val_set, config.train, device, config.train.epochs, name, log_epoch, timer
                )
                logits = predict_logits(result.model, val_set, config.train, device)
                best = result.history[result.best_epoch - 1]
                mlflow.log_metrics(
                    {
                        "best_epoch": result.best_epoch,
                        "best_val_macro_f1": best["val_macro_f1"],
                        "best_val_loss": best["val_loss"],
                        "best_val_accuracy": best["val_accuracy"],
                    }
                )
            fold_runs.append(
                {
                    "fold": k,
                    "run_id": run.info.run_id,
                    "best_epoch": result.best_epoch,
                    "stopped_early": result.stopped_early,
                }
            )
            histories[f"fold {k}"] = result.history
            oof_parts.append(_oof_frame(val_rows, k, logits, classes))
        oof = pd.concat(oof_parts).sort_values("path").reset_index(drop=True)
        oof.to_csv(out_dir / "oof.csv", index=False)
        write_json(out_dir / "history.json", {"folds": fold_runs, "history": histories})
        curves = plot_history(histories, f"{arch}: {n_folds}-fold cross-validation", out_dir / "learning_curves.png")
        mlflow.log_artifact(str(curves))
        mlflow.log_artifact(str(out_dir / "oof.csv"))
        best_epochs = [f["best_epoch"] for f in fold_runs]
        refit_epochs = max(1, math.ceil(statistics.median(best_epochs)))
        mlflow.log_metric("refit_epochs", refit_epochs)
    return {"run_id": parent.info.run_id, "folds": fold_runs, "refit_epochs": refit_epochs}


def _oof_frame(val_rows: pd.DataFrame, fold: int, logits: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    frame = pd.DataFrame(
        {
            "path": val_rows["path"].to_numpy(),
            "label": val_rows["label"].to_numpy(),
            "slide": val_rows["slide"].to_numpy(),
            "case": val_rows["case"].to_numpy(),
            "fold": fold,
            "prediction": [classes[i] for i in probabilities.argmax(1)],
        }
    )
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probabilities[:, i]
    for i, name in enumerate(classes):
        frame[f"logit_{name}"] = logits[:, i]
    return frame


def refit(
    config: Config,
    arch: str,
    epochs: int,
    balance_dir: str | Path,
    dataset_dir: str | Path,
    policy: AugmentPolicy,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``arch`` on every tile (the balanced ``full`` training set) for a fixed number of epochs."""
    device = select_device(config.train.device)
    table = load_training_table(balance_dir, "full", dataset_dir)
    train_set = training_dataset(table, config, policy)
    seed_everything(config.train.seed)
    model = build_model(
        arch, len(config.data.classes), config.train.dropout, config.train.weights, config.train.trainable
    )
    timer = EtaTimer(epochs)
    return fit(model, train_set, None, config.train, device, epochs, f"{arch} refit on all tiles", on_epoch, timer)
