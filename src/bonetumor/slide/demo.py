"""Slides with a known layout: a pyramidal tiled TIFF composed of tiles on a grid, for the demo, tests and benchmark.

A layout is a list of rows of cell codes: ``N`` Non-Tumor, ``X`` Non-Viable-Tumor (necrosis), ``V`` Viable-Tumor,
``.`` glass. Each cell is one tile of ``tile_px`` pixels. :func:`sample_tile_source` fills cells with the real
sample tiles of each class (in turn), so the demo slide is real tissue; tests pass tiles of their own.

The TIFF is what OpenSlide reads as a ``generic-tiff`` slide: 256 px tiles, zlib, one reduced page per level
(``subfiletype=1``), and the resolution tags in pixels per centimetre, so ``openslide.mpp-x`` is set.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from bonetumor.errors import ConfigError, DatasetError

#: Cell code to class name; ``.`` is glass.
CELL_CLASSES: dict[str, str] = {"N": "Non-Tumor", "X": "Non-Viable-Tumor", "V": "Viable-Tumor"}
GLASS = "."
#: The demo layout: a tissue section on glass, viable tumour rimmed by necrosis, normal tissue at one edge.
#: 23 necrotic and 20 viable tiles: 53.5 % necrosis (a poor response by Huvos).
DEMO_LAYOUT: tuple[str, ...] = (
    "............",
    "..NNNNNN....",
    ".NNXXXXXNN..",
    ".NXXVVVVXXN.",
    ".NXVVVVVVXN.",
    ".NXVVVVVVXN.",
    "..XXVVVVXXN.",
    "...XXXXXXN..",
    "....NNNN....",
    "............",
)
#: Pixels of one demo cell, and what it stands for: a sample file is a 1024 px TCIA tile at 10x resized to
#: 256 px, so 1024 um over 256 px.
DEMO_TILE_PX = 256
DEMO_MPP = 4.0

TileFactory = Callable[[str, int], Image.Image]


def layout_counts(layout: Sequence[str]) -> dict[str, int]:
    """Cells per class of a layout (glass not counted)."""
    return {name: sum(row.count(code) for row in layout) for code, name in CELL_CLASSES.items()}


def layout_necrosis_percent(layout: Sequence[str]) -> float:
    """The percent necrosis a layout shows: necrotic / (necrotic + viable) cells."""
    counts = layout_counts(layout)
    tumour = counts["Non-Viable-Tumor"] + counts["Viable-Tumor"]
    return 100.0 * counts["Non-Viable-Tumor"] / tumour


def _check_layout(layout: Sequence[str]) -> None:
    widths = {len(row) for row in layout}
    if not layout or len(widths) != 1:
        raise ConfigError(f"slide layout: expected rows of equal length, got lengths {sorted(widths)}")
    unknown = {c for row in layout for c in row} - set(CELL_CLASSES) - {GLASS}
    if unknown:
        raise ConfigError(f"slide layout: unknown cell codes {sorted(unknown)}; expected N, X, V or . (glass)")


def compose_layout(layout: Sequence[str], tile_for: TileFactory, tile_px: int) -> np.ndarray:
    """The layout as one RGB array: each cell a tile from ``tile_for(class name, index of that class)``, glass white.

    Raises:
        ConfigError: Rows of unequal length or an unknown code.
    """
    _check_layout(layout)
    canvas = np.full((len(layout) * tile_px, len(layout[0]) * tile_px, 3), 255, dtype=np.uint8)
    seen: dict[str, int] = {}
    for r, row in enumerate(layout):
        for c, code in enumerate(row):
            if code == GLASS:
                continue
            name = CELL_CLASSES[code]
            tile = tile_for(name, seen.get(name, 0)).convert("RGB")
            seen[name] = seen.get(name, 0) + 1
            if tile.size != (tile_px, tile_px):
                tile = tile.resize((tile_px, tile_px), Image.Resampling.LANCZOS)
            canvas[r * tile_px : (r + 1) * tile_px, c * tile_px : (c + 1) * tile_px] = np.asarray(tile)
    return canvas


def _levels(image: np.ndarray, smallest: int) -> Iterator[np.ndarray]:
    """The image, then halved until its longest side is at most ``smallest``."""
    level = image
    yield level
    while max(level.shape[:2]) > smallest:
        pil = Image.fromarray(level)
        level = np.asarray(pil.reduce(2))
        yield level


def write_pyramidal_tiff(image: np.ndarray, path: str | Path, mpp: float, tile: int = 256) -> Path:
    """Write an RGB array as a pyramidal tiled TIFF that OpenSlide opens (``generic-tiff``, mpp set).

    Args:
        image: Height x width x 3, uint8.
        path: The .tif to write.
        mpp: Microns per pixel of level 0.
        tile: TIFF tile side.

    Returns:
        The path.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(_levels(image, tile)):
            downsample = image.shape[1] / level.shape[1]
            pixels_per_cm = 1e4 / (mpp * downsample)
            tif.write(
                level,
                photometric="rgb",
                tile=(tile, tile),
                compression="zlib",
                resolution=(pixels_per_cm, pixels_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if index == 0 else 1,
            )
    return path


def sample_tile_source(source: str | Path, classes: Sequence[str] = tuple(CELL_CLASSES.values())) -> TileFactory:
    """Tiles from a folder of class sub-folders (the sample): class ``name``'s files in name order, in turn.

    Raises:
        DatasetError: A class folder is missing or holds no images.
    """
    folder = Path(source)
    files: Mapping[str, list[Path]] = {
        name: sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".tif"})
        for name in classes
    }
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise DatasetError(f"{folder}: no tiles for {empty}; expected one sub-folder of images per class")
    cycles = {name: itertools.cycle(paths) for name, paths in files.items()}

    def tile_for(name: str, index: int) -> Image.Image:
        with Image.open(next(cycles[name])) as image:
            return image.convert("RGB")

    return tile_for


def write_demo_slide(
    path: str | Path,
    tile_for: TileFactory,
    layout: Sequence[str] = DEMO_LAYOUT,
    tile_px: int = DEMO_TILE_PX,
    mpp: float = DEMO_MPP,
) -> Path:
    """Compose a layout and write it as a pyramidal TIFF (see the module docstring)."""
    return write_pyramidal_tiff(compose_layout(layout, tile_for, tile_px), path, mpp)
