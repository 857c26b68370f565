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
from bonetumor.data.datasets import label_indices, load_training_table, split_tables
from bonetumor.data.manifest import read_manifest
from bonetumor.data.split import inner_split, read_folds
from bonetumor.errors import ArtifactError, ConfigError
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
#: The plan of the fold tasks, written by :func:`start_cross_validation` into the train output.
PLAN_FILE = "cv_plan.json"
#: What one fold task (:func:`run_fold_unit`) writes beside its candidates' folders.
UNIT_FILE = "unit.json"
#: Where the one-process run keeps its fold tasks' outputs until they are gathered.
UNITS_DIR = ".units"
TRAIN_SECTIONS = ("data", "preprocess", "split", "augment", "balance", "train")
__all__ = [
    "INIT_TAG",
    "PLAN_FILE",
    "RUNS_FILE",
    "TRAIN_SECTIONS",
    "UNIT_FILE",
    "early_stopping_split",
    "fan_out_groups",
    "gather_cross_validation",
    "read_plan",
    "run_cross_validation",
    "run_fold_unit",
    "start_cross_validation",
]


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

    The same three steps a Kubeflow run spreads over tasks, in one process: :func:`start_cross_validation`, one
    :func:`run_fold_unit` per fold and fan-out group, then :func:`gather_cross_validation`.

    Args:
        config: The whole config.
        manifest_path: The data set manifest.
        folds_path: The folds file from the split stage.
        policy_path: The augmentation policy from the augment stage.
        balance_dir: The balance stage's output (one training manifest per fold).
        out_dir: Output folder: ``<candidate>/oof.csv`` for every candidate, ``<arch>/history.json``,
            ``<arch>/learning_curves.png``, ``<arch>/gradcam/``, ``cv_plan.json`` and ``runs.json`` (MLflow run
            ids, initialisations, refit lengths and latencies for the evaluate and register stages).
        project_dir: Base folder for relative tracking URIs and the git commit.
        validation_dir: The validate stage's output; its report and Data Docs are logged with each run.

    Returns:
        The content of ``runs.json``.
    """
    out_dir = Path(out_dir)
    # Outside the atomic output folder, which a killed run discards.
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints"
    with atomic_dir(out_dir) as tmp:
        plan = start_cross_validation(config, manifest_path, folds_path, policy_path, tmp, project_dir, validation_dir)
        n_folds = len(plan["folds"])
        timer = EtaTimer(sum(c.planned_steps(config, n_folds) for c in build_candidates(config)))
        units = []
        for fold in plan["folds"]:
            for group in plan["groups"]:
                units.append(tmp / UNITS_DIR / unit_name(fold, group))
                run_fold_unit(
                    config, plan, manifest_path, folds_path, policy_path, balance_dir, fold, group, units[-1],
                    checkpoints=checkpoints, project_dir=project_dir, timer=timer,
                )  # fmt: skip
            fault_point("fold-end")
        runs = gather_cross_validation(config, plan, units, tmp, manifest_path, project_dir)
        shutil.rmtree(tmp / UNITS_DIR)
    shutil.rmtree(checkpoints, ignore_errors=True)
    log.info("cross-validation finished in %.0fs", timer.elapsed)
    return runs


def fan_out_groups(candidates: Sequence[Candidate]) -> tuple[dict[str, list[Candidate]], list[Candidate]]:
    """Group the candidates into units of work per fold, and list those built from several groups' predictions.

    A group is a candidate built on nothing (the baseline, an architecture) with every candidate built only on it
    (the architecture's INT8 and pruned models): one fold's group trains in one task. A candidate built on
    several groups (the ensemble) is scored when the folds are gathered.

    Returns:
        Group name (its root candidate) to its candidates in build order; and the gathered candidates.
    """
    roots: dict[str, tuple[str, ...]] = {}
    groups: dict[str, list[Candidate]] = {}
    gathered: list[Candidate] = []
    for candidate in candidates:  # each after its bases (build_candidates)
        found = (candidate.name,) if not candidate.bases else tuple(r for b in candidate.bases for r in roots[b])
        roots[candidate.name] = tuple(dict.fromkeys(found))
        if len(roots[candidate.name]) == 1:
            groups.setdefault(roots[candidate.name][0], []).append(candidate)
        else:
            gathered.append(candidate)
    return groups, gathered


def unit_name(fold: int, group: str) -> str:
    """Folder name of one fold's group: ``fold-<k>-<group>``."""
    return f"fold-{fold}-{group}"


def start_cross_validation(
    config: Config,
    manifest_path: str | Path,
    folds_path: str | Path,
    policy_path: str | Path,
    out_dir: str | Path,
    project_dir: str | Path,
    validation_dir: str | Path | None = None,
    *,
    owned: bool = True,
) -> dict[str, Any]:
    """Open every candidate's parent run and write the plan of the fold tasks (``cv_plan.json``).

    Args:
        config: The whole config.
        manifest_path: The data set manifest.
        folds_path: The folds file.
        policy_path: The augmentation policy.
        out_dir: Where ``cv_plan.json`` and ``config.resolved.yaml`` go.
        project_dir: Base folder for relative tracking URIs and the git commit.
        validation_dir: The validate stage's output; its report and Data Docs are logged with each parent run.
        owned: Tag the parent runs with this process, so that a later run closes them if it is killed before
            :func:`gather_cross_validation` does. False in a Kubeflow task: it ends as soon as the plan is written.

    Returns:
        The plan: ``experiment_id``, ``tracking_uri``, ``parents`` (candidate to parent run id), ``folds``,
        ``groups``, ``gathered`` and ``units`` (one ``{"fold", "group"}`` per task).
    """
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    manifest = read_manifest(manifest_path)
    folds = read_folds(folds_path, manifest, manifest_path)
    policy = load_policy(policy_path)
    candidates = build_candidates(config)
    experiment_id = setup_mlflow(config.tracking, project_dir)
    tags = {**provenance_tags(config, manifest_path, project_dir), **(process_tags() if owned else {})}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(config, out_dir, (*TRAIN_SECTIONS, "baseline", "candidates"))
    artifacts = [out_dir / "config.resolved.yaml", Path(policy_path)]
    parents = {c.name: _start_track(c, config, policy, tags, artifacts, validation_dir) for c in candidates}
    groups, gathered = fan_out_groups(candidates)
    fold_ids = [int(info["fold"]) for info in folds["folds"]]
    plan = {
        "experiment_id": experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
        "parents": parents,
        "folds": fold_ids,
        "groups": list(groups),
        "gathered": [c.name for c in gathered],
        "units": [{"fold": fold, "group": group} for fold in fold_ids for group in groups],
    }
    write_json(out_dir / PLAN_FILE, plan)
    log.info(
        "cross-validating %s on %d folds, %d fold tasks (%s per fold); initialisation %s; policy %s",
        [c.name for c in candidates],
        len(fold_ids),
        len(plan["units"]),
        list(groups),
        {c.name: c.run_tags()[INIT_TAG] for c in candidates if INIT_TAG in c.run_tags()},
        policy.digest(),
    )
    return plan


def read_plan(path: str | Path) -> dict[str, Any]:
    """Read ``cv_plan.json`` (a file, or the folder holding it).

    Raises:
        ArtifactError: The file is missing or is not a plan.
    """
    path = Path(path)
    path = path / PLAN_FILE if path.is_dir() else path
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot read the cross-validation plan ({exc}); run the train stage") from exc
    missing = [key for key in ("parents", "folds", "groups", "gathered", "units") if key not in plan]
    if missing:
        raise ArtifactError(f"{path}: not a cross-validation plan; it lacks {missing}")
    return dict(plan)


def run_fold_unit(
    config: Config,
    plan: dict[str, Any],
    manifest_path: str | Path,
    folds_path: str | Path,
    policy_path: str | Path,
    balance_dir: str | Path,
    fold: int,
    group: str,
    out_dir: str | Path,
    *,
    checkpoints: str | Path,
    project_dir: str | Path,
    timer: EtaTimer | None = None,
) -> dict[str, Any]:
    """Fit one group of candidates on one fold, in nested runs of the plan's parent runs.

    Args:
        config: The whole config.
        plan: The plan of :func:`start_cross_validation`.
        manifest_path: The data set manifest.
        folds_path: The folds file.
        policy_path: The augmentation policy.
        balance_dir: A balance output holding ``fold-<fold>``.
        fold: The fold.
        group: A group of ``plan["groups"]``.
        out_dir: Output folder: ``unit.json``, and per candidate ``oof-fold-<fold>.csv`` and its artifacts.
        checkpoints: Folder of the fits' checkpoints; a rerun resumes from them.
        project_dir: Base folder for relative tracking URIs and the git commit.
        timer: ETA over a larger run; default one for this unit.

    Returns:
        The unit record written to ``unit.json``.

    Raises:
        ConfigError: ``fold`` or ``group`` is not in the plan.
    """
    if fold not in plan["folds"] or group not in plan["groups"]:
        raise ConfigError(
            f"fold task ({fold}, {group!r}) is not in the cross-validation plan; expected a fold of "
            f"{plan['folds']} and a group of {plan['groups']}"
        )
    state = _plan(config, Path(manifest_path), Path(folds_path), Path(policy_path), Path(balance_dir), checkpoints)
    members = fan_out_groups(state.candidates)[0][group]
    if timer is not None:
        state.timer = timer
    else:
        state.timer = EtaTimer(sum(c.planned_steps(config, 1) for c in members))
    setup_mlflow(config.tracking, project_dir)
    state.tags = {**provenance_tags(config, manifest_path, project_dir), **process_tags()}
    tracks = [_Track(c, plan["parents"][c.name]) for c in members]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _run_fold(state, _fold_data(state, fold), tracks, out_dir)
    record: dict[str, Any] = {"fold": fold, "group": group, "candidates": {}}
    for track in tracks:
        name = track.candidate.name
        if track.oof:
            (out_dir / name).mkdir(parents=True, exist_ok=True)
            track.oof[0].to_csv(out_dir / name / f"oof-fold-{fold}.csv", index=False)
        record["candidates"][name] = {
            "skipped": track.skipped,
            "score": track.scores[0] if track.scores else None,
            "fold_record": track.folds[0] if track.folds else None,
            "latency_ms": track.latency_ms,
        }
    write_json(out_dir / UNIT_FILE, record)
    return record


def gather_cross_validation(
    config: Config,
    plan: dict[str, Any],
    unit_dirs: Sequence[str | Path],
    out_dir: str | Path,
    manifest_path: str | Path,
    project_dir: str | Path,
) -> dict[str, Any]:
    """Gather the fold tasks' outputs: every candidate's out-of-fold file, summary and parent run; ``runs.json``.

    Args:
        config: The whole config.
        plan: The plan of :func:`start_cross_validation`.
        unit_dirs: The output folders of every fold task (:func:`run_fold_unit`), in any order.
        out_dir: Output folder (the train stage's): ``<candidate>/`` and ``runs.json``.
        manifest_path: The data set manifest (the provenance tags of the gathered candidates' fold runs).
        project_dir: Base folder for relative tracking URIs and the git commit.

    Returns:
        The content of ``runs.json``.

    Raises:
        ArtifactError: A fold task's output is missing or unreadable.
    """
    records = _read_units(plan, unit_dirs)
    out_dir = Path(out_dir)
    candidates = build_candidates(config)
    groups, gathered = fan_out_groups(candidates)
    tracks: dict[str, _Track] = {}
    for group, members in groups.items():
        for candidate in members:
            tracks[candidate.name] = _collect_track(candidate, plan, group, records, out_dir)
    setup_mlflow(config.tracking, project_dir)
    tags = {**provenance_tags(config, manifest_path, project_dir), **process_tags()}
    for candidate in gathered:
        tracks[candidate.name] = _combine_track(candidate, plan, tracks, config, tags)
    runs = _runs_document(plan["experiment_id"], [_finish_track(tracks[c.name], out_dir) for c in candidates])
    write_json(out_dir / RUNS_FILE, runs)
    return runs


def _read_units(plan: dict[str, Any], unit_dirs: Sequence[str | Path]) -> dict[tuple[int, str], tuple[Path, Any]]:
    """Read every fold task's ``unit.json``; fail naming the tasks the plan expects and no output holds."""
    records: dict[tuple[int, str], tuple[Path, Any]] = {}
    for folder in map(Path, unit_dirs):
        path = folder / UNIT_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path}: cannot read the fold task's record ({exc}); did the task finish?") from exc
        records[(int(record["fold"]), str(record["group"]))] = (folder, record)
    missing = [u for u in plan["units"] if (int(u["fold"]), str(u["group"])) not in records]
    if missing:
        raise ArtifactError(
            f"cross-validation lacks the output of {len(missing)} fold task(s): {missing}; expected one per "
            f"(fold, group) of the plan, {len(plan['units'])} in all"
        )
    return records


def _collect_track(
    candidate: Candidate, plan: dict[str, Any], group: str, records: dict[tuple[int, str], tuple[Path, Any]], out: Path
) -> _Track:
    """One candidate's folds from the fold tasks' outputs, its artifacts copied into the train output."""
    track = _Track(candidate, plan["parents"][candidate.name])
    for fold in plan["folds"]:
        folder, record = records[(int(fold), group)]
        entry = record["candidates"][candidate.name]
        if entry["skipped"] is not None and track.skipped is None:
            track.skipped = entry["skipped"]
        if entry["fold_record"] is not None:
            track.folds.append(entry["fold_record"])
            track.scores.append(float(entry["score"]))
            track.oof.append(pd.read_csv(folder / candidate.name / f"oof-fold-{fold}.csv"))
        if int(fold) == plan["folds"][0]:
            track.latency_ms = entry["latency_ms"]
        if (folder / candidate.name).is_dir():
            shutil.copytree(
                folder / candidate.name,
                out / candidate.name,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("oof-*"),
            )
    return track


def _combine_track(
    candidate: Candidate, plan: dict[str, Any], tracks: dict[str, _Track], config: Config, tags: dict[str, str]
) -> _Track:
    """Score a candidate built on several groups on every fold, from its bases' out-of-fold logits."""
    track = _Track(candidate, plan["parents"][candidate.name])
    bases = [tracks[name] for name in candidate.bases]
    left_out = [b.candidate.name for b in bases if b.skipped is not None]
    if left_out:
        track.skipped = f"built on {left_out}, which were left out"
        return track
    classes = list(config.data.classes)
    columns = [f"logit_{name}" for name in classes]
    for index, fold in enumerate(plan["folds"]):
        frames = {b.candidate.name: b.oof[index] for b in bases}
        rows = next(iter(frames.values()))
        logits, metrics, model_tags = candidate.combine_logits(
            {name: frame[columns].to_numpy(dtype=np.float32) for name, frame in frames.items()}
        )
        truth = np.asarray(label_indices(rows["label"], classes))
        predictions = logits.argmax(1)
        track.scores.append(macro_f1(truth, predictions))
        run_tags = {**tags, **candidate.run_tags(), **model_tags, f"{TAG_PREFIX}fold": str(fold)}
        name = f"cv-{candidate.name}-fold{fold}"
        with mlflow.start_run(run_name=name, parent_run_id=track.run_id, tags=run_tags) as run:
            mlflow.log_params({"fold": fold, "n_val": len(rows), "members": ",".join(candidate.bases)})
            accuracy = float(np.mean(predictions == truth))
            mlflow.log_metrics({**metrics, "fold_accuracy": accuracy, "fold_macro_f1": track.scores[-1]})
        MlflowClient().log_metric(track.run_id, "fold_macro_f1", track.scores[-1], step=int(fold))
        track.oof.append(oof_frame(rows, int(fold), logits, classes))
        track.folds.append({"fold": int(fold), "run_id": run.info.run_id})
    latencies = [b.latency_ms for b in bases]
    track.latency_ms = None if None in latencies else float(sum(x for x in latencies if x is not None))
    return track


def _plan(
    config: Config, manifest_path: Path, folds_path: Path, policy_path: Path, balance_dir: Path, checkpoints: str | Path
) -> _Plan:
    """Read a fold task's inputs, build the candidates, and fix the checkpoint fingerprint."""
    manifest = read_manifest(manifest_path)
    folds = read_folds(folds_path, manifest, manifest_path)
    policy = load_policy(policy_path)
    device = select_device(config.train.device)
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    candidates = build_candidates(config)
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
        timer=EtaTimer(0),
        fingerprint=hashlib.sha256("|".join(parts).encode()).hexdigest()[:16],
        checkpoints=Path(checkpoints),
    )


def _start_track(
    candidate: Candidate,
    config: Config,
    policy: AugmentPolicy,
    tags: dict[str, str],
    artifacts: Sequence[Path],
    validation_dir: str | Path | None,
) -> str:
    """Open the candidate's parent run (its params, the resolved config, the policy, the data validation); its id."""
    run_tags = {**tags, **candidate.run_tags(), f"{TAG_PREFIX}stage": "train", f"{TAG_PREFIX}arch": candidate.name}
    with mlflow.start_run(run_name=f"cv-{candidate.name}", tags=run_tags) as run:
        settings = candidate.settings(config)
        mlflow.log_params(
            {
                **flatten_params(settings, candidate.param_sections),
                **candidate.mlflow_params(settings),
                "arch": candidate.name,
                "augment.policy_digest": policy.digest(),
            }
        )
        for artifact in artifacts:
            if artifact.is_file():
                mlflow.log_artifact(str(artifact))
        _log_validation(None if validation_dir is None else Path(validation_dir))
    # Open until its cross-validation finishes (_finish_track): a process killed meanwhile leaves it RUNNING, and the
    # next run marks it FAILED (close_interrupted_runs) instead of it reading as a finished cross-validation.
    MlflowClient().update_run(run.info.run_id, status="RUNNING")
    return str(run.info.run_id)


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


def _finish_track(track: _Track, out_root: Path) -> tuple[_Track, dict[str, Any] | None]:
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
