"""Import a downloaded data set (Kaggle/TCIA osteosarcoma tiles) as class folders under ``data/raw/<name>``.

The pipeline's ``data.source`` expects one folder per class holding tiles named by the TCIA scheme. The public
downloads do not look like that: TCIA ships ``Training-Set-*`` folders of tiles plus a label file
(``ML_Features_1144.csv``) that spells names with spaces and has its own labels (``Viable``, and a mixed
``viable: non-viable`` class); Kaggle copies use class folders; users may have a ``path,label`` CSV. This module
turns any of those (a folder, a ``.zip`` of one, or the CSV) into ``<target>/<name>/<class>/<tile>.<ext>`` plus an
``import_report.json``, checking everything first and writing nothing unless the whole data set is sound:

* labels go through ``data_import.label_map`` (``null`` leaves tiles out, and the report counts them);
* every tile is fully decoded; files that do not decode are listed together in one error;
* tiles that are not 8-bit RGB are converted (16-bit scaled, alpha composited on white) or rejected;
* byte-identical tiles under two classes are a label conflict; under one class the copy is dropped and reported;
* zip members that would land outside the extraction folder are refused before anything is extracted;
* the output is built beside the destination and renamed into place, so a failed import leaves the previous one;
* re-importing the same content changes nothing on disk (same digest of class, name and SHA-256 of every file).

The user's source is only ever read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from bonetumor.config import Config, DataImportConfig
from bonetumor.data.ingest import TILE_NAME_PATTERN, normalise_tile_name, parse_tile_name
from bonetumor.errors import ConfigError, DatasetError, InvalidImageError, TileNameError
from bonetumor.transforms.decode import inspect_image
from bonetumor.utils import atomic_dir, sha256_file, write_json

log = logging.getLogger(__name__)

REPORT_FILE = "import_report.json"
#: File extensions taken as tiles where a tree mixes tiles with other files (the TCIA download).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})
#: Operating-system clutter that is never a tile (compared case-insensitively; dot-files are skipped too).
HIDDEN_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini", "__macosx"})
#: Progress is logged every this many files while checking and while writing.
PROGRESS_EVERY = 250
#: Name of the official TCIA label file; any ``ML_Features*.csv`` in the tree is taken as the label file.
TCIA_LABEL_FILE = "ML_Features_1144.csv"
#: Accepted spellings of the label file's columns, compared without case and punctuation, most likely first.
IMAGE_NAME_COLUMNS: tuple[str, ...] = ("imagename", "image", "imageid", "tilename", "tile", "filename", "file", "name")
LABEL_COLUMNS: tuple[str, ...] = ("classification", "class", "classname", "label", "labels", "target", "category")
#: File extension written for each accepted source format (8-bit RGB tiles are copied byte for byte).
FORMAT_SUFFIX: dict[str, str] = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif"}

_TRAINING_SET = re.compile(r"^training[-_ ]?set", re.IGNORECASE)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
#: Source pixel modes that ``image_modes: convert`` writes as 8-bit RGB (``RGB;16``: 16 bits per channel).
CONVERTIBLE_MODES: frozenset[str] = frozenset(
    {"RGB;16", "RGBA", "RGBa", "RGBX", "LA", "La", "PA", "P", "L", "1", "CMYK", "YCbCr"} | _SIXTEEN_BIT_MODES
)

SourceKind = Literal["class-folders", "tcia", "manifest-csv"]


@dataclass(frozen=True)
class Conversion:
    """A tile written as 8-bit RGB PNG because its source was not 8-bit RGB.

    Attributes:
        source: The source file (relative to the source folder; ``archive.zip:member`` for a zip).
        file: The written file, ``<class>/<name>.png``.
        from_format: Pillow format of the source (``JPEG``, ``PNG``, ``TIFF``).
        from_mode: Pillow pixel mode of the source (``CMYK``, ``I;16``, ``RGBA``...; ``RGB;16`` for 16-bit RGB).
    """

    source: str
    file: str
    from_format: str
    from_mode: str


@dataclass(frozen=True)
class Duplicate:
    """A byte-identical copy of a tile under the same class, left out of the import.

    Attributes:
        label: The class.
        kept: The source file imported.
        dropped: The identical source file left out.
    """

    label: str
    kept: str
    dropped: str


@dataclass(frozen=True)
class ImportResult:
    """What :func:`import_dataset` did.

    Attributes:
        dest: The data set folder (``<project>/<data_import.target>/<name>``), one sub-folder per class.
        name: The data set name.
        counts: Tiles imported per class (every class of ``data.classes``, zeros included).
        excluded: Tiles left out per source label (labels that ``data_import.label_map`` maps to null).
        conversions: Tiles converted to 8-bit RGB.
        duplicates: Identical copies left out.
        unchanged: True when ``dest`` already held exactly this content, so nothing was written.
        digest: SHA-256 over the sorted (class, file name, file SHA-256) of every imported tile.
        report: The ``import_report.json`` inside ``dest``.
    """

    dest: Path
    name: str
    counts: dict[str, int]
    excluded: dict[str, int]
    conversions: list[Conversion]
    duplicates: list[Duplicate]
    unchanged: bool
    digest: str
    report: Path

    @property
    def total(self) -> int:
        """Number of tiles imported."""
        return sum(self.counts.values())


@dataclass
class _Entry:
    """One source file with its source label."""

    path: Path
    shown: str
    label: str


@dataclass
class _Tile:
    """A tile to import: its mapped class, normalised name, and what checking its bytes found."""

    entry: _Entry
    label: str
    stem: str
    sha256: str = ""
    format: str = ""
    mode: str = ""
    error: str | None = None
    out_sha256: str = ""

    @property
    def converted(self) -> bool:
        return self.mode != "RGB"

    @property
    def out_name(self) -> str:
        return f"{self.stem}{'.png' if self.converted else FORMAT_SUFFIX.get(self.format, '.png')}"


@dataclass
class _Source:
    """A source resolved to labelled files."""

    kind: SourceKind
    entries: list[_Entry]
    details: dict[str, Any] = field(default_factory=dict)


def import_dataset(
    source: str | Path, config: Config, project_dir: str | Path, name: str | None = None
) -> ImportResult:
    """Import a data set into ``<project_dir>/<data_import.target>/<name>/`` as class folders.

    ``source`` may be a folder (or a ``.zip`` of one) in the TCIA layout (``Training-Set-*`` folders of tiles
    plus a label CSV such as ``ML_Features_1144.csv`` anywhere in the tree), a folder with one sub-folder per
    source label, or a CSV with columns ``path,label`` (paths relative to the CSV). Source labels become classes
    through ``data_import.label_map``. The whole data set is checked before anything is written; the destination
    is then replaced in one rename, and left untouched when it already holds the same content.

    Args:
        source: The folder, zip or CSV.
        config: Uses ``data.classes`` and ``data_import`` (target, label_map, image_modes).
        project_dir: The project folder; a relative ``data_import.target`` is resolved against it.
        name: Data set name; defaults to the source's folder name or file stem. Characters other than letters,
            digits, ``.``, ``_`` and ``-`` become ``-``.

    Returns:
        What was imported, and whether the destination was already up to date.

    Raises:
        ConfigError: ``data_import.label_map`` maps a label to a class that is not in ``data.classes``.
        DatasetError: The source is missing or has an unexpected layout, labels are unknown or conflict, the zip
            is unsafe, the destination overlaps the source, or writing failed.
        TileNameError: Tile names do not follow the TCIA scheme (all are listed).
        InvalidImageError: Tiles do not decode, or are not 8-bit RGB with ``image_modes: reject`` (all are listed).
    """
    source = Path(source).expanduser().resolve()
    if not source.exists():
        raise DatasetError(f"import source {source} does not exist; expected a folder, a .zip or a path,label CSV")
    settings = config.data_import
    classes = tuple(config.data.classes)
    _check_label_map(settings.label_map, classes)
    dataset_name = sanitise_name(name if name is not None else (source.stem if source.is_file() else source.name))
    target = Path(settings.target)
    if not target.is_absolute():
        target = Path(project_dir).resolve() / target
    dest = target / dataset_name
    _check_dest(source, dest)

    with _opened(source, target, dataset_name) as (root, prefix):
        resolved = _resolve_source(root, prefix, settings.label_map)
        tiles, excluded = _checked_tiles(source, resolved, dest, settings)
        tiles, duplicates = _deduplicate(source, tiles)
        counts = dict.fromkeys(classes, 0)
        counts.update(Counter(t.label for t in tiles))
        conversions = [
            Conversion(t.entry.shown, f"{t.label}/{t.out_name}", t.format, t.mode) for t in tiles if t.converted
        ]
        digest = content_digest((t.label, t.out_name, t.out_sha256) for t in tiles)
        result = ImportResult(
            dest, dataset_name, counts, excluded, conversions, duplicates, False, digest, dest / REPORT_FILE
        )
        if dest.is_dir() and directory_digest(dest) == digest:
            log.info("%s already holds this data set (digest %s); nothing written", dest, digest[:12])
            return dataclasses.replace(result, unchanged=True)
        _write_dataset(result, tiles, resolved, source, config)
    log.info(
        "imported %d tiles into %s (%s), digest %s",
        result.total,
        dest,
        ", ".join(f"{k}: {v}" for k, v in counts.items()),
        digest[:12],
    )
    return result


def _checked_tiles(
    source: Path, resolved: _Source, dest: Path, settings: DataImportConfig
) -> tuple[list[_Tile], dict[str, int]]:
    """Map the source's labels to classes and check every tile's name and image; return the tiles and exclusions."""
    inside = [e.shown for e in resolved.entries if dest in e.path.resolve().parents]
    if inside:
        raise DatasetError(f"{source}: lists files inside the destination {dest}: {_listing(inside)}")
    tiles, excluded = _map_labels(source, resolved, settings.label_map)
    if excluded:
        log.info("excluded by data_import.label_map: %s", ", ".join(f"{k}: {v}" for k, v in excluded.items()))
    if not tiles:
        raise DatasetError(
            f"{source}: no tiles to import ({sum(excluded.values())} excluded by data_import.label_map: "
            f"{dict(excluded)}); expected tiles labelled with one of {list(settings.label_map)}"
        )
    _check_names(source, tiles)
    _check_images(source, tiles, settings.image_modes)
    return tiles, excluded


def _write_dataset(result: ImportResult, tiles: list[_Tile], resolved: _Source, source: Path, config: Config) -> None:
    """Replace ``result.dest`` with the tiles and the import report in one rename (untouched if anything fails)."""
    dest, digest = result.dest, result.digest
    if dest.is_dir():
        log.info("%s holds an earlier import with other content; replacing it", dest)
    try:
        with atomic_dir(dest) as tmp:
            written = _write_tiles(tiles, tuple(config.data.classes), tmp)
            if written != digest:
                raise DatasetError(
                    f"{source}: files changed while being imported (digest {digest[:12]} when checked, "
                    f"{written[:12]} when written); rerun the import once the source is complete"
                )
            write_json(tmp / REPORT_FILE, _report(result, resolved, source, config))
    except OSError as exc:
        raise DatasetError(
            f"{dest}: writing the imported data set failed ({exc}); any previous import there is unchanged"
        ) from exc


def sanitise_name(name: str) -> str:
    """Turn a file or folder name into a safe data set folder name.

    Args:
        name: The proposed name.

    Returns:
        The name with runs of characters other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``-``,
        and leading/trailing ``.``, ``_``, ``-`` removed.

    Raises:
        DatasetError: Nothing usable is left.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("._-")
    if not cleaned:
        raise DatasetError(f"data set name {name!r} has no usable characters; expected letters, digits, '.', '_', '-'")
    return cleaned


def content_digest(items: Iterable[tuple[str, str, str]]) -> str:
    """Return the SHA-256 of the sorted (class, file name, file SHA-256) triples of a data set."""
    digest = hashlib.sha256()
    for label, name, sha in sorted(items):
        digest.update(f"{label}\t{name}\t{sha}\n".encode())
    return digest.hexdigest()


def directory_digest(folder: str | Path) -> str:
    """Return :func:`content_digest` of an imported data set folder as it is on disk.

    Every file counts (so a stray file makes the digest differ and a re-import replaces the folder), except the
    top-level ``import_report.json``.
    """
    folder = Path(folder)
    items = []
    for path in folder.rglob("*"):
        if path.is_file() and path != folder / REPORT_FILE:
            items.append((path.parent.relative_to(folder).as_posix(), path.name, sha256_file(path)))
    return content_digest(items)


def is_hidden(name: str) -> bool:
    """Return whether a file or folder name is operating-system clutter (dot-files, Thumbs.db, __MACOSX...)."""
    return name.startswith(".") or name.lower() in HIDDEN_NAMES


def _listing(items: Iterable[str]) -> str:
    return "".join(f"\n  {item}" for item in items)


def _check_label_map(label_map: Mapping[str, str | None], classes: tuple[str, ...]) -> None:
    wrong = {label: cls for label, cls in label_map.items() if cls is not None and cls not in classes}
    if wrong:
        raise ConfigError(
            f"data_import.label_map maps to classes that are not in data.classes: {wrong}; "
            f"expected each value to be one of {list(classes)} or null"
        )


def _check_dest(source: Path, dest: Path) -> None:
    # Replacing the destination must never delete or change the source.
    if source == dest or dest in source.parents or source in dest.parents:
        raise DatasetError(
            f"import destination {dest} overlaps the source {source}; expected the source outside "
            "data_import.target (import from the download folder, or pass another --name)"
        )
    if dest.exists() and not dest.is_dir():
        raise DatasetError(f"import destination {dest} exists and is not a folder; remove it or pass another --name")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / REPORT_FILE).is_file():
        raise DatasetError(
            f"import destination {dest} exists and was not made by `bonetumor data import` (no {REPORT_FILE}); "
            "it is left alone: pass another --name or move it away"
        )


@contextmanager
def _opened(source: Path, target: Path, name: str) -> Iterator[tuple[Path, str]]:
    """Yield the folder (or CSV) to read and the prefix shown before its relative paths.

    A zip is checked member by member and extracted into a temporary folder beside the destination (the same
    disk, which has room for the result anyway), removed afterwards.
    """
    if source.is_dir():
        yield source, ""
        return
    if source.suffix.lower() == ".csv":
        yield source, ""
        return
    if source.suffix.lower() != ".zip":
        raise DatasetError(
            f"import source {source} is a {source.suffix or 'suffix-less'} file; expected a folder, a .zip of one, "
            "or a CSV with columns path,label"
        )
    try:
        archive = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{source}: not a readable zip archive ({exc})") from exc
    with archive:
        members = _safe_members(source, archive)
        target.mkdir(parents=True, exist_ok=True)
        needed = sum(m.file_size for m in members)
        free = shutil.disk_usage(target).free
        if needed > free:
            raise DatasetError(
                f"{source}: extracting needs {needed / 1e9:.2f} GB but {target} has {free / 1e9:.2f} GB free"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.unzip-", dir=target))
        try:
            _extract(source, archive, members, tmp)
            yield tmp, f"{source.name}:"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _safe_members(source: Path, archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Return the file members to extract, or refuse the whole archive if any member is unsafe."""
    unsafe: list[str] = []
    members: list[zipfile.ZipInfo] = []
    for info in archive.infolist():
        name = info.filename.replace("\\", "/")
        mode = info.external_attr >> 16
        parts = PurePosixPath(name).parts
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            unsafe.append(f"{info.filename}: absolute path")
        elif ".." in parts:
            unsafe.append(f"{info.filename}: '..' escapes the extraction folder")
        elif stat.S_ISLNK(mode):
            unsafe.append(f"{info.filename}: symbolic link")
        elif stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            unsafe.append(f"{info.filename}: not a regular file or folder")
        elif info.flag_bits & 0x1:
            unsafe.append(f"{info.filename}: encrypted")
        elif not info.is_dir() and not any(is_hidden(p) for p in parts):
            members.append(info)
    if unsafe:
        raise DatasetError(
            f"{source}: refused, nothing extracted; {len(unsafe)} member(s) are unsafe to extract "
            f"(expected plain files with relative paths inside the archive):{_listing(unsafe)}"
        )
    return members


def _extract(source: Path, archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], into: Path) -> None:
    for info in members:
        out = into.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
        if into not in out.resolve().parents:  # checked in _safe_members already; never write outside `into`
            raise DatasetError(f"{source}: member {info.filename} resolves outside the extraction folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as reader, open(out, "wb") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError) as exc:
            raise DatasetError(f"{source}: member {info.filename} cannot be extracted ({exc})") from exc


def _walk_files(folder: Path) -> Iterator[Path]:
    """Yield the non-hidden files under ``folder`` in a stable order, skipping hidden folders."""
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            if not is_hidden(name):
                yield Path(current) / name


def _resolve_source(root: Path, prefix: str, label_map: Mapping[str, str | None]) -> _Source:
    if root.is_file():
        return _manifest_source(root)
    training = [p for p in _walk_dirs(root) if _TRAINING_SET.match(p.name)]
    label_files = [p for p in _walk_files(root) if _is_label_file(p)]
    if training or label_files:
        return _tcia_source(root, prefix, training, label_files)
    return _class_folder_source(root, prefix, label_map)


def _walk_dirs(folder: Path) -> Iterator[Path]:
    for current, dirs, _ in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in dirs:
            yield Path(current) / name


def _is_label_file(path: Path) -> bool:
    return path.suffix.lower() == ".csv" and path.name.lower().startswith("ml_features")


def _shown(path: Path, root: Path, prefix: str) -> str:
    return prefix + path.relative_to(root).as_posix()


def _class_folder_source(root: Path, prefix: str, label_map: Mapping[str, str | None]) -> _Source:
    top = root
    while True:
        children = [p for p in sorted(top.iterdir()) if not is_hidden(p.name)]
        folders = [p for p in children if p.is_dir()]
        # A download usually wraps the class folders in one folder named after the data set: look inside it.
        if len(children) == 1 and folders and _match_label(folders[0].name, label_map) is None:
            top = folders[0]
            continue
        break
    if not folders:
        raise DatasetError(
            f"{root}: no class folders found; expected one sub-folder per label {list(label_map)}, "
            f"Training-Set-* folders with a label CSV ({TCIA_LABEL_FILE}), or a path,label CSV"
        )
    ignored = [_shown(p, root, prefix) for p in children if p.is_file()]
    if ignored:
        log.info("ignored %d file(s) beside the class folders: %s", len(ignored), ", ".join(ignored))
    entries = [
        _Entry(path, _shown(path, root, prefix), folder.name) for folder in folders for path in _walk_files(folder)
    ]
    return _Source("class-folders", entries, {"class_root": _shown(top, root, prefix) or ".", "ignored": ignored})


def _tcia_source(root: Path, prefix: str, training: list[Path], label_files: list[Path]) -> _Source:
    """Resolve a TCIA layout: the tiles of the ``Training-Set-*`` folders, labelled by the label CSV."""
    csv_path = _pick_label_file(root, label_files)
    name_col, label_col, labels, spelled = _tcia_labels(csv_path)
    # Tiles sit in the Training-Set-* folders; without them, every image in the tree is a tile.
    tile_roots = [t for t in training if not any(p in training for p in t.parents)] or [root]
    files = [f for folder in tile_roots for f in _walk_files(folder) if f.suffix.lower() in IMAGE_SUFFIXES]
    entries: list[_Entry] = []
    unlabelled: list[str] = []
    seen: set[str] = set()
    for path in files:
        key = _tile_key(path.name)
        if key in labels:
            entries.append(_Entry(path, _shown(path, root, prefix), labels[key]))
            seen.add(key)
        else:
            unlabelled.append(_shown(path, root, prefix))
    if unlabelled:
        raise DatasetError(
            f"{root}: {len(unlabelled)} tile(s) have no row in the label file {csv_path.name} (column {name_col!r}); "
            f"expected every tile's name there (spaces and ' - ' count as '-'):{_listing(unlabelled)}"
        )
    missing = sorted(spelled[k] for k in labels if k not in seen)
    if missing:
        log.warning(
            "%d image(s) of %s have no tile file in %s (a partial download?): %s",
            len(missing),
            csv_path.name,
            root,
            ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
        )
    details = {
        "label_file": _shown(csv_path, root, prefix),
        "image_name_column": name_col,
        "label_column": label_col,
        "tile_folders": [_shown(t, root, prefix) or "." for t in tile_roots],
        "labels_without_tile": missing,
    }
    return _Source("tcia", entries, details)


def _tcia_labels(csv_path: Path) -> tuple[str, str, dict[str, str], dict[str, str]]:
    """Read a TCIA label file: its image-name and label columns, each tile key's label and its first spelling.

    Raises:
        DatasetError: A column cannot be told, a row lacks a name or label, or an image has two labels.
    """
    frame = _read_csv(csv_path)
    name_col = _find_column(frame, IMAGE_NAME_COLUMNS)
    label_col = _find_column(frame, LABEL_COLUMNS)
    if name_col is None or label_col is None:
        raise DatasetError(
            f"{csv_path}: cannot tell which column holds the {'image name' if name_col is None else 'label'}; "
            f"found columns {list(frame.columns)}; expected an image-name column (e.g. image.name, one of "
            f"{list(IMAGE_NAME_COLUMNS)}) and a label column (e.g. classification, one of {list(LABEL_COLUMNS)}), "
            "case-insensitive"
        )
    labels: dict[str, str] = {}
    spelled: dict[str, str] = {}
    empty: list[str] = []
    clashes: list[str] = []
    for number, (raw_name, raw_label) in enumerate(zip(frame[name_col], frame[label_col], strict=True), start=2):
        tile, label = str(raw_name).strip(), str(raw_label).strip()
        if not tile or not label:
            empty.append(f"line {number}: {name_col}={tile!r}, {label_col}={label!r}")
            continue
        key = _tile_key(tile)
        if key in labels and labels[key] != label:
            clashes.append(f"{tile}: {labels[key]!r} and {label!r}")
        labels.setdefault(key, label)
        spelled.setdefault(key, tile)
    if empty or clashes:
        raise DatasetError(
            f"{csv_path}: {len(empty)} row(s) without image name or label, {len(clashes)} image(s) with two labels "
            f"(columns {name_col!r}, {label_col!r}); expected one label per image:{_listing(empty + clashes)}"
        )
    return name_col, label_col, labels, spelled


def _pick_label_file(root: Path, label_files: list[Path]) -> Path:
    if not label_files:
        others = [p for p in _walk_files(root) if p.suffix.lower() == ".csv"]
        if len(others) == 1:
            return others[0]
        raise DatasetError(
            f"{root}: Training-Set-* folders but no label file; expected {TCIA_LABEL_FILE} (or one CSV with an "
            f"image-name and a label column) somewhere in the tree, found CSVs {[str(p) for p in others]}"
        )
    if len({sha256_file(p) for p in label_files}) > 1:
        raise DatasetError(
            f"{root}: {len(label_files)} different label files {[str(p) for p in label_files]}; expected one"
        )
    return label_files[0]


def _read_csv(path: Path) -> pd.DataFrame:
    last: Exception | None = None
    # Label files exported from spreadsheets are often Latin-1 or carry a byte-order mark.
    for encoding in ("utf-8-sig", "latin-1"):
        try:
            return pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
        except UnicodeDecodeError as exc:
            last = exc
        except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
            raise DatasetError(f"{path}: not a readable CSV ({exc})") from exc
    raise DatasetError(f"{path}: not a readable CSV ({last})")


def _column_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _find_column(frame: pd.DataFrame, candidates: tuple[str, ...]) -> str | None:
    keys = {_column_key(c): str(c) for c in reversed(list(frame.columns))}
    return next((keys[c] for c in candidates if c in keys), None)


def _tile_key(name: str) -> str:
    """The normalised tile stem of a file name or label-file entry (with or without extension or folders)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    if Path(base).suffix.lower() in IMAGE_SUFFIXES:
        base = base[: -len(Path(base).suffix)]
    return normalise_tile_name(base)


def _manifest_source(csv_path: Path) -> _Source:
    frame = _read_csv(csv_path)
    columns = {str(c).strip().lower(): str(c) for c in frame.columns}
    if "path" not in columns or "label" not in columns:
        hint = ""
        if _find_column(frame, IMAGE_NAME_COLUMNS) and _find_column(frame, LABEL_COLUMNS):
            hint = "; this looks like a label file: import the folder (or zip) that holds it and the tiles"
        raise DatasetError(
            f"{csv_path}: found columns {list(frame.columns)}; expected columns path,label "
            f"(paths relative to the CSV){hint}"
        )
    entries: list[_Entry] = []
    problems: list[str] = []
    for number, (raw_path, raw_label) in enumerate(
        zip(frame[columns["path"]], frame[columns["label"]], strict=True), start=2
    ):
        shown, label = str(raw_path).strip(), str(raw_label).strip()
        path = Path(shown).expanduser()
        path = path if path.is_absolute() else csv_path.parent / path
        if not shown or not label:
            problems.append(f"line {number}: empty path or label")
        elif not path.is_file():
            problems.append(f"line {number}: {shown}: file not found (looked at {path})")
        else:
            entries.append(_Entry(path, shown, label))
    if problems:
        raise DatasetError(f"{csv_path}: {len(problems)} row(s) do not point at a labelled file:{_listing(problems)}")
    return _Source("manifest-csv", entries)


def _label_key(label: str) -> str:
    return re.sub(r"\s+", " ", label.strip().casefold())


def _match_label(label: str, label_map: Mapping[str, str | None]) -> str | None:
    """Return the label_map key for a source label: exact, else the one key equal up to case and spacing."""
    if label in label_map:
        return label
    loose = [key for key in label_map if _label_key(key) == _label_key(label)]
    return loose[0] if len(loose) == 1 else None


def _map_labels(
    source: Path, resolved: _Source, label_map: Mapping[str, str | None]
) -> tuple[list[_Tile], dict[str, int]]:
    unknown = sorted({e.label for e in resolved.entries if _match_label(e.label, label_map) is None})
    if unknown:
        where = "class folder(s)" if resolved.kind == "class-folders" else "label(s)"
        raise DatasetError(
            f"{source}: unknown {where} {unknown}; expected the labels of data_import.label_map "
            f"{list(label_map)} (add a label there to import it, or map it to null to leave it out)"
        )
    tiles: list[_Tile] = []
    excluded: Counter[str] = Counter()
    for entry in resolved.entries:
        key = _match_label(entry.label, label_map)
        target = label_map[key] if key is not None else None
        if target is None:
            excluded[entry.label] += 1
        else:
            tiles.append(_Tile(entry, target, _tile_key(entry.path.name)))
    return tiles, dict(sorted(excluded.items()))


def _check_names(source: Path, tiles: list[_Tile]) -> None:
    bad: list[str] = []
    for tile in tiles:
        try:
            parse_tile_name(tile.stem)
        except TileNameError:
            bad.append(tile.entry.shown)
    if bad:
        raise TileNameError(
            f"{source}: {len(bad)} file(s) whose names do not give case and slide "
            f"(expected {TILE_NAME_PATTERN}):{_listing(bad)}"
        )


def _check_images(source: Path, tiles: list[_Tile], image_modes: str) -> None:
    """Hash and fully decode every tile (in threads: Pillow and hashlib release the GIL), then list every failure."""
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, _ in enumerate(pool.map(lambda t: _examine(t, image_modes), tiles), start=1):
            if done % PROGRESS_EVERY == 0:
                log.info("checked %d/%d tiles", done, len(tiles))
    bad = [f"{t.entry.shown}: {t.error}" for t in tiles if t.error]
    if bad:
        raise InvalidImageError(
            f"{source}: {len(bad)} tile(s) cannot be imported, nothing was written; expected complete JPEG, PNG or "
            f"TIFF images (8-bit RGB, or convertible with data_import.image_modes: convert):{_listing(bad)}"
        )


def _examine(tile: _Tile, image_modes: str) -> None:
    path = tile.entry.path
    try:
        if path.stat().st_size == 0:
            tile.error = "empty file (0 bytes)"
            return
        tile.sha256 = sha256_file(path)
    except OSError as exc:
        tile.error = f"cannot read ({exc.strerror or exc})"
        return
    info = inspect_image(path)
    if not info.decodes or info.format is None or info.mode is None:
        tile.error = info.error or "not a recognised image file"
        return
    tile.format, tile.mode = info.format, info.mode
    try:
        if tile.mode == "RGB" and info.format != "JPEG" and _sixteen_bit(path):
            tile.mode = "RGB;16"
        if tile.mode == "RGB":
            tile.out_sha256 = tile.sha256
        elif tile.mode not in CONVERTIBLE_MODES:
            tile.error = (
                f"pixel mode {tile.mode} is not supported; expected 8-bit RGB or one of {sorted(CONVERTIBLE_MODES)}"
            )
        elif image_modes == "reject":
            tile.error = (
                f"pixel mode {tile.mode} is not 8-bit RGB and data_import.image_modes is reject "
                "(set it to convert to import it as 8-bit RGB)"
            )
        else:
            tile.out_sha256 = hashlib.sha256(_converted_png(path)).hexdigest()
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as exc:
        tile.error = f"cannot convert {tile.format} {tile.mode} to RGB ({exc})"


def _sixteen_bit(path: Path) -> bool:
    # Pillow reads 16-bit-per-channel RGB as mode RGB, keeping the high byte; the raw mode tells it apart.
    with Image.open(path) as image:
        args = image.tile[0].args if image.tile else None
    raw = args[0] if isinstance(args, tuple) and args else args
    return isinstance(raw, str) and ";16" in raw


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image to 8-bit RGB.

    16-bit grey (``I;16``, and ``I`` as Pillow reads 16-bit PNGs) is scaled from 0-65535 to 0-255 (rounded);
    transparency (``RGBA``, ``LA``, ``PA``, ``P`` or grey with a transparent colour) is composited on white, the
    colour of bare glass on a slide; CMYK, palette and grey images use Pillow's conversion.

    Args:
        image: A loaded image.

    Returns:
        An RGB image of the same size.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64)
        scaled = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _converted_png(path: Path) -> bytes:
    with Image.open(path) as image:
        image.load()
        rgb = to_rgb(image)
    buffer = io.BytesIO()
    # Lossless, and deterministic for a given Pillow: the no-op check hashes this encoding before writing.
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def _deduplicate(source: Path, tiles: list[_Tile]) -> tuple[list[_Tile], list[Duplicate]]:
    by_content: dict[str, list[_Tile]] = defaultdict(list)
    for tile in sorted(tiles, key=lambda t: t.entry.shown):
        by_content[tile.sha256].append(tile)
    conflicts: list[str] = []
    kept: list[_Tile] = []
    duplicates: list[Duplicate] = []
    for group in by_content.values():
        if len({t.label for t in group}) > 1:
            conflicts.append(" and ".join(f"{t.entry.shown} ({t.label})" for t in group))
            continue
        kept.append(group[0])
        duplicates.extend(Duplicate(group[0].label, group[0].entry.shown, t.entry.shown) for t in group[1:])
    if conflicts:
        raise DatasetError(
            f"{source}: {len(conflicts)} image(s) appear under two classes (identical SHA-256), a label conflict; "
            f"expected each image under one class:{_listing(conflicts)}"
        )
    by_name: dict[tuple[str, str], list[_Tile]] = defaultdict(list)
    for tile in kept:
        by_name[(tile.label, tile.out_name)].append(tile)
    clashes = [
        f"{label}/{name}: " + ", ".join(t.entry.shown for t in group)
        for (label, name), group in by_name.items()
        if len(group) > 1
    ]
    if clashes:
        raise DatasetError(
            f"{source}: {len(clashes)} different image(s) would get the same name in the same class; "
            f"expected unique tile names:{_listing(clashes)}"
        )
    for duplicate in duplicates:
        log.info("duplicate left out: %s is identical to %s (%s)", duplicate.dropped, duplicate.kept, duplicate.label)
    return sorted(kept, key=lambda t: (t.label, t.out_name)), duplicates


def _write_tiles(tiles: list[_Tile], classes: tuple[str, ...], into: Path) -> str:
    """Write the tiles into ``into/<class>/`` and return the digest of what was written."""
    for label in classes:
        (into / label).mkdir()
    items = []
    for done, tile in enumerate(tiles, start=1):
        out = into / tile.label / tile.out_name
        if tile.converted:
            data = _converted_png(tile.entry.path)
            out.write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            log.info(
                "converted %s (%s %s) to 8-bit RGB: %s/%s",
                tile.entry.shown,
                tile.format,
                tile.mode,
                tile.label,
                out.name,
            )
        else:
            # copyfile, not copy2: the copy gets ordinary permissions even from a read-only download.
            shutil.copyfile(tile.entry.path, out)
            sha = sha256_file(out)
        items.append((tile.label, out.name, sha))
        if done % PROGRESS_EVERY == 0:
            log.info("wrote %d/%d tiles", done, len(tiles))
    return content_digest(items)


def _report(result: ImportResult, resolved: _Source, source: Path, config: Config) -> dict[str, Any]:
    return {
        "name": result.name,
        "source": str(source),
        "source_kind": resolved.kind,
        "source_sha256": sha256_file(source) if source.is_file() else None,
        **resolved.details,
        "classes": list(config.data.classes),
        "counts": result.counts,
        "total": result.total,
        "excluded": result.excluded,
        "conversions": [dataclasses.asdict(c) for c in result.conversions],
        "duplicates": [dataclasses.asdict(d) for d in result.duplicates],
        "digest": result.digest,
        "label_map": dict(config.data_import.label_map),
        "image_modes": config.data_import.image_modes,
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
