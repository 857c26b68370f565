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

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from bonetumor.config import Config, SplitConfig, save_resolved
from bonetumor.data.manifest import read_manifest
from bonetumor.errors import ArtifactError, SplitError
from bonetumor.utils import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

FOLDS_FORMAT_VERSION = 2
FOLDS_FILE = "folds.json"
FOLDS_REPORT_FILE = "folds_report.json"
FOLDS_DOCS_DIR = "data_docs"

#: (training, validation) row positions of each fold.
_Splits = list[tuple[np.ndarray, np.ndarray]]


def _counts(frame: pd.DataFrame, classes: Sequence[str]) -> dict[str, int]:
    counts = frame["label"].value_counts()
    return {c: int(counts.get(c, 0)) for c in classes}


def _union_groups(groups: pd.Series, clusters: pd.Series | None) -> pd.Series:
    """Merge groups that a near-duplicate cluster links, so both copies of a tile land on one side.

    Returns one split key per row: the sorted ``+``-joined names of the linked groups (the group name itself when
    nothing links it).
    """
    if clusters is None:
        return groups
    parent: dict[str, str] = {g: g for g in groups.unique()}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    frame = pd.DataFrame({"group": groups, "cluster": clusters.fillna("").astype(str)})
    for _, members in frame[frame["cluster"] != ""].groupby("cluster")["group"]:
        names = sorted(set(members))
        for other in names[1:]:
            a, b = find(names[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    roots: dict[str, list[str]] = {}
    for g in parent:
        roots.setdefault(find(g), []).append(g)
    key = {g: "+".join(sorted(roots[find(g)])) for g in parent}
    return groups.map(key)


def _hold_out(
    rows: pd.DataFrame, keys: pd.Series, fraction: float, seed: int, what: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out about ``fraction`` of the groups (stratified by label where possible) and return (kept, held out)."""
    n_groups = keys.nunique()
    n_splits = max(2, round(1 / fraction))
    if n_groups < n_splits:
        raise SplitError(
            f"{what}: {fraction:g} of {n_groups} group(s) is less than one group; expected at least {n_splits} groups. "
            "Lower the fraction to 0 or group by a finer column."
        )
    return _first_grouped_fold(rows, keys, n_splits, seed)


def _first_grouped_fold(
    rows: pd.DataFrame, keys: pd.Series, n_splits: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (kept, held out): the first of ``n_splits`` grouped folds, stratified by label where possible."""
    with warnings.catch_warnings():
        # Few tiles per class per group is normal here; the hold-out stays grouped, only less stratified.
        warnings.simplefilter("ignore", UserWarning)
        try:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            kept_idx, held_idx = next(splitter.split(rows, rows["label"], keys))
        except ValueError:
            kept_idx, held_idx = next(GroupKFold(n_splits=n_splits).split(rows, rows["label"], keys))
    return rows.iloc[kept_idx], rows.iloc[held_idx]


def make_folds(
    manifest: pd.DataFrame,
    config: SplitConfig,
    classes: Sequence[str],
    clusters: pd.Series | None = None,
) -> dict[str, Any]:
    """Assign every tile to a held-out test set or to exactly one validation fold, keeping each group on one side.

    Args:
        manifest: The tile manifest (needs ``path``, ``label`` and the ``group_by`` column).
        config: Method, number of folds, grouping column, test share and seed.
        classes: Class order, for the per-class counts.
        clusters: Near-duplicate cluster id per manifest row (aligned on the index; empty = none). Groups that a
            cluster links are kept together, so a tile and its near-copy never sit on both sides.

    Returns:
        The folds document: method, seed, grouping, the test tiles and groups (``test_paths``, ``test_groups``,
        ``test_counts``), and per fold the validation paths, the groups on each side and the class counts on each
        side. A class missing from a fold's validation or training set is listed under ``warnings``.

    Raises:
        SplitError: There are fewer groups than folds, or the groups cannot be split as asked.
    """
    groups = manifest[config.group_by].astype(str)
    keys = _union_groups(groups, None if clusters is None else clusters.reindex(manifest.index))
    merged = sorted({k for k in keys.unique() if "+" in k})
    notes: list[str] = []
    if merged:
        notes.append(f"near-duplicate tiles link {config.group_by} groups, kept together: {merged}")

    dev, test = manifest, manifest.iloc[0:0]
    if config.test_fraction > 0:
        dev, test = _hold_out(manifest, keys, config.test_fraction, config.seed, "split.test_fraction")
    dev_keys = keys.loc[dev.index]
    if config.method == "leave_one_group_out":
        splits = _leave_one_group_out(dev_keys, config.group_by)
    else:
        splits = _stratified_group_folds(dev, dev_keys, config, with_test=len(test) > 0)
    folds = [
        _fold_entry(index, dev, train_idx, val_idx, config.group_by, classes, notes)
        for index, (train_idx, val_idx) in enumerate(splits)
    ]
    if len(test):
        missing = [c for c, n in _counts(test, classes).items() if n == 0]
        if missing:
            notes.append(f"test set has no tiles of {missing}")
    for note in notes:
        log.warning("%s", note)
    document = {
        "format_version": FOLDS_FORMAT_VERSION,
        "method": "LeaveOneGroupOut" if config.method == "leave_one_group_out" else "StratifiedGroupKFold",
        "n_folds": len(splits),
        "group_by": config.group_by,
        "seed": config.seed,
        "test_fraction": config.test_fraction,
        "n_tiles": len(manifest),
        "n_groups": int(groups.nunique()),
        "groups": sorted(groups.unique()),
        "counts": _counts(manifest, classes),
        "test_paths": sorted(test["path"].astype(str)),
        "test_groups": sorted(test[config.group_by].astype(str).unique()),
        "test_counts": _counts(test, classes),
        "folds": folds,
        "warnings": notes,
    }
    check_no_leakage(manifest, document)
    return document


def _leave_one_group_out(dev_keys: pd.Series, group_by: str) -> _Splits:
    """Return one (train, validation) split of row positions per group, each group validating once, in name order."""
    n_groups = dev_keys.nunique()
    if n_groups < 2:
        raise SplitError(f"leave_one_group_out needs at least 2 {group_by} groups outside the test set, got {n_groups}")
    keys = dev_keys.to_numpy()
    return [(np.flatnonzero(keys != g), np.flatnonzero(keys == g)) for g in sorted(dev_keys.unique())]


def _stratified_group_folds(dev: pd.DataFrame, dev_keys: pd.Series, config: SplitConfig, with_test: bool) -> _Splits:
    """Return the ``n_folds`` (train, validation) splits of StratifiedGroupKFold over the development rows."""
    n_folds, n_groups = config.n_folds, dev_keys.nunique()
    if n_groups < n_folds:
        raise SplitError(
            f"split.n_folds={n_folds} but the data has only {n_groups} distinct {config.group_by} value(s)"
            f"{' outside the test set' if with_test else ''}; expected at least one {config.group_by} per fold. "
            "Lower split.n_folds or group by a finer column."
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=config.seed)
    try:
        splits = [(tr, va) for tr, va in splitter.split(dev, dev["label"], dev_keys)]
    except ValueError as exc:
        raise SplitError(f"cannot make {n_folds} stratified folds grouped by {config.group_by}: {exc}") from exc
    empty = [index for index, (_, val_idx) in enumerate(splits) if len(val_idx) == 0]
    if empty:
        raise SplitError(
            f"folds {empty} of {n_folds} got no validation tiles ({n_groups} {config.group_by} groups of uneven "
            "size); expected every fold to hold at least one group. Lower split.n_folds or change split.seed."
        )
    return splits


def _fold_entry(
    index: int,
    dev: pd.DataFrame,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    group_by: str,
    classes: Sequence[str],
    notes: list[str],
) -> dict[str, Any]:
    """Return fold ``index``'s entry of the folds document; a class missing from one side is added to ``notes``."""
    train, val = dev.iloc[train_idx], dev.iloc[val_idx]
    val_counts = _counts(val, classes)
    train_counts = _counts(train, classes)
    for side, counts in (("validation", val_counts), ("training", train_counts)):
        missing = [c for c, n in counts.items() if n == 0]
        if missing:
            notes.append(f"fold {index}: {side} set has no tiles of {missing}")
    return {
        "fold": index,
        "val_paths": sorted(val["path"].astype(str)),
        "train_groups": sorted(train[group_by].astype(str).unique()),
        "val_groups": sorted(val[group_by].astype(str).unique()),
        "counts": {"train": train_counts, "val": val_counts},
    }


def check_no_leakage(manifest: pd.DataFrame, folds: dict[str, Any]) -> None:
    """Check a folds document against the manifest.

    Every tile is in the test set or in exactly one validation fold; no group is on both sides of a fold, and no
    group of the test set has tiles in any fold.

    Raises:
        SplitError: A tile is in no or several sets, a path is unknown, or a group straddles a fold or the test set.
    """
    group_by = folds["group_by"]
    paths = set(manifest["path"].astype(str))
    seen: dict[str, int] = {}
    for path in folds.get("test_paths", []):
        if path not in paths:
            raise SplitError(f"test tile {path!r} is not in the manifest")
        seen[path] = TEST_FOLD
    for fold in folds["folds"]:
        for path in fold["val_paths"]:
            if path not in paths:
                raise SplitError(f"fold {fold['fold']}: validation tile {path!r} is not in the manifest")
            if path in seen:
                where = "the test set" if seen[path] == TEST_FOLD else f"the validation set of fold {seen[path]}"
                raise SplitError(f"tile {path!r} is in {where} and in the validation set of fold {fold['fold']}")
            seen[path] = fold["fold"]
    unassigned = sorted(paths - set(seen))
    if unassigned:
        raise SplitError(f"{len(unassigned)} tile(s) are in no validation fold nor the test set, e.g. {unassigned[:5]}")
    fold_of = manifest["path"].astype(str).map(seen)
    group = manifest[group_by].astype(str)
    test_groups = set(group[fold_of == TEST_FOLD])
    dev_groups = set(group[fold_of != TEST_FOLD])
    leaked_test = sorted(test_groups & dev_groups)
    if leaked_test:
        raise SplitError(
            f"{group_by}(s) {leaked_test} have tiles in the test set and in the folds; "
            f"expected every {group_by} on one side only"
        )
    for fold in folds["folds"]:
        in_val = fold_of == fold["fold"]
        in_train = ~in_val & (fold_of != TEST_FOLD)
        leaked = sorted(set(group[in_val]) & set(group[in_train]))
        if leaked:
            raise SplitError(
                f"fold {fold['fold']}: {group_by}(s) {leaked} have tiles in both training and validation; "
                f"expected every {group_by} on one side only"
            )


#: Fold index :func:`fold_membership` gives tiles of the held-out test set.
TEST_FOLD = -1


def fold_membership(manifest: pd.DataFrame, folds: dict[str, Any]) -> pd.Series:
    """Return, for each manifest row, the fold whose validation set holds it (:data:`TEST_FOLD` for test tiles)."""
    fold_of = {path: fold["fold"] for fold in folds["folds"] for path in fold["val_paths"]}
    fold_of.update({path: TEST_FOLD for path in folds.get("test_paths", [])})
    membership = manifest["path"].astype(str).map(fold_of)
    if membership.isna().any():
        missing = manifest.loc[membership.isna(), "path"].tolist()[:5]
        raise ArtifactError(f"folds file does not cover the manifest (e.g. {missing}); rerun `bonetumor split`")
    return membership.astype(int)


def development_rows(manifest: pd.DataFrame, folds: dict[str, Any]) -> pd.DataFrame:
    """Return the tiles outside the held-out test set: what cross-validation, the GAN and the final refit may use."""
    return manifest[fold_membership(manifest, folds) != TEST_FOLD]


def held_out_rows(manifest: pd.DataFrame, folds: dict[str, Any]) -> pd.DataFrame:
    """Return the tiles of the held-out test set (empty when ``split.test_fraction`` is 0)."""
    return manifest[fold_membership(manifest, folds) == TEST_FOLD]


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
    return _first_grouped_fold(rows, groups, min(max(2, round(1 / fraction)), n_groups), seed)


def read_clusters(tiles_path: str | Path, manifest: pd.DataFrame) -> pd.Series:
    """Read the near-duplicate cluster of each manifest row from the validate stage's ``tiles.csv``.

    Raises:
        ArtifactError: The file is missing, lacks the ``near_dup_cluster`` column, or does not cover the manifest.
    """
    tiles_path = Path(tiles_path)
    if not tiles_path.is_file():
        raise ArtifactError(f"{tiles_path} not found; run `bonetumor validate` first")
    tiles = pd.read_csv(tiles_path, dtype={"near_dup_cluster": str}, keep_default_na=False)
    if not {"path", "near_dup_cluster"} <= set(tiles.columns):
        raise ArtifactError(f"{tiles_path}: expected columns path and near_dup_cluster; rerun `bonetumor validate`")
    cluster_of = dict(zip(tiles["path"].astype(str), tiles["near_dup_cluster"].astype(str), strict=True))
    clusters = manifest["path"].astype(str).map(cluster_of)
    if clusters.isna().any():
        missing = manifest.loc[clusters.isna(), "path"].tolist()[:5]
        raise ArtifactError(f"{tiles_path} does not cover the manifest (e.g. {missing}); rerun `bonetumor validate`")
    return clusters


def run_split(
    config: Config, manifest_path: str | Path, out_dir: str | Path, tiles_path: str | Path | None = None
) -> dict[str, Any]:
    """The split stage: make grouped folds (and the test hold-out), check them with the folds suite, write them.

    Args:
        config: Uses ``split`` and ``data.classes``.
        manifest_path: The ingest manifest.
        out_dir: Output folder (``folds.json``, ``folds_report.json``).
        tiles_path: The validate stage's ``tiles.csv``; its near-duplicate clusters are kept on one side.

    Raises:
        SplitError: The folds cannot be made.
        DataValidationError: The folds suite failed (a group or near-duplicate cluster on both sides).
    """
    # Imported here: validate imports this module for fold membership.
    from bonetumor.data.validate import validate_folds

    manifest = read_manifest(manifest_path)
    clusters = read_clusters(tiles_path, manifest) if tiles_path is not None else None
    folds = make_folds(manifest, config.split, config.data.classes, clusters)
    table = manifest.assign(near_dup_cluster=clusters) if clusters is not None else None
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "split", "validate"))
        validate_folds(
            manifest, folds, table, config, docs_dir=tmp / FOLDS_DOCS_DIR, report_path=tmp / FOLDS_REPORT_FILE
        )
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
    if folds["test_paths"]:
        log.info("test set: %s (%d %s)", folds["test_counts"], len(folds["test_groups"]), config.split.group_by)
    return folds
