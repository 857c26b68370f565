"""Train: every architecture on every fold, with early stopping, tracked in MLflow (the loop is in ``engine``).

Per architecture, one parent MLflow run holds the cross-validation; each fold is a nested run with per-epoch
metrics. Each fold early-stops on a grouped hold-out of its own training slides (``train.inner_val_fraction``);
the model of its best epoch (by ``train.monitor``) then predicts the fold's validation tiles once, which gives
the out-of-fold predictions that evaluation scores. The median best epoch sets the length of the final refit
on all tiles (see ``register``).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from bonetumor.augment import AugmentPolicy, load_policy
from bonetumor.config import Config, save_resolved
from bonetumor.datasets import load_training_table, split_tables
from bonetumor.engine import FitResult, eval_dataset, fit, plot_history, predict_logits, select_device, training_dataset
from bonetumor.manifest import read_manifest, resolve_paths
from bonetumor.metrics import macro_f1
from bonetumor.models import build_model
from bonetumor.split import inner_split, read_folds
from bonetumor.tracking import flatten_params, log_epoch_metrics, provenance_tags, setup_mlflow
from bonetumor.utils import EtaTimer, atomic_dir, seed_everything, write_json

log = logging.getLogger(__name__)

RUNS_FILE = "runs.json"
TRAIN_SECTIONS = ("data", "preprocess", "split", "augment", "balance", "train")


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
    folds = read_folds(folds_path, manifest, manifest_path)
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
            fit_table, stop_rows = early_stopping_split(train_table, config, seed=config.train.seed + k)
            train_set = training_dataset(fit_table, config, policy)
            stop_set = (
                None if stop_rows is None else eval_dataset(list(stop_rows["file"]), list(stop_rows["label"]), config)
            )
            val_set = eval_dataset(resolve_paths(val_rows, dataset_dir), list(val_rows["label"]), config)
            seed_everything(config.train.seed + k)
            model = build_model(arch, len(classes), config.train.dropout, config.train.weights, config.train.trainable)
            with mlflow.start_run(
                run_name=f"cv-{arch}-fold{k}", nested=True, tags={**tags, "bonetumor.fold": str(k)}
            ) as run:
                mlflow.log_params(
                    {
                        "fold": k,
                        "n_train_real": int((~fit_table["synthetic"]).sum()),
                        "n_train_synthetic": int(fit_table["synthetic"].sum()),
                        "n_early_stopping": 0 if stop_rows is None else len(stop_rows),
                        "n_val": len(val_rows),
                        "val_groups": ",".join(fold_info["val_groups"])[:6000],
                    }
                )
                # val_* metrics per epoch are the early-stopping set's; the fold's own validation tiles are
                # predicted once, with the chosen epoch, and only scored (fold_* metrics, oof.csv).
                result = fit(
                    model,
                    train_set,
                    stop_set,
                    config.train,
                    device,
                    config.train.epochs,
                    name,
                    log_epoch_metrics,
                    timer,
                )
                logits = predict_logits(result.model, val_set, config.train, device)
                best = result.history[result.best_epoch - 1]
                predictions = logits.argmax(1)
                mlflow.log_metrics(
                    {
                        "best_epoch": result.best_epoch,
                        **{f"best_{k2}": v for k2, v in best.items() if k2.startswith("val_")},
                        "fold_accuracy": float(np.mean(predictions == np.array(val_set.labels))),
                        "fold_macro_f1": macro_f1(val_set.labels, predictions),
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


def early_stopping_split(table: pd.DataFrame, config: Config, seed: int) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Split a fold's training table into the tiles to fit on and the held-out tiles to early-stop on.

    The held-out tiles are real tiles of whole groups (slides or cases); synthetic tiles always stay in the fit
    set. With ``train.inner_val_fraction: 0`` nothing is held out and there is no early stopping.
    """
    if config.train.inner_val_fraction == 0:
        return table, None
    synthetic = table["synthetic"]
    fit_rows, stop_rows = inner_split(table[~synthetic], config.split.group_by, config.train.inner_val_fraction, seed)
    return pd.concat([fit_rows, table[synthetic]]), stop_rows


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
    """Train ``arch`` on every tile (the balanced ``full`` training set) for a fixed number of epochs.

    The cosine schedule spans ``train.epochs`` as in the folds, so epoch ``e`` of the refit uses the learning
    rate epoch ``e`` of a fold used. (With ``scheduler: plateau`` there is no validation set to react to, so the
    refit keeps the initial rate.)
    """
    device = select_device(config.train.device)
    table = load_training_table(balance_dir, "full", dataset_dir)
    train_set = training_dataset(table, config, policy)
    seed_everything(config.train.seed)
    model = build_model(
        arch, len(config.data.classes), config.train.dropout, config.train.weights, config.train.trainable
    )
    timer = EtaTimer(epochs)
    name = f"{arch} refit on all tiles"
    return fit(model, train_set, None, config.train, device, epochs, name, on_epoch, timer, config.train.epochs)
