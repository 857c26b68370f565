"""Train: the baseline and every architecture on every fold, with early stopping, tracked in MLflow.

The loop is in ``engine``. First the colour-histogram baseline (:mod:`bonetumor.training.baseline`) is fitted and scored
on every fold: the figure every network must beat. Then, per architecture, one parent MLflow run holds the
cross-validation; each fold is a nested run with metrics per evaluation step. Each fold early-stops on a grouped
hold-out of its own training slides (``train.inner_val_fraction``); the model of its best step (by
``train.monitor``) then predicts the fold's validation tiles once, through its test-time views, which gives the
out-of-fold predictions that evaluation scores. The median best step sets the length of the final refit on all
tiles (see ``register``).

Each fold fits its own stain-normalisation target on its own training tiles (the validation tiles never inform
it), draws a Grad-CAM gallery of a few of its validation tiles with its own model, and checkpoints at every
evaluation: a killed stage, rerun, resumes each fold where it stopped (``train.checkpoint``). The Great
Expectations Data Docs of the data set are logged with every architecture's run. Where each architecture's
starting weights came from (``train.weights``; ``auto`` may fall back to random initialisation) is tagged on
every run as ``bonetumor.init``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from bonetumor.config import Config, save_resolved
from bonetumor.data.datasets import label_indices, load_training_table, split_tables
from bonetumor.data.manifest import read_manifest, resolve_paths
from bonetumor.data.split import inner_split, read_folds
from bonetumor.errors import DatasetError
from bonetumor.evaluation.gradcam import gradcam_gallery, select_gallery_tiles
from bonetumor.evaluation.metrics import macro_f1
from bonetumor.registry.tracking import TAG_PREFIX, flatten_params, log_step_metrics, provenance_tags, setup_mlflow
from bonetumor.training.baseline import BASELINE, HistogramForest
from bonetumor.training.baseline import describe as describe_baseline
from bonetumor.training.candidates import (
    INT8,
    PRUNABLE_ARCHITECTURES,
    PRUNED,
    TWO_STAGE,
    candidate_name,
    cpu_latency_ms,
    fit_pruned_vgg,
    fit_two_stage,
    int8_classifier,
    onnx_logits,
    select_calibration_files,
)
from bonetumor.training.engine import (
    FitResult,
    eval_dataset,
    fit,
    plot_history,
    predict_logits,
    select_device,
    training_dataset,
)
from bonetumor.training.models import InitWeights, build_model, resolve_weights
from bonetumor.transforms.augment import AugmentPolicy, load_policy
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.stain import StainNormalizer, fit_from_files
from bonetumor.transforms.tta import TestTimeViews, with_views
from bonetumor.utils import EtaTimer, atomic_dir, seed_everything, sha256_file, write_json

log = logging.getLogger(__name__)

RUNS_FILE = "runs.json"
TRAIN_SECTIONS = ("data", "preprocess", "split", "augment", "balance", "train")
#: Tag naming where a model's starting weights came from, e.g. ``scratch (no ImageNet weights available)``.
INIT_TAG = f"{TAG_PREFIX}init"


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
    """Fit the baseline and train every architecture on every fold, and write out-of-fold predictions.

    Args:
        config: The whole config (train, preprocess, baseline, data, tracking sections are used).
        manifest_path: The data set manifest.
        folds_path: The folds file from the split stage.
        policy_path: The augmentation policy from the augment stage.
        balance_dir: The balance stage's output (one training manifest per fold).
        out_dir: Output folder: ``<arch>/oof.csv``, ``<arch>/history.json``, ``<arch>/learning_curves.png``,
            ``baseline/oof.csv`` and ``runs.json`` (MLflow run ids, initialisations and refit lengths for the
            evaluate and register stages).
        project_dir: Base folder for relative tracking URIs and the git commit.
        validation_dir: The validate stage's output; its report and Data Docs are logged with each run.

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
    # Decided once per architecture: a fallback to random initialisation warns once and is tagged everywhere.
    init_archs = [*config.train.architectures]
    if config.candidates.two_stage and config.candidates.two_stage_arch not in init_archs:
        init_archs.append(config.candidates.two_stage_arch)
    inits = {arch: resolve_weights(arch, config.train.weights) for arch in init_archs}
    timer = EtaTimer(_total_steps(config, n_folds))
    log.info(
        "training %s on %d folds (%s optimiser steps each) on %s; initialisation %s; policy %s",
        list(config.train.architectures),
        n_folds,
        {a: config.for_arch(a).train.steps for a in config.train.architectures},
        device,
        {a: i.tag for a, i in inits.items()},
        policy.digest(),
    )
    runs: dict[str, Any] = {
        "experiment_id": experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
        "architectures": {},
        # Models built beside the architectures, scored on the same folds: name -> base, kind, MLflow run.
        "candidates": {},
        # CPU milliseconds per tile of every model (fold 0's), batch candidates.latency_batch.
        "latency_ms": {},
        "init": {arch: init.tag for arch, init in inits.items()},
    }
    # Checkpoints live outside the atomic output folder, which a killed run discards.
    out_dir = Path(out_dir)
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints"
    # What the folds compute depends on these; a checkpoint made from anything else is not resumed.
    fingerprint = hashlib.sha256(
        "|".join(
            [
                config.section_hash(*TRAIN_SECTIONS, "evaluate"),
                policy.digest(),
                sha256_file(folds_path),
                sha256_file(Path(balance_dir) / "summary.json")
                if (Path(balance_dir) / "summary.json").is_file()
                else "",
                json.dumps({a: i.tag for a, i in inits.items()}, sort_keys=True),
            ]
        ).encode()
    ).hexdigest()[:16]
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, (*TRAIN_SECTIONS, "baseline"))
        runs["baseline"] = _cross_validate_baseline(
            config, manifest, dataset_dir, folds, policy, Path(balance_dir), tmp / BASELINE, tags
        )
        for arch in config.train.architectures:
            runs["architectures"][arch] = _cross_validate_arch(
                arch,
                config.for_arch(arch),
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
                None if validation_dir is None else Path(validation_dir),
                checkpoints / arch,
                fingerprint,
                runs,
                inits[arch],
            )
        if config.candidates.two_stage:
            _cross_validate_two_stage(
                config.for_arch(config.candidates.two_stage_arch),
                manifest,
                dataset_dir,
                folds,
                policy,
                Path(balance_dir),
                tmp,
                device,
                tags,
                timer,
                runs,
                checkpoints,
                fingerprint,
                inits[config.candidates.two_stage_arch],
            )
        write_json(tmp / RUNS_FILE, runs)
    shutil.rmtree(checkpoints, ignore_errors=True)
    log.info("cross-validation finished in %.0fs", timer.elapsed)
    return runs


def _cross_validate_baseline(
    config: Config,
    manifest: pd.DataFrame,
    dataset_dir: Path,
    folds: dict[str, Any],
    policy: AugmentPolicy,
    balance_dir: Path,
    out_dir: Path,
    tags: dict[str, str],
) -> dict[str, Any]:
    """Fit and score the colour-histogram baseline on every fold (real training tiles, the fold's stain target)."""
    classes = config.data.classes
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[pd.DataFrame] = []
    fold_f1: list[float] = []
    with mlflow.start_run(
        run_name=f"cv-{BASELINE}", tags={**tags, f"{TAG_PREFIX}stage": "train", f"{TAG_PREFIX}arch": BASELINE}
    ) as run:
        mlflow.log_params(
            {**flatten_params(config, ("data", "augment", "baseline")), "arch": BASELINE}
            | {f"baseline.{k}": v for k, v in describe_baseline(config.baseline).items()}
        )
        for fold_info in folds["folds"]:
            k = int(fold_info["fold"])
            val_rows, train_table, _, _, stain = _fold_inputs(
                config, manifest, dataset_dir, folds, policy, balance_dir, k
            )
            # Real tiles only: the networks' GAN tiles are there to balance a loss; a forest needs no such help.
            real = train_table[~train_table["synthetic"]]
            forest = HistogramForest(config.baseline, classes, stain).fit(
                list(real["file"]), label_indices(real["label"], classes)
            )
            logits = forest.logits(resolve_paths(val_rows, dataset_dir))
            truth = label_indices(val_rows["label"], classes)
            fold_f1.append(macro_f1(truth, logits.argmax(1)))
            mlflow.log_metric("fold_macro_f1", fold_f1[-1], step=k)
            parts.append(_oof_frame(val_rows, k, logits, classes))
        oof = pd.concat(parts).sort_values("path").reset_index(drop=True)
        oof.to_csv(out_dir / "oof.csv", index=False)
        mlflow.log_artifact(str(out_dir / "oof.csv"))
    log.info(
        "baseline (colour-histogram random forest): per-fold macro-F1 %s, mean %.3f",
        [round(f, 3) for f in fold_f1],
        statistics.fmean(fold_f1),
    )
    return {"run_id": run.info.run_id, "fold_macro_f1": fold_f1}


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
    validation_dir: Path | None,
    checkpoints: Path,
    fingerprint: str,
    runs: dict[str, Any],
    init: InitWeights,
) -> dict[str, Any]:
    """Cross-validate one architecture; ``config`` is already ``config.for_arch(arch)``."""
    classes = config.data.classes
    views = TestTimeViews.from_config(config.preprocess)
    candidate_parts: dict[str, list[pd.DataFrame]] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    n_folds = len(folds["folds"])
    oof_parts: list[pd.DataFrame] = []
    histories: dict[str, list[dict[str, float]]] = {}
    fold_runs: list[dict[str, Any]] = []
    arch_tags = {**tags, f"{TAG_PREFIX}init": init.tag}
    with mlflow.start_run(
        run_name=f"cv-{arch}", tags={**arch_tags, f"{TAG_PREFIX}stage": "train", f"{TAG_PREFIX}arch": arch}
    ) as parent:
        mlflow.log_params(
            {**flatten_params(config, TRAIN_SECTIONS), "arch": arch, "augment.policy_digest": policy.digest()}
        )
        for artifact in artifacts:
            if artifact.is_file():
                mlflow.log_artifact(str(artifact))
        _log_validation(validation_dir)
        for fold_info in folds["folds"]:
            k = int(fold_info["fold"])
            name = f"{arch} fold {k + 1}/{n_folds}"
            val_rows, train_table, fit_table, stop_rows, stain = _fold_inputs(
                config, manifest, dataset_dir, folds, policy, balance_dir, k
            )
            train_set = training_dataset(fit_table, config, policy, stain=stain)
            stop_set = (
                None
                if stop_rows is None
                else eval_dataset(list(stop_rows["file"]), list(stop_rows["label"]), config, stain=stain)
            )
            val_set = eval_dataset(resolve_paths(val_rows, dataset_dir), list(val_rows["label"]), config, stain=stain)
            seed_everything(config.train.seed + k)
            model = build_model(arch, len(classes), config.train.dropout, init, config.train.trainable)
            with mlflow.start_run(
                run_name=f"cv-{arch}-fold{k}", nested=True, tags={**arch_tags, f"{TAG_PREFIX}fold": str(k)}
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
                # val_* metrics per evaluation are the early-stopping set's; the fold's own validation tiles are
                # predicted once, with the chosen step, and only scored (fold_* metrics, oof.csv).
                result = fit(
                    model,
                    train_set,
                    stop_set,
                    config.train,
                    device,
                    config.train.steps,
                    name,
                    log_step_metrics,
                    timer,
                    arch=arch,
                    checkpoint_dir=checkpoints / f"fold-{k}" if config.train.checkpoint else None,
                    fingerprint=f"{fingerprint}-{arch}-{k}",
                    views=views,
                )
                logits = predict_logits(result.model, val_set, config.train, device, views)
                best = next(h for h in result.history if h["step"] == result.best_step)
                predictions = logits.argmax(1)
                mlflow.log_metrics(
                    {
                        "best_step": result.best_step,
                        **{f"best_{k2}": v for k2, v in best.items() if k2.startswith("val_")},
                        "fold_accuracy": float(np.mean(predictions == np.array(val_set.labels))),
                        "fold_macro_f1": macro_f1(val_set.labels, predictions),
                    }
                )
                fold_oof = _oof_frame(val_rows, k, logits, classes)
                if config.evaluate.gradcam_per_class:
                    gallery = _gradcam(
                        result.model, arch, fold_oof, config, stain, device, dataset_dir, out_dir, k, views
                    )
                    mlflow.log_artifact(str(gallery), "gradcam")
                if k == 0:
                    runs["latency_ms"][arch] = cpu_latency_ms(
                        with_views(result.model, views), config.preprocess.tile_size, config.candidates.latency_batch
                    )
                extra = _fold_candidates(
                    arch,
                    result.model,
                    config,
                    train_table,
                    train_set,
                    stop_set,
                    val_set,
                    val_rows,
                    stain,
                    device,
                    dataset_dir,
                    name,
                    timer,
                    k,
                    runs["latency_ms"],
                    views,
                )
                for candidate, candidate_logits in extra.items():
                    candidate_parts.setdefault(candidate, []).append(_oof_frame(val_rows, k, candidate_logits, classes))
                    mlflow.log_metric(
                        f"{candidate}_fold_macro_f1", macro_f1(val_set.labels, candidate_logits.argmax(1))
                    )
            fold_runs.append(
                {
                    "fold": k,
                    "run_id": run.info.run_id,
                    "best_step": result.best_step,
                    "stopped_early": result.stopped_early,
                    "resumed_steps": result.resumed_from,
                    "stain": None if stain is None else stain.to_dict(),
                }
            )
            histories[f"fold {k}"] = result.history
            oof_parts.append(fold_oof)
        oof = pd.concat(oof_parts).sort_values("path").reset_index(drop=True)
        oof.to_csv(out_dir / "oof.csv", index=False)
        write_json(out_dir / "history.json", {"folds": fold_runs, "history": histories})
        curves = plot_history(histories, f"{arch}: {n_folds}-fold cross-validation", out_dir / "learning_curves.png")
        mlflow.log_artifact(str(curves))
        mlflow.log_artifact(str(out_dir / "oof.csv"))
        if (out_dir / "gradcam").is_dir():
            mlflow.log_artifacts(str(out_dir / "gradcam"), "gradcam")
        best_steps = [f["best_step"] for f in fold_runs]
        refit_steps = max(1, math.ceil(statistics.median(best_steps)))
        mlflow.log_metric("refit_steps", refit_steps)
        for candidate, parts in candidate_parts.items():
            path = out_dir.parent / candidate / "oof.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            pd.concat(parts).sort_values("path").reset_index(drop=True).to_csv(path, index=False)
            mlflow.log_artifact(str(path), f"candidates/{candidate}")
            kind = PRUNED if candidate == candidate_name(PRUNED, arch) else INT8
            runs["candidates"][candidate] = {"base": arch, "kind": kind, "run_id": parent.info.run_id}
    return {"run_id": parent.info.run_id, "folds": fold_runs, "refit_steps": refit_steps, "init": init.tag}


def _total_steps(config: Config, n_folds: int) -> int:
    """Optimiser steps the train stage will run (at most), for the ETA: architectures, then candidates."""
    total = sum(n_folds * config.for_arch(arch).train.steps for arch in config.train.architectures)
    if config.candidates.two_stage:
        total += 2 * n_folds * config.for_arch(config.candidates.two_stage_arch).train.steps
    if config.candidates.pruned_vgg19:
        total += (
            n_folds
            * config.candidates.prune_finetune_steps
            * sum(arch in PRUNABLE_ARCHITECTURES for arch in config.train.architectures)
        )
    return total


def _fold_candidates(
    arch: str,
    model: torch.nn.Module,
    config: Config,
    train_table: pd.DataFrame,
    train_set: Any,
    stop_set: Any,
    val_set: Any,
    val_rows: pd.DataFrame,
    stain: StainNormalizer | None,
    device: torch.device,
    dataset_dir: Path,
    name: str,
    timer: EtaTimer,
    fold: int,
    latency: dict[str, float],
    views: TestTimeViews,
) -> dict[str, np.ndarray]:
    """Build and score the candidates derived from one fold's trained model: pruned VGG19 and INT8 ONNX.

    Returns:
        Candidate name to the fold's validation logits (through the test-time views, like the model's own).
    """
    out: dict[str, np.ndarray] = {}
    size, batch = config.preprocess.tile_size, config.candidates.latency_batch
    if config.candidates.pruned_vgg19 and arch in PRUNABLE_ARCHITECTURES:
        pruned_name = candidate_name(PRUNED, arch)
        pruned, summary = fit_pruned_vgg(
            model, arch, train_set, stop_set, config, device, f"{name} pruned", timer, views=views
        )
        out[pruned_name] = predict_logits(pruned, val_set, config.train, device, views)
        mlflow.log_metrics({"pruned_params_ratio": summary.params_ratio, "pruned_macs_ratio": summary.macs_ratio})
        if fold == 0:
            latency[pruned_name] = cpu_latency_ms(with_views(pruned, views), size, batch)
    if config.candidates.int8:
        int8_name = candidate_name(INT8, arch)
        calibration = select_calibration_files(train_table, config.candidates.calibration_tiles, seed=config.train.seed)
        # The ONNX files are rebuilt from the fold model on demand; keeping ~100 MB per fold would only fill disks.
        with tempfile.TemporaryDirectory(prefix="bonetumor-int8-") as scratch:
            classifier, quantized = int8_classifier(
                with_views(model, views),
                config.preprocess,
                stain,
                calibration,
                Path(scratch),
                f"{arch}-fold{fold}",
                classes=config.data.classes,
                max_tiles=config.candidates.calibration_tiles,
            )
            out[int8_name] = onnx_logits(classifier, resolve_paths(val_rows, dataset_dir))
            if fold == 0:
                latency[int8_name] = cpu_latency_ms(classifier, size, batch)
        mlflow.set_tag(f"bonetumor.{int8_name}.method", quantized.method)
    return out


def _cross_validate_two_stage(
    config: Config,
    manifest: pd.DataFrame,
    dataset_dir: Path,
    folds: dict[str, Any],
    policy: AugmentPolicy,
    balance_dir: Path,
    out_root: Path,
    device: torch.device,
    tags: dict[str, str],
    timer: EtaTimer,
    runs: dict[str, Any],
    checkpoints: Path,
    fingerprint: str,
    init: InitWeights,
) -> None:
    """Cross-validate the paper's two-stage classifier on the same folds, with the same stain and augmentation.

    A fold whose training tiles lack a class of one stage cannot train that stage. The candidate is then left
    out (the plain architectures are unaffected): the reason goes to the log, the MLflow run and
    ``runs.json`` (``candidates_skipped``).
    """
    arch = config.candidates.two_stage_arch
    name = candidate_name(TWO_STAGE, arch)
    classes = config.data.classes
    views = TestTimeViews.from_config(config.preprocess)
    n_folds = len(folds["folds"])
    parts: list[pd.DataFrame] = []
    stage_tags = {**tags, f"{TAG_PREFIX}init": init.tag}
    with mlflow.start_run(
        run_name=f"cv-{name}", tags={**stage_tags, f"{TAG_PREFIX}stage": "train", f"{TAG_PREFIX}arch": name}
    ) as parent:
        mlflow.log_params({**flatten_params(config, (*TRAIN_SECTIONS, "candidates")), "arch": name})
        for fold_info in folds["folds"]:
            k = int(fold_info["fold"])
            val_rows, _, fit_table, stop_rows, stain = _fold_inputs(
                config, manifest, dataset_dir, folds, policy, balance_dir, k
            )
            with mlflow.start_run(
                run_name=f"cv-{name}-fold{k}", nested=True, tags={**stage_tags, f"{TAG_PREFIX}fold": str(k)}
            ):
                try:
                    model = fit_two_stage(
                        arch,
                        fit_table,
                        stop_rows,
                        config,
                        policy,
                        stain,
                        device,
                        f"{name} fold {k + 1}/{n_folds}",
                        timer,
                        seed=config.train.seed + k,
                        on_eval=log_step_metrics,
                        checkpoint_dir=checkpoints / name / f"fold-{k}" if config.train.checkpoint else None,
                        fingerprint=f"{fingerprint}-{name}-{k}",
                        init=init,
                    )
                except DatasetError as exc:
                    log.warning("%s left out: fold %d: %s", name, k, exc)
                    mlflow.set_tag("bonetumor.skipped", str(exc)[:5000])
                    runs.setdefault("candidates_skipped", {})[name] = f"fold {k}: {exc}"
                    return
                val_set = eval_dataset(
                    resolve_paths(val_rows, dataset_dir), list(val_rows["label"]), config, stain=stain
                )
                logits = predict_logits(model, val_set, config.train, device, views)
                mlflow.log_metric("fold_macro_f1", macro_f1(val_set.labels, logits.argmax(1)))
                if k == 0:
                    runs["latency_ms"][name] = cpu_latency_ms(
                        with_views(model, views), config.preprocess.tile_size, config.candidates.latency_batch
                    )
            parts.append(_oof_frame(val_rows, k, logits, classes))
        path = out_root / name / "oof.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.concat(parts).sort_values("path").reset_index(drop=True).to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    runs["candidates"][name] = {"base": arch, "kind": TWO_STAGE, "run_id": parent.info.run_id}


def _fold_inputs(
    config: Config,
    manifest: pd.DataFrame,
    dataset_dir: Path,
    folds: dict[str, Any],
    policy: AugmentPolicy,
    balance_dir: Path,
    fold: int,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame | None, StainNormalizer | None]:
    """Return one fold's validation rows, balanced training table, fit and early-stopping rows, and stain target.

    Every model of the fold (architectures and candidates) trains from exactly these. The stain target is fitted
    on the fold's real training tiles only.
    """
    _, val_rows = split_tables(manifest, folds, fold)
    train_table = load_training_table(balance_dir, f"fold-{fold}", dataset_dir)
    fit_table, stop_rows = early_stopping_split(train_table, config, seed=config.train.seed + fold)
    real_train = train_table.loc[~train_table["synthetic"], "file"]
    stain = fit_from_files(policy.stain_normalization, list(real_train), seed=config.train.seed + fold)
    return val_rows, train_table, fit_table, stop_rows, stain


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


def _gradcam(
    model: torch.nn.Module,
    arch: str,
    fold_oof: pd.DataFrame,
    config: Config,
    stain: StainNormalizer | None,
    device: torch.device,
    dataset_dir: Path,
    out_dir: Path,
    fold: int,
    views: TestTimeViews,
) -> Path:
    """Draw Grad-CAM on a few of the fold's validation tiles per class, with the fold's own model and views."""
    chosen = select_gallery_tiles(fold_oof, config.evaluate.gradcam_per_class, seed=config.train.seed + fold)
    (out_dir / "gradcam").mkdir(parents=True, exist_ok=True)
    return gradcam_gallery(
        model,
        arch,
        resolve_paths(chosen, dataset_dir),
        list(chosen["label"]),
        config.data.classes,
        build_eval_transform(config.preprocess, stain=stain),
        out_dir / "gradcam" / f"fold-{fold}.png",
        device=str(device),
        title=f"{arch} fold {fold}: Grad-CAM on validation tiles (final conv block, mean over {views.count} views)",
        views=views,
    )


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
    steps: int,
    balance_dir: str | Path,
    dataset_dir: str | Path,
    policy: AugmentPolicy,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    stain: StainNormalizer | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    init: InitWeights | None = None,
) -> FitResult:
    """Train ``arch`` on every training tile (the balanced ``full`` set) for a fixed number of optimiser steps.

    ``config`` is the architecture's (``config.for_arch(arch)``). ``stain`` is the normaliser fitted on those tiles;
    the served model carries the same one. With a ``checkpoint_dir`` (and ``train.checkpoint``), a killed refit
    resumes from its last checkpoint. ``init`` is where its weights start (resolved from ``train.weights`` when
    None).

    The schedule spans ``train.steps`` as in the folds, so step ``s`` of the refit uses the learning rate step
    ``s`` of a fold used, and it stops at the folds' median best step.
    """
    device = select_device(config.train.device)
    table = load_training_table(balance_dir, "full", dataset_dir)
    train_set = training_dataset(table, config, policy, stain=stain)
    seed_everything(config.train.seed)
    model = build_model(
        arch,
        len(config.data.classes),
        config.train.dropout,
        init if init is not None else config.train.weights,
        config.train.trainable,
    )
    timer = EtaTimer(steps)
    name = f"{arch} refit on all tiles"
    return fit(
        model,
        train_set,
        None,
        config.train,
        device,
        steps,
        name,
        on_eval,
        timer,
        config.train.steps,
        arch=arch,
        checkpoint_dir=checkpoint_dir if config.train.checkpoint else None,
        fingerprint=fingerprint,
    )
