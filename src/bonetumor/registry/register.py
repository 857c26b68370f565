"""Register: refit the winning architecture on all training tiles, pass it through the champion gate, register it.

The refit (:mod:`bonetumor.training.refit`) trains the winning architecture, through the same candidate protocol
as the folds, on every training tile for the folds' median best step, and exports its bundle.

The bundle carries the referral rule the evaluate stage chose on the winner's out-of-fold predictions (temperature
and thresholds). With a held-out test set (``split.test_fraction``), the refit model is scored on it once, here.

The champion gate (:mod:`bonetumor.registry.gate`) then decides the alias: ``register.alias`` (champion) only when the
new model's referral rule meets its targets, it beats the colour-histogram baseline on the same folds
(``register.require_beats_baseline``) and it beats the current champion on the same data and folds; otherwise
``register.challenger_alias``. The decision and both sides' figures are tags on the new version.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from torch import nn

from bonetumor.config import Config, save_resolved
from bonetumor.data.manifest import read_manifest, resolve_paths
from bonetumor.data.split import held_out_rows, read_folds
from bonetumor.errors import ArtifactError, RegistrationRefusedError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.evaluation.evaluate import COMPARISON_FILE, REFERRAL_DIR
from bonetumor.evaluation.metrics import classification_metrics
from bonetumor.registry.gate import GateDecision, GateMetrics, decide, gate_document, registration_allowed
from bonetumor.registry.lineage import LINEAGE_DIR, pipeline_run, write_lineage_record
from bonetumor.registry.model_card import (
    CARD_DIR,
    CardSources,
    card_settings,
    card_training,
    log_model_card,
    previous_champion,
)
from bonetumor.registry.model_registry import STATUS_TAG, champion_metrics, log_and_register
from bonetumor.registry.restore import RestoreRecord, restore_record
from bonetumor.registry.tracking import (
    TAG_PREFIX,
    flatten_params,
    log_step_metrics,
    process_tags,
    provenance_tags,
    require_run,
    setup_mlflow,
)
from bonetumor.serving.engines import ONNX_DIR, decide_runtime
from bonetumor.serving.predictor import ModelMetadata, Predictor, load_bundle, write_metadata
from bonetumor.serving.served import DRIFT_REFERENCE
from bonetumor.training.candidates import TrainingSet
from bonetumor.training.candidates.int8 import int8_classifier, select_calibration_files
from bonetumor.training.candidates.network import INIT_TAG, NetworkCandidate
from bonetumor.training.cross_validation import RUNS_FILE, TRAIN_SECTIONS
from bonetumor.training.models import InitWeights, resolve_weights
from bonetumor.training.refit import full_training_set, refit
from bonetumor.transforms.augment import load_policy
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.tta import with_views
from bonetumor.utils import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

CHAMPION_FILE = "champion.json"


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


@dataclasses.dataclass
class _Winner:
    """What the evaluate and train stages say about the model to register."""

    name: str
    cv: dict[str, Any]
    scores: dict[str, Any]
    referral: ReferralPolicy
    reason: str
    baseline: float | None
    all_scores: dict[str, Any] = dataclasses.field(default_factory=dict)
    comparison: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    winner = _read_winner(Path(train_dir), Path(evaluate_dir), config.register.min_macro_f1)
    manifest_path, folds_path = Path(manifest_path), Path(folds_path)
    manifest = read_manifest(manifest_path)
    folds = read_folds(folds_path, manifest, manifest_path)
    setup_mlflow(config.tracking, project_dir)
    require_run(winner.cv["run_id"], f"{winner.name} cross-validation run")
    abandon_unfinished_versions(config.register.model_name)
    policy = load_policy(policy_path)
    tags = provenance_tags(config, manifest_path, project_dir)
    candidate = _candidate_metrics(winner, tags, folds_path)
    champion_now, decision, alias = _gate(config, candidate)
    init = _refit_init(winner.name, config.train.weights, winner.cv.get("init", ""))
    checkpoints = Path(out_dir).parent / f".{Path(out_dir).name}.checkpoints"
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp)
        refit_tags = _refit_tags({**tags, **process_tags()}, winner, init)
        with mlflow.start_run(run_name=f"refit-{winner.name}", tags=refit_tags) as run:
            _log_refit_params(config, winner)
            data = full_training_set(config, balance_dir, manifest_path.parent, policy, winner.cv["refit_steps"])
            # Outside the atomic output folder, which a killed run discards; removed once registered.
            fitted = refit(
                NetworkCandidate(winner.name, init),
                data,
                config,
                policy,
                log_step_metrics,
                checkpoint_dir=checkpoints,
                fingerprint=f"{config.section_hash(*TRAIN_SECTIONS)}-{winner.name}-{winner.cv['run_id']}-"
                f"{policy.digest()}",
            )
            mlflow.log_metrics({f"cv_{k}": float(v) for k, v in winner.scores.items() if isinstance(v, (int, float))})
            provenance = _provenance(tags, winner, run.info.run_id, init, candidate)
            bundle = fitted.export(tmp / "bundle", provenance=provenance, referral=winner.referral)
            model, metadata = load_bundle(bundle)
            exported = _export_onnx(config, model, metadata, data, bundle)
            metadata = _finish_bundle(config, winner, bundle, metadata, exported)
            test_scores = _score_held_out(Predictor(model, metadata), manifest, folds, manifest_path.parent, tmp)
            _add_drift_reference(Predictor(model, metadata), data, bundle, metadata, Path(train_dir) / winner.name)
            restore = _log_lineage(config, manifest, manifest_path, folds_path, metadata, project_dir, tmp)
            version_tags = {
                **_version_tags(tags, winner, init, test_scores),
                **_restore_tags(restore),
                **_gate_tags(candidate, champion_now, decision, alias),
            }
            card = _CardContext(config, winner, metadata, {**_tile_counts(manifest), "restore": restore.to_dict()})
            card.tags, card.test, card.gate = tags, test_scores, gate_document(candidate, champion_now, decision)
            version = log_and_register(
                bundle,
                metadata,
                config.register.model_name,
                alias,
                version_tags,
                winner.reason,
                _mirror(config, project_dir),
                before_ready=lambda pending: card.log(pending, alias, champion_now, tmp / CARD_DIR),
            )
        champion = _champion_document(
            config, version, alias, run.info.run_id, winner, candidate, champion_now, decision
        )
        champion["test"] = test_scores
        write_json(tmp / CHAMPION_FILE, champion)
    shutil.rmtree(checkpoints, ignore_errors=True)
    log.info("%s version %s (%s) -> @%s", config.register.model_name, version.version, winner.name, alias)
    return champion


@dataclasses.dataclass
class _CardContext:
    """What the model card needs from registration; :meth:`log` writes and logs it once the version has a number."""

    config: Config
    winner: _Winner
    metadata: ModelMetadata
    data: dict[str, Any]
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    test: dict[str, Any] | None = None
    gate: dict[str, Any] = dataclasses.field(default_factory=dict)

    def sources(self, version: Any, alias: str, previous: dict[str, Any] | None) -> CardSources:
        """The card's sources for the new ``version``."""
        comparison, name = self.winner.comparison, self.winner.name
        baseline_name = (comparison.get("baseline") or {}).get("name")
        archs = [a for a in comparison.get("ranking", []) if a != name]
        created = datetime.fromtimestamp((version.creation_timestamp or 0) / 1000, UTC).isoformat(timespec="seconds")
        return CardSources(
            model={
                "name": self.config.register.model_name,
                "version": str(version.version),
                "alias": alias,
                "run_id": version.run_id or "",
                "cv_run_id": self.winner.cv["run_id"],
                "registered_at": created,
            },
            metadata=dataclasses.asdict(self.metadata),
            scores=self.winner.scores,
            baseline=self.winner.all_scores.get(baseline_name) if baseline_name else None,
            baseline_what=(comparison.get("baseline") or {}).get("what") or "",
            others={
                a: {k: self.winner.all_scores[a].get(k) for k in ("fold_f1_macro_mean", "accuracy")}
                for a in archs
                if a in self.winner.all_scores
            },
            data={
                **self.data,
                "data_version": self.tags.get(f"{TAG_PREFIX}data_version"),
                "dvc_md5": self.tags.get(f"{TAG_PREFIX}dvc_data_md5"),
                "synthetic": comparison.get("balance"),
                "group_by": self.config.split.group_by,
            },
            test=self.test,
            gate=self.gate,
            previous=previous,
            settings=card_settings(self.config),
            training=card_training(self.config, name),
        )

    def log(self, version: Any, alias: str, champion: GateMetrics | None, out_dir: Path) -> dict[str, str]:
        """Write the card of ``version`` to ``out_dir``, log it under the active run's ``model_card/``.

        Returns:
            The version tag that says where the card is.
        """
        previous = previous_champion(self.config.register.model_name, champion)
        return log_model_card(self.sources(version, alias, previous), out_dir)


def abandon_unfinished_versions(model_name: str) -> list[str]:
    """Mark ``abandoned`` the versions whose registration was killed: ``pending``, their run no longer RUNNING.

    A registration killed between ``create_model_version`` and its alias leaves a ``pending`` version; no alias
    points at it and nothing serves or promotes it (both want ``ready``). Saying ``abandoned`` on it, with why,
    tells an auditor browsing the registry that it is not a model that is still being registered. Its run was
    marked FAILED by :func:`bonetumor.registry.tracking.close_interrupted_runs` first.

    Returns:
        The versions marked.
    """
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return []  # no such model yet
    marked = []
    for version in versions:
        if version.tags.get(STATUS_TAG) != "pending" or not version.run_id:
            continue
        try:
            status = client.get_run(version.run_id).info.status
        except MlflowException:
            status = "missing"
        if status == "RUNNING":
            continue  # a registration in progress (or of a process on another host)
        client.set_model_version_tag(model_name, version.version, STATUS_TAG, "abandoned")
        client.set_model_version_tag(
            model_name,
            version.version,
            f"{TAG_PREFIX}abandoned_reason",
            f"its registration stopped before the version was ready (run {version.run_id} is {status}); "
            f"marked at {datetime.now(UTC).isoformat(timespec='seconds')}. It is never served or promoted.",
        )
        marked.append(str(version.version))
    if marked:
        log.warning("%s: versions %s were left pending by a killed registration; marked abandoned", model_name, marked)
    return marked


def _read_winner(train_dir: Path, evaluate_dir: Path, min_macro_f1: float) -> _Winner:
    """Read the winner, its CV record, scores and referral rule; refuse an evaluation of other training runs.

    Raises:
        ArtifactError: A file is missing or the two stages' files do not fit together.
        RegistrationRefusedError: The winner's mean per-fold macro-F1 is below ``register.min_macro_f1``.
    """
    comparison_path, runs_path = evaluate_dir / COMPARISON_FILE, train_dir / RUNS_FILE
    comparison = read_json(comparison_path, "architecture comparison")
    runs = read_json(runs_path, "training runs file")
    try:
        name = comparison["winner"]
        cv = runs["architectures"][name]
        scores = comparison["scores"][name]
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
    allowed, why = registration_allowed(comparison, min_macro_f1)
    if not allowed:
        raise RegistrationRefusedError(f"the evaluation does not allow a registration: {why}; nothing was registered")
    referral_path = evaluate_dir / REFERRAL_DIR / f"{name}.json"
    referral = ReferralPolicy.from_dict(read_json(referral_path, "referral rule"), source=str(referral_path))
    reason = (
        f"{name} ranked first of {comparison['ranking']} by {comparison['selection']}: "
        f"mean per-fold macro-F1 {scores['fold_f1_macro_mean']:.4f}, pooled accuracy {scores['accuracy']:.4f}"
    )
    baseline = (comparison.get("baseline") or {}).get("fold_f1_macro_mean")
    return _Winner(
        name,
        cv,
        scores,
        referral,
        reason,
        None if baseline is None else float(baseline),
        comparison["scores"],
        comparison,
    )


def _gate(config: Config, candidate: GateMetrics) -> tuple[GateMetrics | None, GateDecision, str]:
    """Compare the new model with the current champion; return the champion's figures, the decision, the alias."""
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
    return champion_now, decision, alias


def _candidate_metrics(winner: _Winner, tags: dict[str, str], folds_path: Path) -> GateMetrics:
    """The new model's side of the champion gate."""
    fold_f1 = float(winner.scores["fold_f1_macro_mean"])
    return GateMetrics(
        version="",
        fold_f1_macro_mean=fold_f1,
        target_recall=winner.referral.accepted_target_recall,
        target_met=winner.referral.target_met,
        data_version=tags[f"{TAG_PREFIX}data_version"],
        folds_digest=sha256_file(folds_path),
        baseline_fold_f1_macro_mean=winner.baseline,
        beats_baseline=None if winner.baseline is None else fold_f1 > winner.baseline,
    )


def _add_drift_reference(
    predictor: Predictor, data: TrainingSet, bundle: Path, metadata: ModelMetadata, cv_dir: Path
) -> None:
    """Store the drift reference in the bundle: the real training tiles' statistics and embeddings by this model.

    The label and referral rates expected of served tiles are the winner's out-of-fold ones (``oof.csv``). The
    bundle's SHA-256 list is rewritten to cover the reference.
    """
    from bonetumor.monitoring.reference import build_reference

    table = data.train_table
    files = table.loc[~table["synthetic"], "file"] if "synthetic" in table.columns else table["file"]
    images = [decode_image(f) for f in files]
    label_rates, referral_rate = None, None
    oof_path = cv_dir / "oof.csv"
    if oof_path.is_file():
        oof = pd.read_csv(oof_path)
        label_rates = {str(k): float(v) for k, v in oof["prediction"].value_counts(normalize=True).items()}
        referral = predictor.metadata.referral or {}
        if "coverage" in referral:
            referral_rate = 1.0 - float(referral["coverage"])
    reference = build_reference(predictor, images, label_rates=label_rates, referral_rate=referral_rate)
    reference.save(bundle / DRIFT_REFERENCE)
    write_metadata(bundle, metadata)


def _log_lineage(
    config: Config,
    manifest: Any,
    manifest_path: Path,
    folds_path: Path,
    metadata: ModelMetadata,
    project_dir: str | Path,
    out_dir: Path,
) -> RestoreRecord:
    """Log ``lineage/`` with the active (refit) run: the restore record, dvc.lock, params, libraries, pipeline run."""
    run = mlflow.active_run()
    restore = restore_record(config.data.source, project_dir, run.info.run_id if run else "")
    lineage = write_lineage_record(
        out_dir / LINEAGE_DIR,
        restore=restore,
        manifest_path=manifest_path,
        tiles=_tile_counts(manifest),
        folds_path=folds_path,
        params=config.to_dict(),
        libraries=metadata.versions,
        project_dir=project_dir,
    )
    mlflow.log_artifacts(str(lineage), LINEAGE_DIR)
    if not restore.restorable:
        log.warning("the data of this registration cannot be restored from the commit: %s", restore.reason)
    return restore


def _tile_counts(manifest: Any) -> dict[str, Any]:
    """Tiles, slides and patients of the data set, per class (for the lineage and the model card)."""
    real = manifest[~manifest["synthetic"]] if "synthetic" in manifest.columns else manifest
    return {
        "tiles": len(real),
        "slides": int(real["slide"].nunique()),
        "patients": int(real["case"].nunique()),
        "per_class": {str(k): int(v) for k, v in real["label"].value_counts().sort_index().items()},
    }


def _champion_document(
    config: Config,
    version: Any,
    alias: str,
    run_id: str,
    winner: _Winner,
    candidate: GateMetrics,
    champion_now: GateMetrics | None,
    decision: GateDecision,
) -> dict[str, Any]:
    """The content of ``champion.json`` (the caller adds ``test``)."""
    return {
        "model_name": config.register.model_name,
        "version": str(version.version),
        "alias": alias,
        "model_uri": f"models:/{config.register.model_name}@{alias}",
        "run_id": run_id,
        "cv_run_id": winner.cv["run_id"],
        "arch": winner.name,
        "selection": winner.reason,
        "gate": gate_document(candidate, champion_now, decision),
        "tracking_uri": mlflow.get_tracking_uri(),
    }


def _mirror(config: Config, project_dir: str | Path) -> Path | None:
    """The local mirror of the alias history (``register.promotion_log``)."""
    return Path(project_dir) / config.register.promotion_log if config.register.promotion_log else None


def _gate_tags(
    candidate: GateMetrics, champion: GateMetrics | None, decision: GateDecision, alias: str
) -> dict[str, str]:
    """Both sides' figures and the decision, as version tags."""
    return {
        **candidate.to_tags("candidate"),
        **({} if champion is None else champion.to_tags("champion")),
        **decision.to_tags(alias),
    }


def _restore_tags(restore: RestoreRecord) -> dict[str, str]:
    """Version tags that say at a glance whether the data can be restored from the recorded commit."""
    return {
        f"{TAG_PREFIX}data_tracked_by": restore.tracked_by,
        f"{TAG_PREFIX}data_restorable": str(restore.restorable).lower(),
        f"{TAG_PREFIX}git_dirty": str(restore.dirty).lower(),
        **({f"{TAG_PREFIX}data_restore_note": restore.reason[:5000]} if restore.reason else {}),
    }


def _log_refit_params(config: Config, winner: _Winner) -> None:
    """The refit run's params: the winner's training sections, referral and register, its arch and steps."""
    mlflow.log_params(
        {
            **flatten_params(config.for_arch(winner.name), (*TRAIN_SECTIONS, "referral", "register")),
            "arch": winner.name,
            "refit_steps": winner.cv["refit_steps"],
        }
    )


def _refit_tags(tags: dict[str, str], winner: _Winner, init: InitWeights) -> dict[str, str]:
    pipeline = pipeline_run()
    return {
        **tags,
        **{f"{TAG_PREFIX}pipeline.{k}": v for k, v in pipeline.items() if v},
        f"{TAG_PREFIX}stage": "register",
        f"{TAG_PREFIX}arch": winner.name,
        f"{TAG_PREFIX}cv_run_id": winner.cv["run_id"],
        INIT_TAG: init.tag,
    }


def _provenance(
    tags: dict[str, str], winner: _Winner, refit_run_id: str, init: InitWeights, candidate: GateMetrics
) -> dict[str, Any]:
    """What the bundle's metadata records about the training that made it."""
    return {
        **{k.removeprefix(TAG_PREFIX): v for k, v in tags.items() if k.startswith(TAG_PREFIX)},
        "cv_run_id": winner.cv["run_id"],
        "refit_run_id": refit_run_id,
        "refit_steps": winner.cv["refit_steps"],
        "init": init.tag,
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "temperature_at_bound": winner.referral.temperature_at_bound,
        "oof_f1_macro": winner.scores["f1_macro"],
        "oof_accuracy": winner.scores["accuracy"],
        "fold_f1_macro_mean": winner.scores["fold_f1_macro_mean"],
        "folds_digest": candidate.folds_digest,
        "selection": winner.reason,
    }


def _export_onnx(config: Config, model: nn.Module, metadata: ModelMetadata, data: TrainingSet, bundle: Path) -> bool:
    """For the service and small machines: the model as ONNX FP32 and INT8 inside its bundle, same preprocessing.

    Returns:
        Whether the files were written (``register.export_onnx``).
    """
    if not config.register.export_onnx:
        return False
    calibration = select_calibration_files(
        data.train_table, config.candidates.calibration_tiles, seed=config.train.seed
    )
    _, quantized = int8_classifier(
        with_views(model, metadata.views),
        metadata.preprocess,
        data.stain,
        calibration,
        bundle / ONNX_DIR,
        "model",
        classes=config.data.classes,
        max_tiles=config.candidates.calibration_tiles,
    )
    mlflow.set_tag(f"{TAG_PREFIX}int8_method", quantized.method)
    return True


def _finish_bundle(
    config: Config, winner: _Winner, bundle: Path, metadata: ModelMetadata, exported: bool
) -> ModelMetadata:
    """Record in the bundle what serving needs besides the model: input checks and which runtime answers."""
    runtime = decide_runtime(winner.name, winner.all_scores, config.serving.max_int8_drop, exported)
    log.info("serving runtime: %s (%s)", runtime["engine"], runtime["reason"])
    mlflow.set_tags(
        {f"{TAG_PREFIX}serving_runtime": runtime["engine"], f"{TAG_PREFIX}serving_reason": runtime["reason"]}
    )
    metadata = dataclasses.replace(
        metadata,
        input_checks={
            "min_size": config.validate.min_size,
            "min_tissue_fraction": config.validate.min_tissue_fraction,
        },
        runtime=runtime,
    )
    write_metadata(bundle, metadata)
    return metadata


def _score_held_out(
    predictor: Predictor, manifest: Any, folds: dict[str, Any], dataset_dir: Path, out_dir: Path
) -> dict[str, Any] | None:
    """Score the refit model once on the held-out test tiles (``split.test_fraction``); None without any."""
    test = held_out_rows(manifest, folds)
    if not len(test):
        return None
    scores = score_test_set(predictor, test, dataset_dir, predictor.metadata.classes)
    mlflow.log_metrics(
        {f"test_{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))}
        | {f"test_recall_{c}": float(v["recall"]) for c, v in scores["per_class"].items()}
    )
    write_json(out_dir / "test_metrics.json", scores)
    mlflow.log_artifact(str(out_dir / "test_metrics.json"), "evaluation")
    return scores


def _version_tags(
    tags: dict[str, str], winner: _Winner, init: InitWeights, test_scores: dict[str, Any] | None
) -> dict[str, str]:
    """The registry version's provenance and scores (the gate's tags are added by the caller)."""
    scores, referral = winner.scores, winner.referral
    out = {
        **tags,
        f"{TAG_PREFIX}arch": winner.name,
        f"{TAG_PREFIX}cv_run_id": winner.cv["run_id"],
        f"{TAG_PREFIX}oof_f1_macro": f"{scores['f1_macro']:.4f}",
        f"{TAG_PREFIX}fold_f1_macro_mean": f"{scores['fold_f1_macro_mean']:.4f}",
        f"{TAG_PREFIX}oof_accuracy": f"{scores['accuracy']:.4f}",
        f"{TAG_PREFIX}selection_reason": winner.reason,
        INIT_TAG: init.tag,
        f"{TAG_PREFIX}temperature": f"{referral.temperature:.4g}",
        f"{TAG_PREFIX}temperature_at_bound": str(referral.temperature_at_bound),
    }
    if test_scores is not None:
        out[f"{TAG_PREFIX}test_accuracy"] = f"{test_scores['accuracy']:.4f}"
    return out
