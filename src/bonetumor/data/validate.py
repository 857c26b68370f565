"""Validate: Great Expectations suites over the tiles, the class balance and the cross-validation folds.

The suites are code (``build_*_suite``), versioned with the project. Every tile is decoded once, in parallel
worker processes; what decoding found (format, mode, size, whether the checksum still matches the manifest),
a 64-bit perceptual hash and the tissue fraction become columns next to the manifest's, and computed columns
(near-duplicate cluster, how many labels one image carries) make the cross-row rules checkable row by row. The
JSON report names, for each failed expectation, the failing files; a failure raises
:class:`DataValidationError` so the pipeline stops. Findings that need a look but are not wrong by themselves
(exact and near duplicates, a few near-blank tiles, a validation fold without some class) are ``warning``
expectations and end up in the report's ``warnings``.

Severity: expectations built with ``severity="warning"`` never fail validation; every other one does.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import imagehash
import numpy as np
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.exceptions import GreatExpectationsError
from great_expectations.expectations.metadata_types import FailureSeverity
from PIL import Image, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bonetumor.config import Config, ValidateConfig, save_resolved
from bonetumor.data.manifest import MANIFEST_COLUMNS, read_manifest, resolve_paths, write_manifest
from bonetumor.errors import DataValidationError, SplitError
from bonetumor.faults import fault_point
from bonetumor.transforms.decode import SUPPORTED_FORMATS
from bonetumor.transforms.tissue import tissue_fraction
from bonetumor.utils import write_json

log = logging.getLogger(__name__)

SUITE_NAME = "bonetumor-tiles"
CLASS_SUITE_NAME = "bonetumor-classes"
FOLDS_SUITE_NAME = "bonetumor-folds"
FOLD_CLASSES_SUITE_NAME = "bonetumor-fold-classes"
REPORT_FILE = "report.json"
TILES_FILE = "tiles.csv"
DOCS_DIR = "data_docs"
#: Name of the Data Docs site this module configures (the ephemeral context's own ``local_site`` is not built).
DOCS_SITE = "bonetumor_docs"
#: How many failing files a report lists per expectation (the count is always complete).
MAX_LISTED_FILES = 50
#: How many duplicate / near-duplicate pairs a report lists (the counts are always complete).
MAX_LISTED_PAIRS = 200
#: How many near-blank tiles a report lists (the count is always complete).
MAX_LISTED_LOW_TISSUE = 500

#: Side of the copy the perceptual hash is computed from (imagehash resizes it to 32 px): hashing a reduced
#: copy costs a quarter of hashing a 256 px tile and finds the same near-duplicates.
PHASH_SIDE = 64
#: Below this many tiles per worker, starting processes costs more than it saves.
MIN_TILES_PER_WORKER = 64

#: Columns ``tiles.csv`` adds to the manifest's.
TILE_COLUMNS: tuple[str, ...] = (
    "decodes",
    "format",
    "mode",
    "decoded_width",
    "decoded_height",
    "sha256_matches",
    "phash",
    "near_dup_cluster",
    "near_dup_cluster_size",
    "sha256_label_count",
    "tissue_fraction",
    "decode_error",
)


# --------------------------------------------------------------------------------------------------------------
# Decoding: one read and one decode per tile, in worker processes.


def _empty_record(error: str) -> dict[str, Any]:
    return {
        "decodes": False,
        "format": None,
        "mode": None,
        "decoded_width": None,
        "decoded_height": None,
        "sha256_matches": False,
        "phash": None,
        "tissue_fraction": None,
        "decode_error": error,
    }


def inspect_tile(job: tuple[str, str | None]) -> dict[str, Any]:
    """Read and decode one tile once and return what validation needs to know about it.

    Args:
        job: The file path and the SHA-256 the manifest recorded for it (None when unknown).

    Returns:
        ``decodes``, ``format``, ``mode``, ``decoded_width``, ``decoded_height``, ``sha256_matches``, ``phash``
        (16 hex digits), ``tissue_fraction`` and ``decode_error`` (None when the tile decodes). The hash and the
        tissue fraction are also computed for a decodable tile of the wrong mode (converted to RGB for them).
    """
    file, expected_sha = job
    try:
        raw = Path(file).read_bytes()
    except FileNotFoundError:
        return _empty_record("file not found")
    except OSError as exc:
        return _empty_record(f"cannot read file ({exc.strerror or exc})")
    record = _empty_record("")
    record["sha256_matches"] = expected_sha is not None and hashlib.sha256(raw).hexdigest() == expected_sha
    if not raw:
        record["decode_error"] = "empty file (0 bytes)"
        return record
    try:
        with Image.open(io.BytesIO(raw)) as image:
            record.update(format=image.format, mode=image.mode)
            record["decoded_width"], record["decoded_height"] = image.size
            image.load()
            if image.format not in SUPPORTED_FORMATS:
                record["decode_error"] = f"{image.format} is not an accepted format {sorted(SUPPORTED_FORMATS)}"
                return record
            rgb = image if image.mode == "RGB" else image.convert("RGB")
    except UnidentifiedImageError:
        record["decode_error"] = "not a recognised image file"
        return record
    except Image.DecompressionBombError as exc:
        record["decode_error"] = f"too large to decode safely ({exc})"
        return record
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow signals truncated or corrupt data with OSError ("image file is truncated") or SyntaxError.
        record["decode_error"] = f"corrupt or truncated ({exc})"
        return record
    factor = max(1, min(rgb.size) // PHASH_SIDE)
    small = rgb.reduce(factor) if factor > 1 else rgb
    record.update(
        decodes=True,
        decode_error=None,
        phash=str(imagehash.phash(small)),
        tissue_fraction=round(tissue_fraction(small), 4),
    )
    return record


def _pool_context() -> Any:
    # fork starts workers in milliseconds and needs no re-import of this module (Great Expectations alone takes
    # seconds to import); platforms without fork get their default start method.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def inspect_tiles(manifest: pd.DataFrame, manifest_dir: str | Path, workers: int = 0) -> pd.DataFrame:
    """Decode every tile of the manifest (in parallel) and return the manifest with what decoding found.

    Args:
        manifest: The tile manifest.
        manifest_dir: The folder its paths are relative to.
        workers: Worker processes; 0 = one per CPU core. Small manifests are decoded in this process.

    Returns:
        The manifest plus the columns of :func:`inspect_tile`.
    """
    files = resolve_paths(manifest, manifest_dir)
    shas = [None if pd.isna(s) else str(s) for s in manifest["sha256"]]
    jobs = list(zip([str(f) for f in files], shas, strict=True))
    n_workers = min(workers or os.cpu_count() or 1, len(jobs) // MIN_TILES_PER_WORKER)
    if n_workers <= 1:
        records = [inspect_tile(job) for job in jobs]
    else:
        chunksize = max(1, min(256, len(jobs) // (n_workers * 8)))
        with ProcessPoolExecutor(n_workers, mp_context=_pool_context()) as pool:
            records = list(pool.map(inspect_tile, jobs, chunksize=chunksize))
    inspected = pd.DataFrame(records, index=manifest.index, columns=list(_empty_record("")))
    for column in ("decoded_width", "decoded_height"):
        inspected[column] = inspected[column].astype("Int64")
    inspected["tissue_fraction"] = inspected["tissue_fraction"].astype("float64")
    inspected["decodes"] = inspected["decodes"].astype(bool)
    inspected["sha256_matches"] = inspected["sha256_matches"].astype(bool)
    return pd.concat([manifest, inspected], axis=1)


# --------------------------------------------------------------------------------------------------------------
# Duplicates and near-duplicates.


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.asarray(np.bitwise_count(values))
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1, dtype=np.uint8)


def hamming_pairs(codes: np.ndarray, max_distance: int, block: int = 512) -> tuple[np.ndarray, ...]:
    """Return every pair of 64-bit codes within ``max_distance`` differing bits.

    Vectorised in row blocks (XOR, then popcount) over the upper triangle only: 10,000 codes take well under a
    second and ``block`` x ``len(codes)`` x 8 bytes of memory.

    Args:
        codes: ``uint64`` array.
        max_distance: Largest Hamming distance that counts.
        block: Rows compared per step.

    Returns:
        Arrays ``i``, ``j`` (indices, ``i < j``) and ``distance``.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint64)
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(codes), block):
        rows = codes[start : start + block]
        distances = _popcount(rows[:, None] ^ codes[None, start:])
        i, j = np.nonzero(distances <= max_distance)
        upper = j > i  # j counts from `start`, like i: keep each pair once, not the diagonal
        found_i.append(i[upper] + start)
        found_j.append(j[upper] + start)
        found_d.append(distances[i[upper], j[upper]])
    if not found_i:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.uint8)
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


@dataclass(frozen=True)
class NearDuplicates:
    """Near-duplicate clusters of a tile table.

    Attributes:
        cluster: Per row, the cluster id: the smallest ``path`` of the cluster. A tile without near-duplicates
            (or without a hash because it does not decode) is its own cluster, so the id is never empty and can
            be used directly as a grouping key.
        cluster_size: Per row, how many tiles share its cluster.
        pairs: Up to :data:`MAX_LISTED_PAIRS` pairs of different files (``a``, ``b``, ``distance``, ``labels``),
            closest first. Byte-identical files are exact duplicates and listed by :func:`exact_duplicate_pairs`.
        n_pairs: How many such pairs exist in all.
        n_clusters: Clusters of two or more tiles.
    """

    cluster: list[str]
    cluster_size: list[int]
    pairs: list[dict[str, Any]]
    n_pairs: int
    n_clusters: int


def _cross_pairs(groups: Sequence[Sequence[int]]) -> Iterator[tuple[int, int]]:
    """Yield every pair of rows that lie in two different groups."""
    for x, first in enumerate(groups):
        for second in groups[x + 1 :]:
            yield from itertools.product(first, second)


def near_duplicates(table: pd.DataFrame, max_distance: int) -> NearDuplicates:
    """Cluster tiles whose perceptual hashes differ in at most ``max_distance`` bits (single linkage).

    Tiles with identical hashes are collapsed first, so a thousand blank tiles cost one comparison row, not a
    million pairs; the distinct hashes are compared with :func:`hamming_pairs` and clustered with connected
    components.

    Args:
        table: Needs ``path``, ``label``, ``sha256`` and ``phash`` (hex, None where the tile does not decode).
        max_distance: ``validate.near_duplicate_distance``.

    Returns:
        The clusters and the listed pairs.
    """
    paths = table["path"].astype(str).to_numpy()
    labels = table["label"].astype(str).to_numpy()
    shas = table["sha256"].astype(str).to_numpy()
    hashed = np.flatnonzero(table["phash"].notna().to_numpy())
    codes = np.array([int(str(h), 16) for h in table["phash"].iloc[hashed]], dtype=np.uint64)
    unique, inverse = np.unique(codes, return_inverse=True)
    inverse = inverse.reshape(-1)
    i, j, d = hamming_pairs(unique, max_distance)
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(len(unique), len(unique)))
    component = connected_components(graph, directed=False)[1] if len(unique) else np.zeros(0, dtype=np.int32)

    cluster = paths.copy()
    tile_component = component[inverse]
    frame = pd.DataFrame({"row": hashed, "component": tile_component, "path": paths[hashed]})
    smallest = frame.groupby("component")["path"].transform("min").to_numpy()
    cluster[hashed] = smallest
    sizes = pd.Series(cluster).map(pd.Series(cluster).value_counts()).to_numpy()

    members = _hash_members(hashed, inverse, paths)
    listed, n_pairs = _near_duplicate_pairs(members, (i, j, d), paths, labels, shas)
    n_clusters = int((pd.Series(cluster).value_counts() > 1).sum())
    return NearDuplicates(
        cluster=[str(c) for c in cluster],
        cluster_size=[int(s) for s in sizes],
        pairs=listed,
        n_pairs=n_pairs,
        n_clusters=n_clusters,
    )


def _hash_members(hashed: np.ndarray, inverse: np.ndarray, paths: np.ndarray) -> dict[int, list[int]]:
    """Return the table rows of each distinct hash (by its index among the distinct hashes), in path order."""
    members: dict[int, list[int]] = {}
    for tile_row, hash_index in zip(hashed.tolist(), inverse.tolist(), strict=True):
        members.setdefault(hash_index, []).append(tile_row)
    for rows in members.values():
        rows.sort(key=lambda r: paths[r])
    return members


def _near_duplicate_pairs(
    members: dict[int, list[int]],
    hash_pairs: tuple[np.ndarray, ...],
    paths: np.ndarray,
    labels: np.ndarray,
    shas: np.ndarray,
) -> tuple[list[dict[str, Any]], int]:
    """Return up to :data:`MAX_LISTED_PAIRS` near-duplicate pairs of different files, and how many there are.

    ``hash_pairs`` are :func:`hamming_pairs`' ``(i, j, distance)`` over the distinct hashes that ``members`` maps
    to table rows.
    """
    i, j, d = hash_pairs

    def pair(a: int, b: int, distance: int) -> dict[str, Any]:
        first, second = sorted((a, b), key=lambda r: paths[r])
        return {
            "a": paths[first],
            "b": paths[second],
            "distance": distance,
            "labels": [labels[first], labels[second]],
        }

    listed: list[dict[str, Any]] = []
    n_pairs = 0
    # Identical hashes first (distance 0), pairing only files of different content; then distinct hashes,
    # closest first. The generators stop at the listing cap, so a cluster of thousands of tiles stays cheap.
    for code in sorted(members, key=lambda c: paths[members[c][0]]):
        rows = members[code]
        by_sha: dict[str, list[int]] = {}
        for member in rows:
            by_sha.setdefault(shas[member], []).append(member)
        n_pairs += math.comb(len(rows), 2) - sum(math.comb(len(same), 2) for same in by_sha.values())
        remaining = MAX_LISTED_PAIRS - len(listed)
        listed += [pair(a, b, 0) for a, b in itertools.islice(_cross_pairs(list(by_sha.values())), remaining)]
    for index in np.lexsort((i, d)):
        left, right = members[int(i[index])], members[int(j[index])]
        n_pairs += len(left) * len(right)
        remaining = MAX_LISTED_PAIRS - len(listed)
        pairs = itertools.islice(itertools.product(left, right), remaining)
        listed += [pair(a, b, int(d[index])) for a, b in pairs]
    listed.sort(key=lambda p: (p["distance"], p["a"], p["b"]))
    return listed, n_pairs


def exact_duplicate_pairs(table: pd.DataFrame) -> tuple[list[dict[str, Any]], int]:
    """Return up to :data:`MAX_LISTED_PAIRS` pairs of tiles with the same SHA-256, and how many there are in all.

    Each pair lists ``a``, ``b`` and their ``labels`` (two different labels are a label conflict, an error).
    """
    listed: list[dict[str, Any]] = []
    total = 0
    known = table[table["sha256"].notna()]
    groups = [g.sort_values("path") for _, g in known.groupby("sha256", sort=False) if len(g) > 1]
    for rows in sorted(groups, key=lambda g: str(g["path"].iloc[0])):
        total += math.comb(len(rows), 2)
        items = list(zip(rows["path"].astype(str), rows["label"].astype(str), strict=True))
        pairs = itertools.islice(itertools.combinations(items, 2), MAX_LISTED_PAIRS - len(listed))
        listed += [{"a": a, "b": b, "labels": [label_a, label_b]} for (a, label_a), (b, label_b) in pairs]
    return listed[:MAX_LISTED_PAIRS], total


def add_computed_columns(table: pd.DataFrame, max_distance: int) -> tuple[pd.DataFrame, NearDuplicates]:
    """Add the cross-row columns the tile suite checks row by row.

    ``sha256_label_count`` (distinct labels among the tiles with this checksum; more than one is a label
    conflict) with ``sha256_labels`` (those labels, for the report), ``near_dup_cluster`` and
    ``near_dup_cluster_size`` (see :class:`NearDuplicates`).

    Returns:
        The extended table and the near-duplicate findings.
    """
    table = table.copy()
    table["sha256_label_count"] = table.groupby("sha256", dropna=True)["label"].transform("nunique").astype("Int64")
    # For reports only (not in tiles.csv): the labels a conflicting image carries.
    conflicts = table[table["sha256_label_count"].fillna(1) > 1]
    carried = conflicts.groupby("sha256")["label"].agg(lambda s: ", ".join(sorted(set(s.dropna().astype(str)))))
    table["sha256_labels"] = pd.Series(pd.NA, index=table.index, dtype="string")
    table.loc[conflicts.index, "sha256_labels"] = (
        "labelled " + conflicts["label"].astype(str) + "; this image carries " + conflicts["sha256"].map(carried)
    )
    found = near_duplicates(table, max_distance)
    table["near_dup_cluster"] = found.cluster
    table["near_dup_cluster_size"] = found.cluster_size
    return table, found


# --------------------------------------------------------------------------------------------------------------
# Suites.


def build_suite(
    classes: Sequence[str], min_size: int, min_tissue_fraction: float = 0.25, max_low_tissue_share: float = 0.05
) -> gx.ExpectationSuite:
    """Return the tile suite.

    Errors: schema; non-null keys; label set (every tile's label is a class, every class occurs); decodable,
    unchanged (checksum), 8-bit RGB tiles of at least ``min_size``; one label per image (the same bytes under
    two labels is a conflict); at most ``max_low_tissue_share`` of the tiles below ``min_tissue_fraction``.
    Warnings: exact duplicates (unique checksums) and near-duplicates (near-duplicate cluster of size 1).

    GX needs an active data context to build a suite, so call this after ``gx.get_context``.
    """
    suite = gx.ExpectationSuite(name=SUITE_NAME)
    for column in MANIFEST_COLUMNS:
        suite.add_expectation(gxe.ExpectColumnToExist(column=column))
    for column in ("path", "label", "case", "slide", "sha256"):
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="path"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(classes)))
    suite.add_expectation(gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(classes)))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="sha256_matches", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=["RGB"]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="decoded_width", min_value=min_size))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="decoded_height", min_value=min_size))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="sha256_label_count", min_value=1, max_value=1))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(
            column="tissue_fraction", min_value=min_tissue_fraction, mostly=1.0 - max_low_tissue_share
        )
    )
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="sha256", severity=FailureSeverity.WARNING))
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(column="near_dup_cluster_size", max_value=1, severity=FailureSeverity.WARNING)
    )
    return suite


def class_table(labels: pd.Series, classes: Sequence[str]) -> pd.DataFrame:
    """Return one row per class: ``label``, ``n_tiles`` and ``largest_to_this`` (largest class count / this one).

    ``largest_to_this`` is infinite for an empty class; its maximum is the imbalance ratio.
    """
    counts = labels.value_counts()
    n_tiles = [int(counts.get(c, 0)) for c in classes]
    largest = max(n_tiles, default=0)
    ratio = [largest / n if n else math.inf for n in n_tiles]
    return pd.DataFrame({"label": list(classes), "n_tiles": n_tiles, "largest_to_this": ratio})


def build_class_suite(min_class_count: int, max_imbalance_ratio: float) -> gx.ExpectationSuite:
    """Return the class-balance suite over :func:`class_table`.

    Every class has ``min_class_count`` tiles or more, and the largest class is at most ``max_imbalance_ratio``
    times any class (so largest / smallest <= ratio; GX has no ratio expectation, the per-class column makes it
    one and names the classes that are too small).
    """
    suite = gx.ExpectationSuite(name=CLASS_SUITE_NAME)
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="n_tiles", min_value=min_class_count))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="largest_to_this", max_value=max_imbalance_ratio))
    return suite


def build_folds_suite(has_clusters: bool, has_test: bool) -> gx.ExpectationSuite:
    """Return the folds suite over the per-tile table of :func:`folds_table`.

    Every tile is in exactly one partition (one validation fold, or the test set) and in the manifest; each
    group's tiles fall in one fold (so no group is on both sides of any fold) and never span the test set and a
    fold; the same for each near-duplicate cluster when the table has them.
    """
    suite = gx.ExpectationSuite(name=FOLDS_SUITE_NAME)
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="in_manifest", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="n_assignments", min_value=1, max_value=1))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="group_fold_count", max_value=1))
    if has_test:
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="group_spans_test", value_set=[False]))
    if has_clusters:
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="cluster_fold_count", max_value=1))
        if has_test:
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="cluster_spans_test", value_set=[False]))
    return suite


def build_fold_classes_suite() -> gx.ExpectationSuite:
    """Return the warning-only suite over :func:`fold_class_table`: every class occurs in every validation fold.

    Patient-level folds of this collection often miss a class; that weakens per-class metrics of the fold but
    is not a data error, hence the ``warning`` severity.
    """
    suite = gx.ExpectationSuite(name=FOLD_CLASSES_SUITE_NAME)
    suite.add_expectation(
        gxe.ExpectColumnValuesToBeBetween(column="n_val_tiles", min_value=1, severity=FailureSeverity.WARNING)
    )
    return suite


# --------------------------------------------------------------------------------------------------------------
# Running suites (and Data Docs).


@dataclass(frozen=True)
class SuiteBatch:
    """A suite to run on one dataframe.

    Attributes:
        name: Data source, asset and validation definition name.
        build: Builds the suite (GX wants an active context first).
        frame: The dataframe to validate.
        key: Column naming a row in reports (``path`` for tiles).
    """

    name: str
    build: Callable[[], gx.ExpectationSuite]
    frame: pd.DataFrame
    key: str


def run_suites(batches: Sequence[SuiteBatch], docs_dir: str | Path | None = None) -> tuple[list[Any], Path | None]:
    """Run suites in one ephemeral GX context, optionally building Data Docs into ``docs_dir``.

    Each suite runs through a Checkpoint; with ``docs_dir`` the checkpoint's UpdateDataDocsAction renders every
    result into a local site in that folder (and nowhere else: the context is in memory and its default site is
    not built). The HTML needs no network to be written; viewed offline it lacks the CDN styling.

    Args:
        batches: The suites and their dataframes.
        docs_dir: Data Docs folder, or None for none.

    Returns:
        The validation results (one per batch, in order) and the Data Docs ``index.html`` (None without docs).
    """
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions: list[Any] = []
    if docs_dir is not None:
        docs_dir = Path(docs_dir).resolve()
        docs_dir.mkdir(parents=True, exist_ok=True)
        # show_how_to_buttons is a SiteBuilder option GX's TypedDict does not declare.
        site: Any = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        }
        context.add_data_docs_site(site_name=DOCS_SITE, site_config=site)
        actions.append(UpdateDataDocsAction(name="data-docs", site_names=[DOCS_SITE]))
    results = []
    for batch in batches:
        definition = (
            context.data_sources.add_pandas(batch.name)
            .add_dataframe_asset(batch.name)
            .add_batch_definition_whole_dataframe("all")
        )
        suite = context.suites.add(batch.build())
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=batch.name, data=definition, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=batch.name,
                validation_definitions=[validation],
                actions=actions,
                result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [batch.key]},
            )
        )
        run = checkpoint.run(batch_parameters={"dataframe": batch.frame})
        results.append(next(iter(run.run_results.values())))
    index = docs_dir / "index.html" if docs_dir is not None else None
    return results, index


def _severity(config: Any) -> str:
    severity = getattr(config, "severity", None) or "critical"
    return str(getattr(severity, "value", severity))


def _plain(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def describe_result(
    result: Any, table: pd.DataFrame, key: str, explain: Mapping[str, str] | None = None, suite: str = ""
) -> dict[str, Any]:
    """Turn one expectation result into a report entry naming the failing rows.

    Args:
        result: A GX ``ExpectationValidationResult``.
        table: The validated dataframe.
        key: The column naming rows (``path``: the entry lists ``failing_files``; else ``failing_rows``).
        explain: Checked column -> column whose value explains a failing row (default: the checked column).
        suite: The suite's name, recorded in the entry.

    Returns:
        ``suite``, ``expectation``, ``column``, ``kwargs``, ``severity``, ``success``, ``unexpected_count`` and,
        when rows fail, their keys and ``values`` (or ``errors`` for undecodable tiles).
    """
    config = result.expectation_config
    column = config.kwargs.get("column")
    entry: dict[str, Any] = {
        "suite": suite,
        "expectation": config.type,
        "column": column,
        "kwargs": {k: _plain(v) for k, v in config.kwargs.items() if k not in ("column", "batch_id")},
        "severity": _severity(config),
        "success": bool(result.success),
    }
    details = result.result or {}
    failing = sorted(
        {
            str(item[key])
            for item in details.get("unexpected_index_list") or []
            if isinstance(item, dict) and key in item
        }
    )
    if "unexpected_count" in details:
        entry["unexpected_count"] = int(details["unexpected_count"])
    if failing:
        listed = failing[:MAX_LISTED_FILES]
        entry["failing_files" if key == "path" else "failing_rows"] = listed
        source = (explain or {}).get(column, column)
        if source in table.columns:
            values = dict(zip(table[key].astype(str), table[source], strict=True))
            entry["errors" if source == "decode_error" else "values"] = {k: _plain(values.get(k)) for k in listed}
    if config.type == "expect_column_distinct_values_to_contain_set" and column in table.columns:
        present = set(table[column].dropna().astype(str))
        entry["missing_classes"] = [c for c in config.kwargs.get("value_set", []) if c not in present]
    exception = getattr(result, "exception_info", None) or {}
    if isinstance(exception, dict) and exception.get("raised_exception"):
        entry["exception"] = str(exception.get("exception_message"))
    return entry


def _docs_location(index: Path | None, report_path: str | Path | None) -> str | None:
    if index is None:
        return None
    if report_path is not None:
        try:
            return index.relative_to(Path(report_path).resolve().parent).as_posix()
        except ValueError:
            pass
    return str(index)


def _run_with_docs(batches: Sequence[SuiteBatch], docs_dir: str | Path | None) -> tuple[list[Any], Path | None, str]:
    """Run the suites; if building Data Docs fails, run them again without and say why (docs are a by-product)."""
    try:
        results, index = run_suites(batches, docs_dir)
    except (GreatExpectationsError, OSError) as exc:
        if docs_dir is None:
            raise
        log.warning("Data Docs could not be built in %s (%s); validating without them", docs_dir, exc)
        results, _ = run_suites(batches, None)
        return results, None, f"Data Docs not built in {docs_dir}: {exc}"
    return results, index, ""


# --------------------------------------------------------------------------------------------------------------
# The tile validation.


def check_tiles(
    table: pd.DataFrame, config: Config, docs_dir: str | Path | None = None, report_path: str | Path | None = None
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Run the tile and class suites on an inspected table (see :func:`inspect_tiles`) and build the report.

    Args:
        table: The manifest plus the decoding columns.
        config: Uses ``data.classes`` and ``validate``.
        docs_dir: Data Docs folder, or None for none.
        report_path: Where the report will be written (only to express the Data Docs path relative to it).

    Returns:
        The report (not written) and the table with the computed columns (what ``tiles.csv`` holds).
    """
    settings = config.validate
    classes = list(config.data.classes)
    table, found = add_computed_columns(table, settings.near_duplicate_distance)
    classes_frame = class_table(table["label"], classes)
    results, index, docs_problem = _run_with_docs(_tile_batches(table, classes_frame, classes, settings), docs_dir)
    expectations = [describe_result(r, table, "path", _TILE_EXPLAIN, SUITE_NAME) for r in results[0].results]
    expectations += [describe_result(r, classes_frame, "label", None, CLASS_SUITE_NAME) for r in results[1].results]
    failed = [e for e in expectations if not e["success"] and e["severity"] != "warning"]

    duplicates, n_duplicates = exact_duplicate_pairs(table)
    low = table[table["tissue_fraction"] < settings.min_tissue_fraction].sort_values(["tissue_fraction", "path"])
    low_tissue = [
        {"path": str(p), "tissue_fraction": float(f)} for p, f in zip(low["path"], low["tissue_fraction"], strict=True)
    ][:MAX_LISTED_LOW_TISSUE]
    finite = [r for r in classes_frame["largest_to_this"] if math.isfinite(r)]
    imbalance = max(classes_frame["largest_to_this"]) if len(finite) == len(classes_frame) else None
    warnings = _tile_warnings(table, low, n_duplicates, found, settings)
    if docs_problem:
        warnings.append(docs_problem)

    report: dict[str, Any] = {
        "success": not failed,
        "suite": SUITE_NAME,
        "suites": [SUITE_NAME, CLASS_SUITE_NAME],
        "n_tiles": len(table),
        "class_counts": dict(zip(classes_frame["label"], classes_frame["n_tiles"].astype(int), strict=True)),
        "imbalance_ratio": None if imbalance is None else round(float(imbalance), 4),
        "n_slides": int(table["slide"].nunique()),
        "n_cases": int(table["case"].nunique()),
        "failed": failed,
        "warnings": warnings,
        "duplicates": duplicates,
        "n_duplicate_pairs": n_duplicates,
        "near_duplicates": found.pairs,
        "n_near_duplicate_pairs": found.n_pairs,
        "n_near_duplicate_clusters": found.n_clusters,
        "low_tissue": low_tissue,
        "n_low_tissue": len(low),
        "data_docs": _docs_location(index, report_path),
        "expectations": expectations,
    }
    return report, table


#: Tile-suite column -> the column whose value explains a failing tile in the report.
_TILE_EXPLAIN: Mapping[str, str] = {
    "decodes": "decode_error",
    "sha256_label_count": "sha256_labels",
    "near_dup_cluster_size": "near_dup_cluster",
}


def _tile_batches(
    table: pd.DataFrame, classes_frame: pd.DataFrame, classes: list[str], settings: ValidateConfig
) -> list[SuiteBatch]:
    """Return the tile suite on the tile table and the class suite on the per-class counts."""
    return [
        SuiteBatch(
            SUITE_NAME,
            lambda: build_suite(
                classes, settings.min_size, settings.min_tissue_fraction, settings.max_low_tissue_share
            ),
            table,
            "path",
        ),
        SuiteBatch(
            CLASS_SUITE_NAME,
            lambda: build_class_suite(settings.min_class_count, settings.max_imbalance_ratio),
            classes_frame,
            "label",
        ),
    ]


def _tile_warnings(
    table: pd.DataFrame, low: pd.DataFrame, n_duplicates: int, found: NearDuplicates, settings: ValidateConfig
) -> list[str]:
    """Return the tile report's warnings: near-blank tiles, exact and near duplicates."""
    warnings: list[str] = []
    n_decoded = int(table["tissue_fraction"].notna().sum())
    if len(low):
        share = len(low) / max(n_decoded, 1)
        names = [f"{Path(str(p)).name} ({f:.2f})" for p, f in zip(low["path"], low["tissue_fraction"], strict=True)]
        warnings.append(
            f"{len(low)} near-blank tile(s) ({share:.1%} of decoded tiles; at most "
            f"{settings.max_low_tissue_share:.0%} allowed) with tissue_fraction < {settings.min_tissue_fraction}: "
            + ", ".join(names[:10])
            + (", ... (see low_tissue)" if len(names) > 10 else "")
        )
    if n_duplicates:
        warnings.append(f"{n_duplicates} exact duplicate pair(s) (same sha256), listed under duplicates")
    if found.n_pairs:
        warnings.append(
            f"{found.n_pairs} near-duplicate pair(s) (phash distance <= {settings.near_duplicate_distance}) in "
            f"{found.n_clusters} cluster(s), listed under near_duplicates; the split keeps each cluster in one fold"
        )
    return warnings


def validate_dataset(
    manifest: pd.DataFrame,
    manifest_dir: str | Path,
    config: Config,
    report_path: str | Path,
    *,
    docs_dir: str | Path | None = None,
    tiles_path: str | Path | None = None,
) -> dict[str, Any]:
    """Validate the data set and write the JSON report (and, when asked, ``tiles.csv`` and Data Docs).

    Args:
        manifest: The tile manifest.
        manifest_dir: The folder its paths are relative to.
        config: Uses ``data.classes`` and ``validate``.
        report_path: Where the JSON report goes (written whether or not validation passes).
        docs_dir: Data Docs folder (written whether or not validation passes), or None for none.
        tiles_path: Where to write the per-tile table (manifest columns plus :data:`TILE_COLUMNS`), or None.

    Returns:
        The report.

    Raises:
        DataValidationError: At least one error-severity expectation failed; the message names each one and its
            failing files.
    """
    start = time.perf_counter()
    table = inspect_tiles(manifest, manifest_dir, config.validate.workers)
    decoded = time.perf_counter()
    fault_point("validate")
    report, table = check_tiles(table, config, docs_dir, report_path)
    if tiles_path is not None:
        write_manifest(table[[*MANIFEST_COLUMNS, *TILE_COLUMNS]], tiles_path)
    write_json(report_path, report)
    log.info(
        "validated %d tiles: decoding %.1f s, suites%s %.1f s",
        len(table),
        decoded - start,
        " and Data Docs" if docs_dir is not None else "",
        time.perf_counter() - decoded,
    )
    for warning in report["warnings"]:
        log.warning("%s", warning)
    if not report["success"]:
        raise DataValidationError(format_failures(report, str(report_path)))
    log.info("data validation passed: %d expectations on %d tiles", len(report["expectations"]), len(table))
    return report


def format_failures(report: dict[str, Any], report_path: str) -> str:
    """Return a readable summary of a failed validation report: each failed expectation and its files."""
    lines = [f"data validation failed: {len(report['failed'])} expectation(s) not met (full report: {report_path})"]
    for failure in report["failed"]:
        what = f"{failure['expectation']}({failure['column'] or ''}"
        what += (", " + ", ".join(f"{k}={v}" for k, v in failure["kwargs"].items()) + ")") if failure["kwargs"] else ")"
        count = failure.get("unexpected_count")
        unit = "tile(s)" if "failing_rows" not in failure else "row(s)"
        lines.append(f"  - {what}" + (f": {count} {unit}" if count is not None else ""))
        if failure.get("missing_classes"):
            lines.append(f"      missing classes: {failure['missing_classes']}")
        explained = failure.get("errors") or failure.get("values") or {}
        failing = failure.get("failing_files") or failure.get("failing_rows") or []
        for name in failing[:10]:
            lines.append(f"      {name}" + (f": {explained[name]}" if name in explained else ""))
        if len(failing) > 10:
            lines.append(f"      ... and {len(failing) - 10} more in the report")
        if failure.get("exception"):
            lines.append(f"      error: {failure['exception']}")
    return "\n".join(lines)


def summarise(report: dict[str, Any]) -> str:
    """Return a short multi-line summary of a tile (or folds) validation report for the command line."""
    status = "passed" if report["success"] else f"FAILED ({len(report['failed'])} expectation(s) not met)"
    if report.get("suite") == FOLDS_SUITE_NAME:
        lines = [
            f"folds: {report['n_folds']} folds grouped by {report['group_by']}, {report['n_tiles']} tiles "
            f"({report['n_test']} held out for test)",
            f"validation: {status}, {len(report['expectations'])} expectations",
        ]
    else:
        counts = ", ".join(f"{label} {n}" for label, n in report["class_counts"].items())
        ratio = report.get("imbalance_ratio")
        lines = [
            f"tiles: {report['n_tiles']} in {len(report['class_counts'])} classes ({counts})",
            f"slides: {report['n_slides']}, cases: {report['n_cases']}, imbalance (largest/smallest): "
            + (f"{ratio:.2f}" if ratio is not None else "undefined (a class is empty)"),
            f"validation: {status}, {len(report['expectations'])} expectations",
        ]
        lines.append(
            f"near-blank: {report.get('n_low_tissue', 0)}, "
            f"exact duplicate pairs: {report.get('n_duplicate_pairs', 0)}, "
            f"near-duplicate pairs: {report.get('n_near_duplicate_pairs', 0)}"
        )
    if report.get("warnings"):
        lines.append("warnings:")
        lines.extend(f"  - {w}" for w in report["warnings"])
    for failure in report.get("failed", []):
        failing = failure.get("failing_files") or failure.get("failing_rows") or []
        shown = ", ".join(Path(f).name for f in failing[:3]) + (" ..." if len(failing) > 3 else "")
        lines.append(f"error: {failure['expectation']}({failure['column'] or ''})" + (f": {shown}" if shown else ""))
    if report.get("data_docs"):
        lines.append(f"data docs: {report['data_docs']}")
    return "\n".join(lines)


def run_validation(config: Config, manifest_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """The validate stage: run the suites on the manifest and write ``report.json``, ``tiles.csv`` and Data Docs.

    Everything is written into ``out_dir`` even when validation fails (outside the atomic output folder), so
    the user can read which files failed; the raised :class:`DataValidationError` stops the pipeline.
    """
    manifest_path = Path(manifest_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(config, out_dir, ("data", "validate"))
    docs = out_dir / DOCS_DIR
    if docs.exists():
        shutil.rmtree(docs)  # pages of an earlier run would linger beside the new index
    return validate_dataset(
        read_manifest(manifest_path),
        manifest_path.parent,
        config,
        out_dir / REPORT_FILE,
        docs_dir=docs,
        tiles_path=out_dir / TILES_FILE,
    )


# --------------------------------------------------------------------------------------------------------------
# The folds validation.


def folds_table(
    manifest: pd.DataFrame, folds: Mapping[str, Any], table: pd.DataFrame | None, group_by: str
) -> pd.DataFrame:
    """Return one row per tile (manifest tiles and any unknown path the folds name) with its fold assignment.

    Columns: ``path``, ``label``, ``group``, ``in_manifest``, ``n_assignments`` (validation folds plus the test
    set holding the tile), ``partition`` (``fold <k>`` or ``test``), ``group_fold_count`` (distinct folds the
    group's tiles fall in), ``group_spans_test``, ``group_where`` (the group and its partitions, for reports), and
    with near-duplicate clusters the same for ``cluster_*`` plus ``near_dup_cluster``.

    Raises:
        SplitError: The folds document has no ``folds`` list of ``fold``/``val_paths`` entries.
    """
    entries = folds.get("folds")
    if not isinstance(entries, list) or not all(isinstance(f, Mapping) and "val_paths" in f for f in entries):
        raise SplitError("folds document has no 'folds' list of entries with 'val_paths'; expected make_folds output")
    assigned: dict[str, list[str]] = {}
    for index, fold in enumerate(entries):
        for path in fold["val_paths"]:
            assigned.setdefault(str(path), []).append(f"fold {fold.get('fold', index)}")
    for path in folds.get("test_paths") or []:
        assigned.setdefault(str(path), []).append("test")

    base = pd.DataFrame(
        {
            "path": manifest["path"].astype(str),
            "label": manifest["label"].astype("string"),
            "group": manifest[group_by].astype("string"),
        }
    )
    base["in_manifest"] = True
    unknown = sorted(set(assigned) - set(base["path"]))
    if unknown:
        extra = pd.DataFrame({"path": unknown, "label": pd.NA, "group": pd.NA, "in_manifest": False})
        base = pd.concat([base, extra.astype(base.dtypes.to_dict())], ignore_index=True)
    base["n_assignments"] = base["path"].map(lambda p: len(assigned.get(p, [])))
    base["partition"] = base["path"].map(lambda p: assigned[p][0] if p in assigned else None)
    units: list[tuple[str, str]] = [("group", "group")]
    if table is not None and "near_dup_cluster" in table.columns:
        clusters = dict(zip(table["path"].astype(str), table["near_dup_cluster"].astype("string"), strict=True))
        # A tile the tile table does not know is a cluster of its own.
        base["near_dup_cluster"] = [clusters.get(p) if pd.notna(clusters.get(p)) else p for p in base["path"]]
        units.append(("cluster", "near_dup_cluster"))
    in_fold = base["partition"].str.startswith("fold", na=False)
    in_test = base["partition"].eq("test")
    for prefix, column in units:
        keyed = base[column].fillna(base["path"])
        fold_partition = base["partition"].where(in_fold)
        base[f"{prefix}_fold_count"] = fold_partition.groupby(keyed).transform("nunique").astype(int)
        spans = in_fold.groupby(keyed).transform("any") & in_test.groupby(keyed).transform("any")
        base[f"{prefix}_spans_test"] = spans.astype(bool)
        where = base.groupby(keyed)["partition"].agg(lambda s: sorted({str(v) for v in s.dropna()}))
        base[f"{prefix}_where"] = [f"{column} {k} in {where[k]}" for k in keyed]
    return base


def fold_class_table(frame: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Return one row per (validation fold, class): ``fold_class`` (``fold <k>: <class>``) and ``n_val_tiles``."""
    folds = sorted({p for p in frame["partition"].dropna() if str(p).startswith("fold")}, key=lambda p: int(p[5:]))
    rows = []
    for fold in folds:
        counts = frame.loc[frame["partition"] == fold, "label"].value_counts()
        for label in classes:
            rows.append({"fold_class": f"{fold}: {label}", "n_val_tiles": int(counts.get(label, 0))})
    return pd.DataFrame(rows, columns=["fold_class", "n_val_tiles"])


def validate_folds(
    manifest: pd.DataFrame,
    folds: dict[str, Any],
    table: pd.DataFrame | None,
    config: Config,
    *,
    docs_dir: str | Path | None = None,
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """Check a folds document with the folds suites: no leakage across folds or into the test set.

    Errors: a tile in no or several partitions (folds / test) or not in the manifest; a group (``group_by`` of
    the folds document: slide or case) whose tiles fall in two folds, i.e. on both sides of a fold; a group in
    the test set and a fold; the same for near-duplicate clusters when ``table`` has ``near_dup_cluster``.
    Warning: a validation fold without tiles of some class.

    Args:
        manifest: The tile manifest.
        folds: The folds document (``folds[*].val_paths``, ``group_by``, optional top-level ``test_paths``).
        table: The validate stage's ``tiles.csv`` (see :func:`read_tiles`), or None to skip the cluster checks.
        config: Uses ``data.classes`` and ``split.group_by`` (when the document names none).
        docs_dir: Data Docs folder, or None for none.
        report_path: Where to write the JSON report (also on failure), or None.

    Returns:
        The report: ``success``, ``failed``, ``warnings``, ``missing_val_classes`` ({fold: [classes]}),
        ``data_docs``, ``expectations`` and counts.

    Raises:
        SplitError: The document is malformed or its grouping column is not in the manifest.
        DataValidationError: An error-severity expectation failed; the message names the files.
    """
    group_by = str(folds.get("group_by") or config.split.group_by)
    if group_by not in manifest.columns:
        raise SplitError(f"folds group_by={group_by!r} is not a manifest column; expected one of ['slide', 'case']")
    classes = list(config.data.classes)
    frame = folds_table(manifest, folds, table, group_by)
    per_class = fold_class_table(frame, classes)
    has_clusters = "near_dup_cluster" in frame.columns
    has_test = bool(folds.get("test_paths"))
    batches = [
        SuiteBatch(FOLDS_SUITE_NAME, lambda: build_folds_suite(has_clusters, has_test), frame, "path"),
        SuiteBatch(FOLD_CLASSES_SUITE_NAME, build_fold_classes_suite, per_class, "fold_class"),
    ]
    results, index, docs_problem = _run_with_docs(batches, docs_dir)
    expectations = [describe_result(r, frame, "path", _FOLDS_EXPLAIN, FOLDS_SUITE_NAME) for r in results[0].results]
    expectations += [
        describe_result(r, per_class, "fold_class", None, FOLD_CLASSES_SUITE_NAME) for r in results[1].results
    ]
    failed = [e for e in expectations if not e["success"] and e["severity"] != "warning"]
    missing = _missing_val_classes(per_class)
    warnings = [f"{fold} validation set has no tiles of {labels}" for fold, labels in missing.items()]
    if docs_problem:
        warnings.append(docs_problem)
    report: dict[str, Any] = {
        "success": not failed,
        "suite": FOLDS_SUITE_NAME,
        "suites": [FOLDS_SUITE_NAME, FOLD_CLASSES_SUITE_NAME],
        "group_by": group_by,
        "n_tiles": int(frame["in_manifest"].sum()),
        "n_folds": len(folds["folds"]),
        "n_test": int(frame["partition"].eq("test").sum()),
        "checks_near_duplicates": has_clusters,
        "failed": failed,
        "warnings": warnings,
        "missing_val_classes": missing,
        "data_docs": _docs_location(index, report_path),
        "expectations": expectations,
    }
    if report_path is not None:
        write_json(report_path, report)
    for warning in warnings:
        log.warning("%s", warning)
    if failed:
        raise DataValidationError(format_failures(report, str(report_path or "not written")))
    return report


#: Folds-suite column -> the column whose value explains a failing tile in the report.
_FOLDS_EXPLAIN: Mapping[str, str] = {
    "group_fold_count": "group_where",
    "group_spans_test": "group_where",
    "cluster_fold_count": "cluster_where",
    "cluster_spans_test": "cluster_where",
}


def _missing_val_classes(per_class: pd.DataFrame) -> dict[str, list[str]]:
    """Return, per validation fold of :func:`fold_class_table` missing a class, the classes it has no tiles of."""
    missing: dict[str, list[str]] = {}
    for name in per_class.loc[per_class["n_val_tiles"] < 1, "fold_class"]:
        fold, label = name.split(": ", 1)
        missing.setdefault(fold, []).append(label)
    return missing
