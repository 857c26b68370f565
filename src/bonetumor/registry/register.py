"""Register: refit the winning architecture on all training tiles, pass it through the champion gate, register it.

Why refit rather than keep the best fold's model: each fold model saw only (k-1)/k of the slides, and picking
the fold with the best validation score would pick partly on luck. The cross-validation estimates how well the
*recipe* generalises; the served model is that recipe applied to every training tile (GAN-balanced the same way,
stain-normalised to a target fitted on those tiles, from the same starting weights), trained for the median best
step over the folds, since without a validation set there is nothing to stop early on.

The bundle carries the referral rule the evaluate stage chose on the winner's out-of-fold predictions (temperature
and thresholds). With a held-out test set (``split.test_fraction``), the refit model is scored on it once, here.

The champion gate (:mod:`bonetumor.registry.gate`) then decides the alias: ``register.alias`` (champion) only when the
new model's referral rule meets its targets, it beats the colour-histogram baseline on the same folds
(``register.require_beats_baseline``) and it beats the current champion on the same data and folds; otherwise
``register.challenger_alias``. The decision and both sides' figures are tags on the new version.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from bonetumor.config import Config, save_resolved
from bonetumor.data.datasets import load_training_table
from bonetumor.data.manifest import read_manifest, resolve_paths
from bonetumor.data.split import held_out_rows, read_folds
from bonetumor.errors import ArtifactError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.evaluation.evaluate import COMPARISON_FILE, REFERRAL_DIR
from bonetumor.evaluation.metrics import classification_metrics
from bonetumor.registry.gate import GateMetrics, decide, gate_document
from bonetumor.registry.model_registry import champion_metrics, log_and_register
from bonetumor.registry.tracking import (
    TAG_PREFIX,
    flatten_params,
    log_step_metrics,
    provenance_tags,
    require_run,
    setup_mlflow,
)
from bonetumor.serving.predictor import ModelMetadata, Predictor, save_bundle
from bonetumor.training.candidates import int8_classifier, select_calibration_files
from bonetumor.training.cross_validation import INIT_TAG, RUNS_FILE, TRAIN_SECTIONS, refit
from bonetumor.training.models import InitWeights, resolve_weights
from bonetumor.transforms.augment import load_policy
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.stain import fit_from_files
from bonetumor.transforms.tta import with_views
from bonetumor.utils import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

CHAMPION_FILE = "champion.json"
#: ONNX FP32 and INT8 exports of the registered model (``model.fp32.onnx``, ``model.int8.onnx``).
ONNX_DIR = "onnx"


def score_test_set(predictor: Predictor, rows: Any, dataset_dir: Path, classes: tuple[str, ...]) -> dict[str, Any]:
    """Score the refit model on the held-out test tiles (never seen by any fold, GAN or refit).

    Returns:
        Accuracy, macro/weighted P/R/F1, per-class figures, the confusion matrix, and the referral rule's
        coverage and accepted accuracy on the test tiles.
    """
    answers = []
    files = resolve_paths(rows, dataset_dir)
    for start in range(0, len(files), 16):
        answers += predictor.predict_images([decode_image(f) for f in files[start : start + 16]])
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.array([index[str(label)] for label in rows["label"]])
    y_pred = np.array([index[a["label"]] for a in answers])
    result = classification_metrics(y_true, y_pred, classes)
    accepted = np.array([not a["referral"]["refer"] for a in answers])
    result["referral_coverage"] = float(accepted.mean())
    result["accepted_accuracy"] = float((y_true == y_pred)[accepted].mean()) if accepted.any() else None
    return result


def _refit_init(arch: str, weights: str, cv_init: str) -> InitWeights:
    """Where the refit's weights start: the same source as the cross-validation's, which estimated the recipe.

    Raises:
        ArtifactError: The weights available now differ from what the cross-validation used (for example,
            ImageNet weights were fetched after a run that fell back to random initialisation).
    """
    if cv_init.startswith("scratch") and weights == "auto":
        return InitWeights(arch, "scratch", cv_init.removeprefix("scratch (").removesuffix(")"), fallback=True)
    init = resolve_weights(arch, weights)
    if cv_init and init.tag != cv_init:
        raise ArtifactError(
            f"{arch}: the cross-validation started from {cv_init!r} but the refit would start from {init.tag!r}; "
            "rerun `bonetumor train` (dvc repro -f train) so that both use the same weights"
        )
    return init


def run_registration(
    config: Config,
    manifest_path: str | Path,
    policy_path: str | Path,
    balance_dir: str | Path,
    train_dir: str | Path,
    evaluate_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path,
    folds_path: str | Path,
) -> dict[str, Any]:
    """Refit the winner, log it to MLflow, register a version and set the alias the champion gate decides.

    Args:
        config: Uses ``register``, ``train``, ``preprocess``, ``data`` and ``tracking``.
        manifest_path: The data set manifest (its folder resolves real tile paths; its hash is the data version).
        policy_path: The augmentation policy.
        balance_dir: The balance output (the ``full`` training set).
        train_dir: The train output (``runs.json``: CV run ids and refit epochs).
        evaluate_dir: The evaluate output (``comparison.json``: the winner; ``referral/<winner>.json``).
        out_dir: Output folder: ``bundle/`` (weights and metadata) and ``champion.json``.
        project_dir: Base folder for a relative tracking URI and the git commit.
        folds_path: The folds file (its hash identifies the folds for the gate; its test tiles are scored).

    Returns:
        The content of ``champion.json``: model name, version, the alias set, the gate's decision, run id,
        architecture, scores, and the test-set figures when there is a test set.
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
    folds_path = Path(folds_path)
    referral_path = Path(evaluate_dir) / REFERRAL_DIR / f"{winner}.json"
    referral = ReferralPolicy.from_dict(read_json(referral_path, "referral rule"), source=str(referral_path))
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    folds = read_folds(folds_path, manifest, manifest_path)
    setup_mlflow(config.tracking, project_dir)
    require_run(cv["run_id"], f"{winner} cross-validation run")
    policy = load_policy(policy_path)
    tags = provenance_tags(config, manifest_path, project_dir)
    reason = (
        f"{winner} ranked first of {comparison['ranking']} by {comparison['selection']}: "
        f"mean per-fold macro-F1 {scores['fold_f1_macro_mean']:.4f}, pooled accuracy {scores['accuracy']:.4f}"
    )
    baseline = (comparison.get("baseline") or {}).get("fold_f1_macro_mean")
    fold_f1 = float(scores["fold_f1_macro_mean"])
    candidate = GateMetrics(
        version="",
        fold_f1_macro_mean=fold_f1,
        target_recall=referral.accepted_target_recall,
        target_met=referral.target_met,
        data_version=tags[f"{TAG_PREFIX}data_version"],
        folds_digest=sha256_file(folds_path),
        baseline_fold_f1_macro_mean=None if baseline is None else float(baseline),
        beats_baseline=None if baseline is None else fold_f1 > float(baseline),
    )
    champion_now = champion_metrics(config.register.model_name, config.register.alias)
    decision = decide(
        candidate,
        champion_now,
        config.referral.target_recall,
        config.referral.target_class,
        config.register.require_beats_baseline,
    )
    alias = config.register.alias if decision.promote else config.register.challenger_alias
    log.info("champion gate: %s -> @%s", decision.reason, alias)
    dataset_dir = manifest_path.parent
    arch_config = config.for_arch(winner)
    init = _refit_init(winner, config.train.weights, cv.get("init", ""))
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp)
        run_tags = {
            **tags,
            f"{TAG_PREFIX}stage": "register",
            f"{TAG_PREFIX}arch": winner,
            f"{TAG_PREFIX}cv_run_id": cv["run_id"],
            INIT_TAG: init.tag,
        }
        with mlflow.start_run(run_name=f"refit-{winner}", tags=run_tags) as run:
            mlflow.log_params(
                {
                    **flatten_params(arch_config, (*TRAIN_SECTIONS, "referral", "register")),
                    "arch": winner,
                    "refit_steps": cv["refit_steps"],
                }
            )
            # The stain target is fitted on the refit's own real training tiles: every tile outside the test set.
            real = load_training_table(balance_dir, "full", dataset_dir)
            stain = fit_from_files(
                policy.stain_normalization, list(real.loc[~real["synthetic"], "file"]), seed=config.train.seed
            )
            # Outside the atomic output folder, which a killed run discards; removed once registered.
            checkpoints = Path(out_dir).parent / f".{Path(out_dir).name}.checkpoints"
            result = refit(
                arch_config,
                winner,
                cv["refit_steps"],
                balance_dir,
                dataset_dir,
                policy,
                log_step_metrics,
                stain=stain,
                checkpoint_dir=checkpoints,
                fingerprint=f"{config.section_hash(*TRAIN_SECTIONS)}-{winner}-{cv['run_id']}-{policy.digest()}",
                init=init,
            )
            mlflow.log_metrics({f"cv_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))})
            provenance = {
                **{k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)},
                "cv_run_id": cv["run_id"],
                "refit_run_id": run.info.run_id,
                "refit_steps": cv["refit_steps"],
                "init": init.tag,
                "temperature_at_bound": referral.temperature_at_bound,
                "oof_f1_macro": scores["f1_macro"],
                "oof_accuracy": scores["accuracy"],
                "fold_f1_macro_mean": scores["fold_f1_macro_mean"],
                "folds_digest": candidate.folds_digest,
                "selection": reason,
            }
            metadata = ModelMetadata(
                arch=winner,
                classes=config.data.classes,
                tile_size=arch_config.preprocess.tile_size,
                input_size=arch_config.preprocess.input_size,
                mean=arch_config.preprocess.mean,
                std=arch_config.preprocess.std,
                dropout=arch_config.train.dropout,
                test_crops=arch_config.preprocess.test_crops,
                test_flips=arch_config.preprocess.test_flips,
                provenance=provenance,
                versions=ModelMetadata.current_versions(),
                stain=None if stain is None else stain.to_dict(),
                referral=referral.to_dict(),
            )
            bundle = save_bundle(result.model, metadata, tmp / "bundle")
            if config.register.export_onnx:
                # For small machines: the champion as ONNX (FP32) and INT8, beside the bundle, same preprocessing.
                calibration = select_calibration_files(
                    real, config.candidates.calibration_tiles, seed=config.train.seed
                )
                _, quantized = int8_classifier(
                    with_views(result.model, metadata.views),
                    arch_config.preprocess,
                    stain,
                    calibration,
                    tmp / ONNX_DIR,
                    "model",
                    classes=config.data.classes,
                    max_tiles=config.candidates.calibration_tiles,
                )
                mlflow.set_tag(f"{TAG_PREFIX}int8_method", quantized.method)
                mlflow.log_artifacts(str(tmp / ONNX_DIR), ONNX_DIR)
            else:
                (tmp / ONNX_DIR).mkdir()
                (tmp / ONNX_DIR / "DISABLED.txt").write_text("register.export_onnx is false: no ONNX export\n")
            test = held_out_rows(manifest, folds)
            test_scores = None
            if len(test):
                test_scores = score_test_set(Predictor(result.model, metadata), test, dataset_dir, config.data.classes)
                mlflow.log_metrics(
                    {f"test_{k}": float(v) for k, v in test_scores.items() if isinstance(v, (int, float))}
                    | {f"test_recall_{c}": float(v["recall"]) for c, v in test_scores["per_class"].items()}
                )
                write_json(tmp / "test_metrics.json", test_scores)
                mlflow.log_artifact(str(tmp / "test_metrics.json"), "evaluation")
            version_tags = {
                **tags,
                f"{TAG_PREFIX}arch": winner,
                f"{TAG_PREFIX}cv_run_id": cv["run_id"],
                f"{TAG_PREFIX}oof_f1_macro": f"{scores['f1_macro']:.4f}",
                f"{TAG_PREFIX}fold_f1_macro_mean": f"{scores['fold_f1_macro_mean']:.4f}",
                f"{TAG_PREFIX}oof_accuracy": f"{scores['accuracy']:.4f}",
                f"{TAG_PREFIX}selection_reason": reason,
                INIT_TAG: init.tag,
                f"{TAG_PREFIX}temperature": f"{referral.temperature:.4g}",
                f"{TAG_PREFIX}temperature_at_bound": str(referral.temperature_at_bound),
                **candidate.to_tags("candidate"),
                **({} if champion_now is None else champion_now.to_tags("champion")),
                **decision.to_tags(alias),
            }
            if test_scores is not None:
                version_tags[f"{TAG_PREFIX}test_accuracy"] = f"{test_scores['accuracy']:.4f}"
            version = log_and_register(
                bundle, metadata, config.register.model_name, alias, version_tags, description=reason
            )
        champion = {
            "model_name": config.register.model_name,
            "version": str(version.version),
            "alias": alias,
            "model_uri": f"models:/{config.register.model_name}@{alias}",
            "run_id": run.info.run_id,
            "cv_run_id": cv["run_id"],
            "arch": winner,
            "selection": reason,
            "gate": gate_document(candidate, champion_now, decision),
            "test": test_scores,
            "tracking_uri": mlflow.get_tracking_uri(),
        }
        write_json(tmp / CHAMPION_FILE, champion)
    shutil.rmtree(Path(out_dir).parent / f".{Path(out_dir).name}.checkpoints", ignore_errors=True)
    log.info("%s version %s (%s) -> @%s", config.register.model_name, version.version, winner, alias)
    return champion
