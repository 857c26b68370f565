"""Register: refit the winning architecture on all tiles and register it as the champion.

Why refit rather than keep the best fold's model: each fold model saw only (k-1)/k of the slides, and picking
the fold with the best validation score would pick partly on luck. The cross-validation estimates how well the
*recipe* generalises; the served model is that recipe applied to every tile (GAN-balanced the same way), trained
for the median best epoch over the folds, since without a validation set there is nothing to stop early on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow

from bonetumor.augment import load_policy
from bonetumor.config import Config, save_resolved
from bonetumor.errors import ArtifactError
from bonetumor.evaluate import COMPARISON_FILE
from bonetumor.inference import ModelMetadata, save_bundle
from bonetumor.registry import log_and_register
from bonetumor.tracking import TAG_PREFIX, flatten_params, log_epoch_metrics, provenance_tags, require_run, setup_mlflow
from bonetumor.train import RUNS_FILE, TRAIN_SECTIONS, refit
from bonetumor.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

CHAMPION_FILE = "champion.json"


def run_registration(
    config: Config,
    manifest_path: str | Path,
    policy_path: str | Path,
    balance_dir: str | Path,
    train_dir: str | Path,
    evaluate_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path,
) -> dict[str, Any]:
    """Refit the winner, log it to MLflow, register a version and set the alias.

    Args:
        config: Uses ``register``, ``train``, ``preprocess``, ``data`` and ``tracking``.
        manifest_path: The data set manifest (its folder resolves real tile paths; its hash is the data version).
        policy_path: The augmentation policy.
        balance_dir: The balance output (the ``full`` training set).
        train_dir: The train output (``runs.json``: CV run ids and refit epochs).
        evaluate_dir: The evaluate output (``comparison.json``: the winner).
        out_dir: Output folder: ``bundle/`` (weights and metadata) and ``champion.json``.
        project_dir: Base folder for a relative tracking URI and the git commit.

    Returns:
        The content of ``champion.json``: model name, version, alias, run id, architecture and scores.
    """
    comparison_path, runs_path = Path(evaluate_dir) / COMPARISON_FILE, Path(train_dir) / RUNS_FILE
    comparison = read_json(comparison_path, "architecture comparison")
    runs = read_json(runs_path, "training runs file")
    try:
        winner = comparison["winner"]
        cv = runs["architectures"][winner]
        scores = comparison["scores"][winner]
        evaluated_runs = comparison["cv_run_ids"]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(
            f"{comparison_path} and {runs_path} do not fit together (missing {exc}); rerun `bonetumor evaluate`"
        ) from exc
    trained_runs = {arch: info["run_id"] for arch, info in runs["architectures"].items()}
    if evaluated_runs != trained_runs:
        raise ArtifactError(
            f"{comparison_path} scored the runs {evaluated_runs} but {runs_path} holds {trained_runs}: the evaluation "
            "is stale. Rerun `bonetumor evaluate` (dvc repro does this)."
        )
    setup_mlflow(config.tracking, project_dir)
    require_run(cv["run_id"], f"{winner} cross-validation run")
    policy = load_policy(policy_path)
    tags = provenance_tags(config, manifest_path, project_dir)
    reason = (
        f"{winner} ranked first of {comparison['ranking']} by {comparison['selection']}: "
        f"mean per-fold macro-F1 {scores['fold_f1_macro_mean']:.4f}, pooled accuracy {scores['accuracy']:.4f}"
    )
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp)
        run_tags = {
            **tags,
            f"{TAG_PREFIX}stage": "register",
            f"{TAG_PREFIX}arch": winner,
            f"{TAG_PREFIX}cv_run_id": cv["run_id"],
        }
        with mlflow.start_run(run_name=f"refit-{winner}", tags=run_tags) as run:
            mlflow.log_params(
                {
                    **flatten_params(config, (*TRAIN_SECTIONS, "register")),
                    "arch": winner,
                    "refit_epochs": cv["refit_epochs"],
                }
            )
            result = refit(
                config, winner, cv["refit_epochs"], balance_dir, Path(manifest_path).parent, policy, log_epoch_metrics
            )
            mlflow.log_metrics({f"cv_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))})
            provenance = {
                **{k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)},
                "cv_run_id": cv["run_id"],
                "refit_run_id": run.info.run_id,
                "refit_epochs": cv["refit_epochs"],
                "oof_f1_macro": scores["f1_macro"],
                "oof_accuracy": scores["accuracy"],
                "fold_f1_macro_mean": scores["fold_f1_macro_mean"],
                "selection": reason,
            }
            metadata = ModelMetadata(
                arch=winner,
                classes=config.data.classes,
                image_size=config.preprocess.image_size,
                mean=config.preprocess.mean,
                std=config.preprocess.std,
                dropout=config.train.dropout,
                provenance=provenance,
                versions=ModelMetadata.current_versions(),
            )
            bundle = save_bundle(result.model, metadata, tmp / "bundle")
            version_tags = {
                **tags,
                f"{TAG_PREFIX}arch": winner,
                f"{TAG_PREFIX}cv_run_id": cv["run_id"],
                f"{TAG_PREFIX}oof_f1_macro": f"{scores['f1_macro']:.4f}",
                f"{TAG_PREFIX}fold_f1_macro_mean": f"{scores['fold_f1_macro_mean']:.4f}",
                f"{TAG_PREFIX}oof_accuracy": f"{scores['accuracy']:.4f}",
                f"{TAG_PREFIX}selection_reason": reason,
            }
            version = log_and_register(
                bundle, metadata, config.register.model_name, config.register.alias, version_tags, description=reason
            )
        champion = {
            "model_name": config.register.model_name,
            "version": str(version.version),
            "alias": config.register.alias,
            "model_uri": f"models:/{config.register.model_name}@{config.register.alias}",
            "run_id": run.info.run_id,
            "cv_run_id": cv["run_id"],
            "arch": winner,
            "selection": reason,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        write_json(tmp / CHAMPION_FILE, champion)
    log.info("champion: %s version %s (%s)", config.register.model_name, version.version, winner)
    return champion
