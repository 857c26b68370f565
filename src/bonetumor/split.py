"""Split: stratified k-fold cross-validation grouped by slide (or patient).

Tiles of one slide look alike, so a split that puts a slide on both sides of a fold inflates every metric.
Folds come from scikit-learn's StratifiedGroupKFold, and :func:`check_no_leakage` proves the grouping rule on
every folds file before anything trains on it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from bonetumor.config import Config, SplitConfig, save_resolved
from bonetumor.errors import ArtifactError, SplitError
from bonetumor.manifest import read_manifest
from bonetumor.utils import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FOLDS_FORMAT_VERSION = 1
FOLDS_FILE = "folds.json"


def _counts(frame: pd.DataFrame, classes: Sequence[str]) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {c: int(counts.get(c, 0)) for c in classes}


def make_folds(manifest: pd.DataFrame, config: SplitConfig, classes: Sequence[str]) -> dict[str, Any]:
    """Assign every tile to exactly one validation fold, keeping each group (slide or case) in one fold.

    Args:
        manifest: The tile manifest (needs ``path``, ``label`` and the ``group_by`` column).
        config: Number of folds, grouping column and seed.
        classes: Class order, for the per-class counts.

    Returns:
        The folds document: seed, grouping, and per fold the validation paths, the groups on each side and
        the class counts on each side. A class missing from a validation fold is listed under ``warnings``.

    Raises:
        SplitError: There are fewer groups than folds.
    """
    groups = manifest[config.group_by].astype(str)
    n_groups = groups.nunique()
    if n_groups < config.n_folds:
        raise SplitError(
            f"split.n_folds={config.n_folds} but the data has only {n_groups} distinct {config.group_by} value(s); "
            f"expected at least one {config.group_by} per fold. Lower split.n_folds or group by a finer column."
        )
    splitter = StratifiedGroupKFold(n_splits=config.n_folds, shuffle=True, random_state=config.seed)
    try:
        splits = list(splitter.split(manifest, manifest["label"], groups))
    except ValueError as exc:
        raise SplitError(f"cannot make {config.n_folds} stratified folds grouped by {config.group_by}: {exc}") from exc
    empty = [index for index, (_, val_idx) in enumerate(splits) if len(val_idx) == 0]
    if empty:
        raise SplitError(
            f"folds {empty} of {config.n_folds} got no validation tiles ({n_groups} {config.group_by} groups of "
            f"uneven size); expected every fold to hold at least one group. Lower split.n_folds or change split.seed."
        )
    folds: list[dict[str, Any]] = []
    notes: list[str] = []
    for index, (train_idx, val_idx) in enumerate(splits):
        train, val = manifest.iloc[train_idx], manifest.iloc[val_idx]
        val_counts = _counts(val, classes)
        train_counts = _counts(train, classes)
        for side, counts in (("validation", val_counts), ("training", train_counts)):
            missing = [c for c, n in counts.items() if n == 0]
            if missing:
                notes.append(f"fold {index}: {side} set has no tiles of {missing}")
        folds.append(
            {
                "fold": index,
                "val_paths": sorted(val["path"].astype(str)),
                "train_groups": sorted(train[config.group_by].astype(str).unique()),
                "val_groups": sorted(val[config.group_by].astype(str).unique()),
                "counts": {"train": train_counts, "val": val_counts},
            }
        )
    for note in notes:
        log.warning("%s", note)
    document = {
        "format_version": FOLDS_FORMAT_VERSION,
        "method": "StratifiedGroupKFold",
        "n_folds": config.n_folds,
        "group_by": config.group_by,
        "seed": config.seed,
        "n_tiles": len(manifest),
        "n_groups": n_groups,
        "folds": folds,
        "warnings": notes,
    }
    check_no_leakage(manifest, document)
    return document


def check_no_leakage(manifest: pd.DataFrame, folds: dict[str, Any]) -> None:
    """Check a folds document against the manifest: every tile in exactly one validation fold, no group on both sides.

    Raises:
        SplitError: A tile is in no or several validation folds, a path is unknown, or a group straddles a fold.
    """
    group_by = folds["group_by"]
    paths = set(manifest["path"].astype(str))
    seen: dict[str, int] = {}
    for fold in folds["folds"]:
        for path in fold["val_paths"]:
            if path not in paths:
                raise SplitError(f"fold {fold['fold']}: validation tile {path!r} is not in the manifest")
            if path in seen:
                raise SplitError(f"tile {path!r} is in the validation set of folds {seen[path]} and {fold['fold']}")
            seen[path] = fold["fold"]
    unassigned = sorted(paths - set(seen))
    if unassigned:
        raise SplitError(f"{len(unassigned)} tile(s) are in no validation fold, e.g. {unassigned[:5]}")
    fold_of = manifest["path"].astype(str).map(seen)
    for fold in folds["folds"]:
        in_val = fold_of == fold["fold"]
        val_groups = set(manifest.loc[in_val, group_by].astype(str))
        train_groups = set(manifest.loc[~in_val, group_by].astype(str))
        leaked = sorted(val_groups & train_groups)
        if leaked:
            raise SplitError(
                f"fold {fold['fold']}: {group_by}(s) {leaked} have tiles in both training and validation; "
                f"expected every {group_by} on one side only"
            )


def fold_membership(manifest: pd.DataFrame, folds: dict[str, Any]) -> pd.Series:
    """Return, for each manifest row, the index of the fold whose validation set holds it."""
    fold_of = {path: fold["fold"] for fold in folds["folds"] for path in fold["val_paths"]}
    membership = manifest["path"].astype(str).map(fold_of)
    if membership.isna().any():
        missing = manifest.loc[membership.isna(), "path"].tolist()[:5]
        raise ArtifactError(f"folds file does not cover the manifest (e.g. {missing}); rerun `bonetumor split`")
    return membership.astype(int)


def write_folds(folds: dict[str, Any], path: str | Path, manifest_path: str | Path) -> Path:
    """Write the folds document, stamped with the SHA-256 of the manifest it was made from."""
    folds = {**folds, "manifest_sha256": sha256_file(manifest_path)}
    return write_json(path, folds)


def read_folds(path: str | Path, manifest: pd.DataFrame, manifest_path: str | Path | None = None) -> dict[str, Any]:
    """Read a folds file and re-check it against the manifest (format, coverage, leakage).

    Args:
        path: The folds file.
        manifest: The manifest the folds must cover.
        manifest_path: The manifest's file; when given, it must be the file the folds were made from.

    Raises:
        ArtifactError: The file is missing, half-written, of an unknown format, or made from another manifest.
        SplitError: The folds do not fit the manifest or break the grouping rule.
    """
    folds = read_json(path, "folds file")
    if not isinstance(folds, dict) or folds.get("format_version") != FOLDS_FORMAT_VERSION or "folds" not in folds:
        raise ArtifactError(
            f"{path}: not a folds file of format version {FOLDS_FORMAT_VERSION}; rerun `bonetumor split`"
        )
    if manifest_path is not None and folds.get("manifest_sha256") != sha256_file(manifest_path):
        raise ArtifactError(f"{path} was made from another manifest than {manifest_path}; rerun `bonetumor split`")
    check_no_leakage(manifest, folds)
    return folds


def inner_split(rows: pd.DataFrame, group_by: str, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out about ``fraction`` of a fold's training groups as an inner validation set for early stopping.

    The outer validation fold must not choose the epoch it is scored with, or out-of-fold scores are optimistic.
    The inner split is stratified and grouped like the outer one, so no group is on both sides.

    Args:
        rows: The fold's real training tiles.
        group_by: The grouping column (``slide`` or ``case``).
        fraction: Share of groups to hold out (``1/fraction`` inner folds, the first one is used).
        seed: Seed of the assignment.

    Returns:
        The inner training rows and the inner validation rows.

    Raises:
        SplitError: Fewer than two groups, so nothing can be held out.
    """
    groups = rows[group_by].astype(str)
    n_groups = groups.nunique()
    if n_groups < 2:
        raise SplitError(
            f"a fold's training set has {n_groups} {group_by} group(s); early stopping needs at least 2 to hold one "
            "out. Set train.inner_val_fraction: 0 (train every epoch, no early stopping) or use fewer folds."
        )
    n_splits = min(max(2, round(1 / fraction)), n_groups)
    with warnings.catch_warnings():
        # Few tiles per class per group is normal here; the split stays grouped, only less stratified.
        warnings.simplefilter("ignore", UserWarning)
        try:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            train_idx, val_idx = next(splitter.split(rows, rows["label"], groups))
        except ValueError:
            train_idx, val_idx = next(GroupKFold(n_splits=n_splits).split(rows, rows["label"], groups))
    return rows.iloc[train_idx], rows.iloc[val_idx]


def run_split(config: Config, manifest_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """The split stage: make grouped stratified folds and write ``<out_dir>/folds.json``."""
    manifest = read_manifest(manifest_path)
    folds = make_folds(manifest, config.split, config.data.classes)
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "split"))
        write_folds(folds, tmp / FOLDS_FILE, manifest_path)
    for fold in folds["folds"]:
        log.info(
            "fold %d: train %s | val %s (%d %s)",
            fold["fold"],
            fold["counts"]["train"],
            fold["counts"]["val"],
            len(fold["val_groups"]),
            config.split.group_by,
        )
    return folds
