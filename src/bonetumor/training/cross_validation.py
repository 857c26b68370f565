"""Train: every candidate on every fold, the same way for all, tracked in MLflow.

The candidates are built by name from params.yaml (:func:`bonetumor.training.candidates.build_candidates`): the
colour-histogram baseline (the figure every network must beat), each architecture of ``train.architectures``, and
the models built beside them (two-stage, pruned VGG, INT8, the ensemble). This loop knows none of them by name. For
each fold it gathers the fold's tiles once (:class:`~bonetumor.training.candidates.FoldData`: validation rows,
GAN-balanced training table, early-stopping hold-out, and a stain target fitted on the fold's real training tiles
only), then asks every candidate in turn to fit on them, predicts the fold's validation tiles with the fitted
model (the out-of-fold predictions that evaluation scores), times it on fold 0, and lets it write its per-fold
artifacts (Grad-CAM galleries). A candidate built on others gets their fitted models of the same fold.

In MLflow every candidate has a parent run ``cv-<name>`` and a nested run per fold, tagged with where its starting
weights came from (``bonetumor.init``); the Great Expectations Data Docs of the data set are logged with each
parent. Fits checkpoint at every evaluation: a killed stage, rerun, resumes each fit where it stopped
(``train.checkpoint``). A candidate the data cannot train (:class:`CandidateUnavailableError`) is left out with its
reason in the log, on its run and in ``runs.json`` (``candidates_skipped``). The architectures' median best step
sets the length of the final refit on all tiles (:mod:`bonetumor.training.refit`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from bonetumor.config import Config, save_resolved
from bonetumor.data.datasets import load_training_table, split_tables
from bonetumor.data.manifest import read_manifest
from bonetumor.data.split import inner_split, read_folds
from bonetumor.evaluation.metrics import macro_f1
from bonetumor.faults import fault_point
from bonetumor.registry.tracking import (
    TAG_PREFIX,
    flatten_params,
    log_step_metrics,
    process_tags,
    provenance_tags,
    setup_mlflow,
)
from bonetumor.training.candidates import (
    Candidate,
    CandidateUnavailableError,
    FitContext,
    FittedModel,
    FoldData,
    build_candidates,
)
from bonetumor.training.candidates.network import INIT_TAG
from bonetumor.training.engine import select_device
from bonetumor.transforms.augment import AugmentPolicy, load_policy
from bonetumor.transforms.stain import fit_from_files
from bonetumor.utils import EtaTimer, atomic_dir, sha256_file, write_json

log = logging.getLogger(__name__)

RUNS_FILE = "runs.json"
TRAIN_SECTIONS = ("data", "preprocess", "split", "augment", "balance", "train")
__all__ = ["INIT_TAG", "RUNS_FILE", "TRAIN_SECTIONS", "early_stopping_split", "run_cross_validation"]


@dataclasses.dataclass
class _Plan:
    """What every fold of the stage shares: the data, the candidates, the tracking and the checkpoint key."""

    config: Config
    manifest: pd.DataFrame
    dataset_dir: Path
    folds: dict[str, Any]
    policy: AugmentPolicy
    balance_dir: Path
    device: torch.device
    candidates: list[Candidate]
    tags: dict[str, str]
    timer: EtaTimer
    fingerprint: str
    checkpoints: Path

    @property
    def n_folds(self) -> int:
        """Number of folds."""
        return len(self.folds["folds"])


@dataclasses.dataclass
class _Track:
    """One candidate's cross-validation so far: its parent run, out-of-fold parts and fold records."""

    candidate: Candidate
    run_id: str
    oof: list[pd.DataFrame] = dataclasses.field(default_factory=list)
    folds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    scores: list[float] = dataclasses.field(default_factory=list)
    latency_ms: float | None = None
    skipped: str | None = None


def run_cross_validation(
    config: Config,
    manifest_path: str | Path,
    folds_path: str | Path,
    policy_path: str | Path,
    balance_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path,
    validation_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit and score every candidate on every fold, and write their out-of-fold predictions.

    Args:
        config: The whole config.
        manifest_path: The data set manifest.
        folds_path: The folds file from the split stage.
        policy_path: The augmentation policy from the augment stage.
        balance_dir: The balance stage's output (one training manifest per fold).
        out_dir: Output folder: ``<candidate>/oof.csv`` for every candidate, ``<arch>/history.json``,
            ``<arch>/learning_curves.png``, ``<arch>/gradcam/`` and ``runs.json`` (MLflow run ids, initialisations,
            refit lengths and latencies for the evaluate and register stages).
        project_dir: Base folder for relative tracking URIs and the git commit.
        validation_dir: The validate stage's output; its report and Data Docs are logged with each run.

    Returns:
        The content of ``runs.json``.
    """
    plan = _plan(config, Path(manifest_path), Path(folds_path), Path(policy_path), Path(balance_dir), Path(out_dir))
    experiment_id = setup_mlflow(config.tracking, project_dir)
    # The process tags let the next run close these runs if this process is killed before it can.
    plan.tags = {**provenance_tags(config, manifest_path, project_dir), **process_tags()}
    _log_start(plan)
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, (*TRAIN_SECTIONS, "baseline", "candidates"))
        artifacts = [tmp / "config.resolved.yaml", Path(policy_path)]
        tracks = [_start_track(c, plan, artifacts, validation_dir) for c in plan.candidates]
        for fold_info in plan.folds["folds"]:
            _run_fold(plan, _fold_data(plan, int(fold_info["fold"])), tracks, tmp)
            fault_point("fold-end")
        runs = _runs_document(experiment_id, [_finish_track(t, plan, tmp) for t in tracks])
        write_json(tmp / RUNS_FILE, runs)
    shutil.rmtree(plan.checkpoints, ignore_errors=True)
    log.info("cross-validation finished in %.0fs", plan.timer.elapsed)
    return runs


def _plan(
    config: Config, manifest_path: Path, folds_path: Path, policy_path: Path, balance_dir: Path, out_dir: Path
) -> _Plan:
    """Read the stage's inputs, build the candidates, and fix the checkpoint fingerprint."""
    manifest = read_manifest(manifest_path)
    folds = read_folds(folds_path, manifest, manifest_path)
    policy = load_policy(policy_path)
    device = select_device(config.train.device)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    candidates = build_candidates(config)
    n_folds = len(folds["folds"])
    summary = balance_dir / "summary.json"
    # What the folds compute depends on these; a checkpoint made from anything else is not resumed.
    parts = [
        config.section_hash(*TRAIN_SECTIONS, "evaluate"),
        policy.digest(),
        sha256_file(folds_path),
        sha256_file(summary) if summary.is_file() else "",
        json.dumps({c.name: c.run_tags().get(INIT_TAG, "") for c in candidates}, sort_keys=True),
    ]
    return _Plan(
        config=config,
        manifest=manifest,
        dataset_dir=manifest_path.parent,
        folds=folds,
        policy=policy,
        balance_dir=balance_dir,
        device=device,
        candidates=candidates,
        tags={},
        timer=EtaTimer(sum(c.planned_steps(config, n_folds) for c in candidates)),
        fingerprint=hashlib.sha256("|".join(parts).encode()).hexdigest()[:16],
        # Outside the atomic output folder, which a killed run discards.
        checkpoints=out_dir.parent / f".{out_dir.name}.checkpoints",
    )


def _log_start(plan: _Plan) -> None:
    config = plan.config
    log.info(
        "cross-validating %s on %d folds on %s (optimiser steps per fold %s); initialisation %s; policy %s",
        [c.name for c in plan.candidates],
        plan.n_folds,
        plan.device,
        {a: config.for_arch(a).train.steps for a in config.train.architectures},
        {c.name: c.run_tags()[INIT_TAG] for c in plan.candidates if INIT_TAG in c.run_tags()},
        plan.policy.digest(),
    )


def _start_track(
    candidate: Candidate, plan: _Plan, artifacts: Sequence[Path], validation_dir: str | Path | None
) -> _Track:
    """Open the candidate's parent run: its params, the resolved config, the policy and the data validation."""
    tags = {**plan.tags, **candidate.run_tags(), f"{TAG_PREFIX}stage": "train", f"{TAG_PREFIX}arch": candidate.name}
    with mlflow.start_run(run_name=f"cv-{candidate.name}", tags=tags) as run:
        config = candidate.settings(plan.config)
        mlflow.log_params(
            {
                **flatten_params(config, candidate.param_sections),
                **candidate.mlflow_params(config),
                "arch": candidate.name,
                "augment.policy_digest": plan.policy.digest(),
            }
        )
        for artifact in artifacts:
            if artifact.is_file():
                mlflow.log_artifact(str(artifact))
        _log_validation(None if validation_dir is None else Path(validation_dir))
    # Open until its cross-validation finishes (_finish_track): a process killed meanwhile leaves it RUNNING, and the
    # next run marks it FAILED (close_interrupted_runs) instead of it reading as a finished cross-validation.
    MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return _Track(candidate, run.info.run_id)


def _fold_data(plan: _Plan, fold: int) -> FoldData:
    """Return one fold's tiles; every candidate of the fold trains from exactly these.

    The stain target is fitted on the fold's real training tiles only: the validation tiles never inform it.
    """
    config = plan.config
    _, val_rows = split_tables(plan.manifest, plan.folds, fold)
    train_table = load_training_table(plan.balance_dir, f"fold-{fold}", plan.dataset_dir)
    fit_table, stop_rows = early_stopping_split(train_table, config, seed=config.train.seed + fold)
    real_train = train_table.loc[~train_table["synthetic"], "file"]
    stain = fit_from_files(plan.policy.stain_normalization, list(real_train), seed=config.train.seed + fold)
    info = plan.folds["folds"][fold]
    return FoldData(
        name=f"fold-{fold}",
        train_table=train_table,
        fit_table=fit_table,
        stop_rows=stop_rows,
        stain=stain,
        seed=config.train.seed + fold,
        fold=fold,
        n_folds=plan.n_folds,
        val_rows=val_rows,
        val_groups=tuple(info["val_groups"]),
        dataset_dir=plan.dataset_dir,
    )


def _run_fold(plan: _Plan, fold: FoldData, tracks: list[_Track], out_root: Path) -> None:
    """Fit every candidate still in the running on one fold, each after the ones it is built on."""
    fitted: dict[str, FittedModel] = {}
    # Per fold: the INT8 candidates' ONNX files (about 100 MB each) live only as long as the fold.
    with tempfile.TemporaryDirectory(prefix="bonetumor-fold-") as scratch:
        for track in tracks:
            candidate = track.candidate
            if track.skipped is not None or any(base not in fitted for base in candidate.bases):
                if track.skipped is None:
                    track.skipped = f"fold {fold.fold}: built on {list(candidate.bases)}, which were left out"
                continue
            context = FitContext(
                config=plan.config,
                policy=plan.policy,
                device=plan.device,
                timer=plan.timer,
                checkpoints=plan.checkpoints / candidate.name / f"fold-{fold.fold}",
                fingerprint=f"{plan.fingerprint}-{candidate.name}-{fold.fold}",
                on_eval=log_step_metrics,
                scratch=Path(scratch) / candidate.name,
            )
            context.scratch.mkdir()
            model = _fit_and_score(track, fold, context, fitted, plan, out_root / candidate.name)
            if model is not None:
                fitted[candidate.name] = model


def _fit_and_score(
    track: _Track,
    fold: FoldData,
    context: FitContext,
    fitted: dict[str, FittedModel],
    plan: _Plan,
    out_dir: Path,
) -> FittedModel | None:
    """Fit one candidate on one fold in its nested run, and record its out-of-fold predictions and scores."""
    candidate, classes = track.candidate, plan.config.data.classes
    tags = {**plan.tags, **candidate.run_tags(), f"{TAG_PREFIX}fold": str(fold.fold)}
    with mlflow.start_run(run_name=f"cv-{candidate.name}-fold{fold.fold}", parent_run_id=track.run_id, tags=tags):
        mlflow.log_params(_fold_params(fold))
        try:
            model = candidate.fit(fold, context, {name: fitted[name] for name in candidate.bases})
        except CandidateUnavailableError as exc:
            log.warning("%s left out: fold %d: %s", candidate.name, fold.fold, exc)
            mlflow.set_tag(f"{TAG_PREFIX}skipped", str(exc)[:5000])
            track.skipped = f"fold {fold.fold}: {exc}"
            return None
        logits = model.logits(fold.val_files)
        truth = fold.val_labels(classes)
        predictions = logits.argmax(1)
        track.scores.append(macro_f1(truth, predictions))
        mlflow.log_metrics(
            {
                **model.metrics(),
                "fold_accuracy": float(np.mean(predictions == truth)),
                "fold_macro_f1": track.scores[-1],
            }
        )
        mlflow.set_tags(model.tags())
        track.oof.append(oof_frame(fold.val_rows, fold.fold, logits, classes))
        out_dir.mkdir(parents=True, exist_ok=True)
        for artifact, folder in candidate.after_fold(model, fold, track.oof[-1], out_dir):
            mlflow.log_artifact(str(artifact), folder)
        if fold.fold == 0:
            config = candidate.settings(plan.config)
            track.latency_ms = model.latency_ms(config.preprocess.tile_size, config.candidates.latency_batch)
        run = mlflow.active_run()
        record = candidate.fold_record(model, fold)
        track.folds.append({"fold": fold.fold, "run_id": run.info.run_id if run else "", **record})
    # Through the client: reopening the parent run would mark it FINISHED at the end of the block.
    MlflowClient().log_metric(track.run_id, "fold_macro_f1", track.scores[-1], step=fold.fold)
    return model


def _fold_params(fold: FoldData) -> dict[str, Any]:
    return {
        "fold": fold.fold,
        "n_train_real": int((~fold.fit_table["synthetic"]).sum()),
        "n_train_synthetic": int(fold.fit_table["synthetic"].sum()),
        "n_early_stopping": 0 if fold.stop_rows is None else len(fold.stop_rows),
        "n_val": len(fold.val_rows),
        "val_groups": ",".join(fold.val_groups)[:6000],
    }


def _finish_track(track: _Track, plan: _Plan, out_root: Path) -> tuple[_Track, dict[str, Any] | None]:
    """Write the candidate's out-of-fold file and summary, log them on its parent run; None when left out."""
    candidate = track.candidate
    with mlflow.start_run(run_id=track.run_id):
        out_dir = out_root / candidate.name
        if track.skipped is not None:
            mlflow.set_tag(f"{TAG_PREFIX}skipped", track.skipped[:5000])
            shutil.rmtree(out_dir, ignore_errors=True)  # a partial candidate leaves nothing to mistake for results
            return track, None
        out_dir.mkdir(parents=True, exist_ok=True)
        oof = pd.concat(track.oof).sort_values("path").reset_index(drop=True)
        oof.to_csv(out_dir / "oof.csv", index=False)
        entry = {"run_id": track.run_id, **candidate.summary(track.folds, track.scores, out_dir)}
        mlflow.log_artifact(str(out_dir / "oof.csv"))
        for artifact, folder in candidate.summary_artifacts(out_dir):
            if artifact.is_dir():
                mlflow.log_artifacts(str(artifact), folder)
            elif artifact.is_file():
                mlflow.log_artifact(str(artifact), folder)
        if "refit_steps" in entry:
            mlflow.log_metric("refit_steps", entry["refit_steps"])
    log.info(
        "%s: per-fold macro-F1 %s, mean %.3f",
        candidate.name,
        [round(f, 3) for f in track.scores],
        float(np.mean(track.scores)),
    )
    return track, entry


def _runs_document(experiment_id: str, finished: list[tuple[_Track, dict[str, Any] | None]]) -> dict[str, Any]:
    """Return runs.json: each candidate's entry in its section, latencies, initialisations, skipped ones."""
    runs: dict[str, Any] = {
        "experiment_id": experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
        "architectures": {},
        # Models built beside the architectures, scored on the same folds: name -> base, kind, MLflow run.
        "candidates": {},
        # CPU milliseconds per tile of every model (fold 0's), batch candidates.latency_batch.
        "latency_ms": {},
        "init": {},
    }
    for track, entry in finished:
        candidate = track.candidate
        if INIT_TAG in candidate.run_tags() and candidate.section == "architectures":
            runs["init"][candidate.name] = candidate.run_tags()[INIT_TAG]
        if entry is None:
            runs.setdefault("candidates_skipped", {})[candidate.name] = track.skipped
            continue
        if candidate.section == "baseline":
            runs["baseline"] = entry
        else:
            runs[candidate.section][candidate.name] = entry
        if track.latency_ms is not None:
            runs["latency_ms"][candidate.name] = track.latency_ms
    return runs


def _log_validation(validation_dir: Path | None) -> None:
    """Log the data validation report and its Data Docs with the active run (what data this run trusted)."""
    if validation_dir is None:
        return
    report = validation_dir / "report.json"
    if report.is_file():
        mlflow.log_artifact(str(report), "data_validation")
    docs = validation_dir / "data_docs"
    if docs.is_dir():
        mlflow.log_artifacts(str(docs), "data_validation/data_docs")


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


def oof_frame(val_rows: pd.DataFrame, fold: int, logits: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Return the out-of-fold rows of one fold: tile, truth, fold, prediction, probabilities and logits."""
    # float32 softmax, as the logits are: the written probabilities are the ones the model's own softmax gives.
    probs = torch.softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=1).numpy()
    frame = pd.DataFrame(
        {
            "path": val_rows["path"].to_numpy(),
            "label": val_rows["label"].to_numpy(),
            "slide": val_rows["slide"].to_numpy(),
            "case": val_rows["case"].to_numpy(),
            "fold": fold,
            "prediction": [classes[i] for i in probs.argmax(1)],
        }
    )
    for i, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, i]
    for i, name in enumerate(classes):
        frame[f"logit_{name}"] = logits[:, i]
    return frame
