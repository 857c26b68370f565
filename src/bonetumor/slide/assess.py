"""Percent necrosis over a whole slide: tile it at the training scale, classify every tissue tile, summarise.

1. Open the input (:func:`bonetumor.slide.sources.open_source`) and fix its scale: ``assess.mpp``, else what the
   slide records; a tile then spans ``assess.tile_microns`` of tissue, as a training tile did.
2. Lay a grid of such tiles and keep those the thumbnail's tissue mask covers (validation's tissue rule); a tile
   set brings its own tiles.
3. Read the kept tiles at ``assess.read_size`` in worker threads, a bounded number ahead of the model, and skip a
   tile whose own tissue share is below ``assess.min_tissue_fraction``.
4. Classify them in batches with the served model's own engine, preprocessing, test-time views and referral
   rule (:meth:`bonetumor.serving.served.ServedModel.classify_tiles`).
5. Summarise (:func:`bonetumor.slide.necrosis.necrosis_summary`) and write ``assessment.json``, ``tiles.csv``,
   ``tiles.geojson`` (QuPath) and ``overlay.png``.

Nothing here imports BentoML: ``bonetumor assess`` and the service's ``/assess`` task call :func:`assess_slide`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from bonetumor.config import AssessConfig
from bonetumor.errors import ConfigError, InvalidImageError, SlideError
from bonetumor.slide.exports import TileRow, write_geojson, write_overlay, write_tiles_csv
from bonetumor.slide.necrosis import TileCall, necrosis_summary
from bonetumor.slide.sources import SlideSource, TileSetSource, TileSpec, open_source
from bonetumor.transforms.tissue import tissue_fraction, tissue_mask

log = logging.getLogger(__name__)

#: Names of the files an assessment writes into its folder.
OUTPUT_FILES = {
    "json": "assessment.json",
    "csv": "tiles.csv",
    "geojson": "tiles.geojson",
    "overlay": "overlay.png",
}
#: Thumbnail pixels a tile must span at least, so the mask can tell a tile's tissue share.
MIN_THUMB_PX_PER_TILE = 8
#: Largest thumbnail side, whatever the tile count (memory of the mask and the overlay).
MAX_THUMBNAIL_SIDE = 16384
#: Suffixes of slide formats: one of them read as a plain image earns a warning.
SLIDE_SUFFIXES = frozenset({".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"})
#: Fewest slide pixels a tile may span: below this the scale is surely wrong.
MIN_TILE_SIDE = 16
#: The thumbnail's mask averages ~128 um per pixel, which lowers the saturation of faint tissue: it pre-selects
#: at this share of ``assess.min_tissue_fraction``, and the read tile decides.
THUMBNAIL_THRESHOLD_SHARE = 0.5
#: Most unreadable tiles of a tile set listed in the answer.
LISTED_FAILURES = 20

ProgressCallback = Callable[[int, int], None]


class TileClassifier(Protocol):
    """What the assessment needs of a model: :class:`bonetumor.serving.served.ServedModel` is one."""

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in output order."""
        ...

    @property
    def model_fields(self) -> dict[str, str]:
        """Name, version, run id and runtime."""
        ...

    def classify_tiles(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Answer each RGB tile: ``label``, ``probabilities``, ``referral``."""
        ...


@dataclass
class Assessment:
    """An assessment's answer and where its files are.

    Attributes:
        summary: The JSON answer (also in ``assessment.json``).
        files: Output kind (``json``, ``csv``, ``geojson``, ``overlay``) to path.
    """

    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class _Scale:
    mpp: float
    source: str
    tile_side: int


def _scale(source: SlideSource, config: AssessConfig) -> _Scale:
    """Microns per pixel and the tile side in level-0 pixels; refuse an input whose scale is unknown."""
    if isinstance(source, TileSetSource):
        mpp, origin = config.tile_microns / config.tcia_tile_px, "a TCIA tile set (assess.tile_microns / tcia_tile_px)"
        if config.mpp:
            mpp, origin = config.mpp, "assess.mpp"
        return _Scale(mpp, origin, config.tcia_tile_px)
    if config.mpp:
        mpp, origin = config.mpp, "assess.mpp (override)"
    else:
        recorded = source.recorded_mpp()
        if recorded is None:
            raise SlideError(
                f"{source.name}: the input records no microns per pixel (OpenSlide's openslide.mpp-x, or a "
                "TIFF's resolution tags), so the tile size that matches the training tiles is unknown; expected "
                "--mpp (assess.mpp), e.g. 0.25 for a 40x scan, 0.5 for 20x, 1.0 for 10x"
            )
        mpp, origin = recorded, "the slide's metadata"
    side = round(config.tile_microns / mpp)
    if side < MIN_TILE_SIDE:
        raise SlideError(
            f"{source.name}: at {mpp:g} um/px ({origin}) a {config.tile_microns:g} um tile spans {side} px; expected "
            f"at least {MIN_TILE_SIDE} px: check the scale (--mpp is microns per pixel, e.g. 0.25 for 40x)"
        )
    width, height = source.dimensions
    if side > min(width, height):
        raise SlideError(
            f"{source.name}: {width}x{height} px at {mpp:g} um/px is smaller than one tile ({side} px = "
            f"{config.tile_microns:g} um, assess.tile_microns); expected a slide larger than a training tile, "
            "or check the scale (--mpp)"
        )
    return _Scale(mpp, origin, side)


def _thumbnail_side(dimensions: tuple[int, int], tile_side: int, configured: int) -> int:
    tiles_across = math.ceil(max(dimensions) / tile_side)
    return int(min(max(configured, MIN_THUMB_PX_PER_TILE * tiles_across), MAX_THUMBNAIL_SIDE, max(dimensions)))


def grid_tiles(
    dimensions: tuple[int, int], side: int, mask: np.ndarray, min_fraction: float
) -> tuple[list[TileSpec], tuple[int, int]]:
    """Lay whole tiles of ``side`` level-0 pixels over the slide and keep those the mask covers enough.

    Args:
        dimensions: Level-0 width and height.
        side: Tile side in level-0 pixels.
        mask: The tissue mask of the thumbnail (True = tissue), covering the whole slide.
        min_fraction: Smallest share of a tile's mask pixels that must be tissue.

    Returns:
        The kept tiles, row by row, and the grid's (columns, rows).
    """
    width, height = dimensions
    cols, rows = width // side, height // side
    scale_x, scale_y = mask.shape[1] / width, mask.shape[0] / height
    kept = []
    for row in range(rows):
        y0, y1 = int(row * side * scale_y), max(int(row * side * scale_y) + 1, int((row + 1) * side * scale_y))
        for col in range(cols):
            x0, x1 = int(col * side * scale_x), max(int(col * side * scale_x) + 1, int((col + 1) * side * scale_x))
            if mask[y0:y1, x0:x1].mean() >= min_fraction:
                kept.append(TileSpec(col * side, row * side, side))
    return kept, (cols, rows)


def _read_ahead(
    pool: ThreadPoolExecutor, read: Callable[[TileSpec], Any], tiles: Sequence[TileSpec], ahead: int
) -> Iterator[tuple[TileSpec, Future[Any]]]:
    """Yield each tile with its read, keeping at most ``ahead`` reads in flight (bounded memory)."""
    pending: deque[tuple[TileSpec, Future[Any]]] = deque()
    remaining = iter(tiles)
    for tile in remaining:
        pending.append((tile, pool.submit(read, tile)))
        if len(pending) >= ahead:
            break
    while pending:
        yield pending.popleft()
        nxt = next(remaining, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(read, nxt)))


@dataclass
class _Run:
    """What the classification loop gathers."""

    rows: list[TileRow] = field(default_factory=list)
    skipped_after_read: int = 0
    failures: list[str] = field(default_factory=list)
    read_seconds: float = 0.0
    classify_seconds: float = 0.0


def _classify_all(
    source: SlideSource,
    tiles: Sequence[TileSpec],
    model: TileClassifier,
    config: AssessConfig,
    bar: tqdm[Any],
    on_progress: ProgressCallback | None,
) -> _Run:
    run = _Run()
    tolerate = isinstance(source, TileSetSource)  # one corrupt tile file must not sink the slide

    def read(tile: TileSpec) -> tuple[Image.Image, float, float]:
        start = time.perf_counter()
        image = source.read(tile, config.read_size)
        return image, tissue_fraction(image), time.perf_counter() - start

    batch: list[tuple[TileSpec, Image.Image, float]] = []

    def flush() -> None:
        start = time.perf_counter()
        answers = model.classify_tiles([image for _, image, _ in batch])
        run.classify_seconds += time.perf_counter() - start
        for (tile, _, tissue), answer in zip(batch, answers, strict=True):
            referral = answer.get("referral", {})
            run.rows.append(
                TileRow(
                    tile,
                    answer["label"],
                    answer["probabilities"],
                    bool(referral.get("refer")),
                    str(referral.get("reason", "")),
                    tissue,
                )
            )
        batch.clear()

    done = 0
    pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="slide-read")
    try:
        for tile, future in _read_ahead(pool, read, tiles, 2 * config.batch_size):
            try:
                image, tissue, seconds = future.result()
            except InvalidImageError as exc:
                if not tolerate:
                    raise
                run.failures.append(str(exc))
            else:
                run.read_seconds += seconds
                if tissue < config.min_tissue_fraction:
                    run.skipped_after_read += 1
                else:
                    batch.append((tile, image, tissue))
                if len(batch) >= config.batch_size:
                    flush()
            done += 1
            bar.update(1)
            if on_progress is not None:
                on_progress(done, len(tiles))
        if batch:
            flush()
    finally:
        # On an error, the reads queued ahead are dropped rather than run to no purpose.
        pool.shutdown(wait=True, cancel_futures=True)
    return run


def assess_slide(
    input_path: str | Path,
    model: TileClassifier,
    config: AssessConfig,
    out_dir: str | Path,
    *,
    name: str | None = None,
    progress: bool = True,
    on_progress: ProgressCallback | None = None,
) -> Assessment:
    """Assess one slide: percent necrosis with its interval, the response category, the map and the exports.

    Args:
        input_path: A slide, a large image, or a folder/zip of one slide's TCIA tiles (see
            :data:`bonetumor.slide.sources.EXPECTED_INPUT`).
        model: The served model (``ServedModel``) or anything with its ``classify_tiles``.
        config: The ``assess`` section.
        out_dir: Folder for ``assessment.json``, ``tiles.csv``, ``tiles.geojson`` and ``overlay.png``.
        name: Name of the input in the answer and messages (an upload's file name); defaults to the file name.
        progress: Show a progress bar (tiles, rate, ETA) on stderr.
        on_progress: Called with (tiles read, tiles to read) as the work goes.

    Returns:
        The answer and the written files.

    Raises:
        SlideError: The input is not a slide, cannot be read, has no tissue, or its scale is unknown.
        ConfigError: ``assess.necrotic_class`` or ``viable_class`` is not one of the model's classes.
    """
    started = time.perf_counter()
    source = open_source(input_path, config.max_image_pixels, config.tcia_tile_px)
    if name:
        source.name = name
    try:
        return _assess(source, model, config, Path(out_dir), progress, on_progress, started)
    finally:
        source.close()


def _assess(
    source: SlideSource,
    model: TileClassifier,
    config: AssessConfig,
    out_dir: Path,
    progress: bool,
    on_progress: ProgressCallback | None,
    started: float,
) -> Assessment:
    for field_name in ("necrotic_class", "viable_class"):
        value = getattr(config, field_name)
        if value not in model.classes:
            raise ConfigError(
                f"assess.{field_name}={value!r} is not a class of the model; expected one of {list(model.classes)}"
            )
    scale = _scale(source, config)
    given = source.tiles()
    thumb = source.thumbnail(_thumbnail_side(source.dimensions, scale.tile_side, config.thumbnail_side))
    if given is None:
        tiles, grid = grid_tiles(
            source.dimensions,
            scale.tile_side,
            tissue_mask(thumb),
            config.min_tissue_fraction * THUMBNAIL_THRESHOLD_SHARE,
        )
        candidates = grid[0] * grid[1]
    else:
        tiles, grid, candidates = given, None, len(given)
    with tqdm(total=len(tiles), desc=f"assess {source.name}", unit="tile", disable=not progress) as bar:
        run = _classify_all(source, tiles, model, config, bar, on_progress)
    if not run.rows:
        raise SlideError(
            f"{source.name}: no tissue found: none of the {candidates} tiles of {config.tile_microns:g} um had "
            f"{config.min_tissue_fraction:.0%} tissue or more (assess.min_tissue_fraction)"
            + (f"; {len(run.failures)} tiles could not be read, e.g. {run.failures[0]}" if run.failures else "")
            + "; expected an H&E slide with tissue, at the scale given (--mpp)"
        )
    classes = model.classes
    calls = [TileCall(r.label, r.referred, r.probabilities) for r in run.rows]
    summary = {
        "name": source.name,
        "request_id": uuid.uuid4().hex,
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "input": {
            "kind": source.kind,
            "sha256": source.content_hash(),
            "dimensions": list(source.dimensions),
            "mpp": round(scale.mpp, 6),
            "mpp_source": scale.source,
            # tiles.geojson is relative to this corner (QuPath's view of a slide with OpenSlide bounds).
            "qupath_origin": list(source.origin),
        },
        "tiling": {
            "tile_side_px": scale.tile_side,
            "tile_microns": round(scale.tile_side * scale.mpp, 2),
            "read_size": config.read_size,
            "grid": None if grid is None else {"columns": grid[0], "rows": grid[1]},
            "candidate_tiles": candidates,
            "glass_skipped_by_thumbnail": candidates - len(tiles),
            "glass_skipped_after_read": run.skipped_after_read,
            "unreadable_tiles": len(run.failures),
            "unreadable_examples": run.failures[:LISTED_FAILURES],
        },
        **necrosis_summary(
            calls,
            classes,
            config.necrotic_class,
            config.viable_class,
            (scale.tile_side * scale.mpp / 1000.0) ** 2,
            good_response_percent=config.good_response_percent,
            bootstrap=config.bootstrap,
            confidence_level=config.confidence_level,
            seed=config.seed,
        ),
        "model": model.model_fields,
        "warnings": _warnings(scale, config, run, source),
    }
    return _write(summary, run, thumb, source, classes, out_dir, started)


def _warnings(scale: _Scale, config: AssessConfig, run: _Run, source: SlideSource) -> list[str]:
    notes = []
    if source.kind == "image" and Path(source.name).suffix.lower() in SLIDE_SUFFIXES:
        notes.append(
            f"OpenSlide does not recognise {source.name} as a slide (an untiled TIFF, or a pyramid with missing "
            "levels, for example a truncated file): it was read as a plain image, at full resolution only"
        )
    if scale.tile_side < config.read_size / 2:
        notes.append(
            f"each tile spans only {scale.tile_side} px of the slide, read at {config.read_size} px: the input is "
            f"coarser than the training tiles ({scale.mpp:g} um/px), so tiles are upsampled"
        )
    if run.failures:
        notes.append(f"{len(run.failures)} tile files could not be read and were left out (unreadable_examples)")
    return notes


def _write(
    summary: dict[str, Any],
    run: _Run,
    thumb: Image.Image,
    source: SlideSource,
    classes: Sequence[str],
    out_dir: Path,
    started: float,
) -> Assessment:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {kind: out_dir / name for kind, name in OUTPUT_FILES.items()}
    write_tiles_csv(run.rows, classes, files["csv"])
    write_geojson(run.rows, classes, files["geojson"], source.origin)
    write_overlay(thumb, source.dimensions, run.rows, classes, summary, files["overlay"])
    elapsed = time.perf_counter() - started
    summary["timing"] = {
        "seconds": round(elapsed, 3),
        "tiles_per_second": round(len(run.rows) / elapsed, 2) if elapsed > 0 else None,
        "read_seconds_in_workers": round(run.read_seconds, 3),
        "classify_seconds": round(run.classify_seconds, 3),
    }
    summary["files"] = dict(OUTPUT_FILES)
    files["json"].write_text(json.dumps(summary, indent=2), encoding="utf-8")
    log.info("%s: %s", summary["name"], summary["response"]["text"])
    return Assessment(summary, files)
