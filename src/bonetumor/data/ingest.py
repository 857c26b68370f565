"""Ingest: turn a folder of class sub-folders into a manifest of tiles with case, slide and checksum.

TCIA osteosarcoma tile names carry the patient (case) and the slide: ``Case-48-P5-C20-15162-19423`` is case
``Case-48``, slide ``Case-48-P5-C20``, tile origin (15162, 19423) on that slide. Grouped splits need both, so a
name that does not parse is an error rather than a guess.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from bonetumor.config import Config, save_resolved
from bonetumor.data.manifest import MANIFEST_FILE, relative_posix, write_manifest
from bonetumor.errors import DatasetError, TileNameError
from bonetumor.utils import atomic_dir, sha256_file

log = logging.getLogger(__name__)

_TILE_NAME = re.compile(r"^(?P<case>Case-\d+|P\d+)-(?P<block>(?:[A-Za-z]+\d+-)*[A-Za-z]+\d+)-(?P<x>\d+)-(?P<y>\d+)$")
TILE_NAME_PATTERN = "<case>[-<part>]-<block>-<x>-<y>, e.g. Case-48-P5-C20-15162-19423 or P9-B12-15791-34183"


@dataclass(frozen=True)
class TileName:
    """The parts of a TCIA tile name."""

    case: str
    slide: str
    x: int
    y: int


def normalise_tile_name(stem: str) -> str:
    """Normalise the spaced spelling of the official label file (``Case 48 - P5 C13-1-2``) to ``Case-48-P5-C13-1-2``."""
    return re.sub(r"\s+", "-", stem.strip().replace(" - ", "-"))


def parse_tile_name(name: str) -> TileName:
    """Parse a TCIA tile file name (with or without extension) into case, slide and tile origin.

    Args:
        name: File name or stem, in the dashed or the spaced TCIA spelling.

    Returns:
        The parsed parts.

    Raises:
        TileNameError: The name does not follow the TCIA scheme.
    """
    stem = normalise_tile_name(Path(name).stem)
    match = _TILE_NAME.match(stem)
    if not match:
        raise TileNameError(f"{name!r}: not a TCIA tile name; expected {TILE_NAME_PATTERN}")
    case = match["case"]
    return TileName(case=case, slide=f"{case}-{match['block']}", x=int(match["x"]), y=int(match["y"]))


def _image_size(path: Path) -> tuple[int | None, int | None]:
    # Header read only: whether the pixels decode is the validation suite's job, which reports every bad file.
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None, None


def list_class_folders(source: Path, classes: Sequence[str]) -> dict[str, list[Path]]:
    """Return the tile files of each class folder under ``source``.

    Hidden files (``.DS_Store`` and the like) are skipped.

    Raises:
        DatasetError: ``source`` is not a folder, a class folder is missing, or an unexpected folder exists.
    """
    if not source.is_dir():
        raise DatasetError(
            f"data source {source} is not a folder; expected a folder with one sub-folder per class {list(classes)}"
        )
    found = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    missing = [c for c in classes if c not in found]
    unknown = [f for f in found if f not in classes]
    if missing or unknown:
        raise DatasetError(
            f"{source}: class folders do not match the class set; expected exactly {list(classes)}, "
            f"found {found} (missing: {missing}, unknown: {unknown})"
        )
    return {
        label: sorted(p for p in (source / label).iterdir() if p.is_file() and not p.name.startswith("."))
        for label in classes
    }


def ingest(
    source: str | Path,
    classes: Sequence[str],
    manifest_path: str | Path,
    copy_images_to: str | Path | None = None,
) -> pd.DataFrame:
    """Scan a class-folder data set and write its manifest.

    Args:
        source: Folder with one sub-folder per class.
        classes: The expected class names (the folder names).
        manifest_path: Where to write the manifest CSV; its ``path`` column is relative to this file's folder.
        copy_images_to: When given, tiles are copied there (``<class>/<file>``) and the manifest points at the
            copies; used where the data must travel as one artifact (Kubeflow). The source is never modified.

    Returns:
        The manifest.

    Raises:
        DatasetError: The folder layout is wrong or it holds no tiles.
        TileNameError: File names do not follow the TCIA scheme (all offenders are listed).
    """
    source = Path(source)
    manifest_path = Path(manifest_path)
    files = list_class_folders(source, classes)
    if not any(files.values()):
        raise DatasetError(f"{source}: no tiles found in the class folders {list(classes)}")

    bad_names: list[str] = []
    rows = []
    for label, paths in files.items():
        for path in paths:
            try:
                parsed = parse_tile_name(path.name)
            except TileNameError:
                bad_names.append(f"{label}/{path.name}")
                continue
            stored = path
            if copy_images_to is not None:
                stored = Path(copy_images_to) / label / path.name
                stored.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, stored)
            width, height = _image_size(path)
            rows.append(
                {
                    "path": relative_posix(stored, manifest_path.parent),
                    "label": label,
                    "case": parsed.case,
                    "slide": parsed.slide,
                    "sha256": sha256_file(path),
                    "width": width,
                    "height": height,
                }
            )
    if bad_names:
        shown = ", ".join(bad_names[:20]) + (f" and {len(bad_names) - 20} more" if len(bad_names) > 20 else "")
        raise TileNameError(
            f"{source}: {len(bad_names)} file(s) whose names do not give case and slide: {shown}; "
            f"expected {TILE_NAME_PATTERN}"
        )
    frame = pd.DataFrame(rows)
    frame["width"] = frame["width"].astype("Int64")
    frame["height"] = frame["height"].astype("Int64")
    write_manifest(frame, manifest_path)
    counts = frame["label"].value_counts().reindex(list(classes), fill_value=0)
    log.info(
        "ingested %d tiles from %s (%s) across %d slides of %d cases",
        len(frame),
        source,
        ", ".join(f"{k}: {v}" for k, v in counts.items()),
        frame["slide"].nunique(),
        frame["case"].nunique(),
    )
    return frame


def run_ingest(config: Config, project_dir: str | Path, out_dir: str | Path, copy_images: bool = False) -> pd.DataFrame:
    """The ingest stage: scan ``data.source`` and write ``<out_dir>/manifest.csv``.

    Args:
        config: Uses ``data.source`` (relative to ``project_dir`` unless absolute) and ``data.classes``.
        project_dir: The project folder.
        out_dir: Output folder.
        copy_images: Copy the tiles into ``<out_dir>/images`` so the output is self-contained (Kubeflow).
    """
    source = Path(config.data.source)
    if not source.is_absolute():
        source = Path(project_dir) / source
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data",))
        frame = ingest(source, config.data.classes, tmp / MANIFEST_FILE, tmp / "images" if copy_images else None)
    return frame
