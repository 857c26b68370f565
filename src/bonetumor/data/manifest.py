"""The tile manifest: one row per tile, the contract between ingest and every later stage.

Columns: ``path`` (POSIX, relative to the manifest file's folder, so a manifest and its tiles can move together),
``label``, ``case`` (patient), ``slide``, ``sha256``, ``width``, ``height`` (empty when the file does not decode;
validation reports those).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from bonetumor.errors import DatasetError

MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "case", "slide", "sha256", "width", "height")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV and check its columns.

    Args:
        path: The manifest file.

    Returns:
        The manifest, with string columns as ``str`` and width/height as nullable integers.

    Raises:
        DatasetError: The file is missing, empty, or lacks expected columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found at {path}; run `bonetumor ingest` first")
    try:
        frame = pd.read_csv(path, dtype={c: "string" for c in ("path", "label", "case", "slide", "sha256")})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{path}: not a readable CSV manifest ({exc}); expected columns {list(MANIFEST_COLUMNS)}"
        ) from exc
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; expected columns {list(MANIFEST_COLUMNS)}")
    for column in ("width", "height"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame


def write_manifest(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest atomically with its columns in the canonical order (extra columns kept after them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = list(MANIFEST_COLUMNS) + [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    tmp = path.with_name(f".{path.name}.tmp")
    frame[ordered].to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def resolve_paths(frame: pd.DataFrame, root: str | Path) -> list[Path]:
    """Return the absolute file path of every row, resolving ``path`` against ``root`` (the manifest's folder)."""
    root = Path(root)
    return [(root / p).resolve() for p in frame["path"]]


def relative_posix(path: str | Path, start: str | Path) -> str:
    """Return ``path`` relative to ``start`` in POSIX form, as manifests store it."""
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
