"""Where the tiles of one slide come from: an OpenSlide slide, a large plain image, or a folder/zip of TCIA tiles.

Every source answers the same questions in level-0 pixels (the slide's full resolution): its size, its microns
per pixel, a thumbnail, and a square region read at a given output size. The assessment (``slide/assess.py``)
only talks to :class:`SlideSource`, so a new format is one class here.

Memory stays bounded for tiled formats: OpenSlide reads each region from the pyramid level closest to the output
size, and a tile set decodes one tile file at a time. A plain JPEG/PNG/TIFF has no pyramid and is decoded whole,
up to ``assess.max_image_pixels``.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from bonetumor.data.ingest import TILE_NAME_PATTERN, TileName, parse_tile_name
from bonetumor.errors import InvalidImageError, SlideError, TileNameError
from bonetumor.transforms.decode import decode_image
from bonetumor.utils import sha256_file

#: Files a tile set may hold (other files, such as a manifest, are ignored).
TILE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff"})
#: Microns per pixel a plain image's resolution tags may claim and still be believed: outside this, the tags
#: are a screen default (72 or 96 dpi means 353 or 265 um/px), not a scanner's.
PLAUSIBLE_MPP = (0.05, 20.0)
#: Side in pixels of the blocks a thumbnail is read in when the nearest level is much larger than the thumbnail.
THUMBNAIL_BLOCK = 4096
#: What the assessment accepts, for error messages.
EXPECTED_INPUT = (
    "a whole-slide image OpenSlide reads (SVS, NDPI, MRXS, SCN, BIF, generic tiled or pyramidal TIFF, "
    "a DICOM-WSI file or folder), a plain JPEG/PNG/TIFF image, or a folder or .zip of one slide's TCIA tiles "
    "named like Case-48-P5-C20-15162-19423.jpg"
)


@dataclass(frozen=True)
class TileSpec:
    """One square region of the slide, in level-0 pixels.

    Attributes:
        x: Left edge.
        y: Top edge.
        side: Side length.
        key: Where a tile set reads it from (the member or file name); empty for regions of a slide.
    """

    x: int
    y: int
    side: int
    key: str = ""


class SlideSource(Protocol):
    """What the assessment needs of an input (see the module docstring)."""

    name: str
    kind: str
    dimensions: tuple[int, int]
    #: Level-0 corner of the scanned area (OpenSlide's bounds), (0, 0) when the whole image is scanned.
    origin: tuple[int, int]

    def recorded_mpp(self) -> float | None:
        """Microns per level-0 pixel recorded in the input, or None when it records none."""
        ...

    def tiles(self) -> list[TileSpec] | None:
        """The tiles the input itself defines (a tile set), or None for a grid the assessment lays out."""
        ...

    def thumbnail(self, max_side: int) -> Image.Image:
        """An RGB thumbnail of the whole slide, its longest side at most ``max_side`` (glass white)."""
        ...

    def read(self, tile: TileSpec, size: int) -> Image.Image:
        """The tile as an RGB image of ``size`` x ``size`` pixels."""
        ...

    def content_hash(self) -> str:
        """SHA-256 of the input's bytes (of each tile file, in name order, for a tile set)."""
        ...

    def close(self) -> None:
        """Release file handles."""
        ...


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BOX)


class OpenSlideSource:
    """A whole-slide image read through OpenSlide (``openslide-python`` with ``openslide-bin``)."""

    def __init__(self, path: Path) -> None:
        import openslide

        self._openslide = openslide
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise SlideError(f"{path}: OpenSlide cannot read this slide ({exc}); the file may be truncated") from exc
        self.path = path
        self.name = path.name
        vendor = self._slide.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self.kind = f"openslide:{vendor}"
        width, height = self._slide.dimensions
        self.dimensions = (int(width), int(height))
        props = self._slide.properties
        # MRXS and others record the scanned area's corner; QuPath's OpenSlide server crops to it and places
        # imported objects relative to it.
        self.origin = (
            int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0)),
            int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0)),
        )

    def recorded_mpp(self) -> float | None:
        """``openslide.mpp-x`` (and ``-y``, which must agree within 1 %)."""
        props = self._slide.properties
        try:
            mpp_x = float(props[self._openslide.PROPERTY_NAME_MPP_X])
            mpp_y = float(props.get(self._openslide.PROPERTY_NAME_MPP_Y, mpp_x))
        except (KeyError, ValueError):
            return None
        if mpp_x <= 0 or abs(mpp_x - mpp_y) > 0.01 * mpp_x:
            return None
        return mpp_x

    def tiles(self) -> list[TileSpec] | None:
        """None: the assessment lays a grid over the slide."""
        return None

    def _read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        try:
            region = self._slide.read_region(location, level, size)
        except self._openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: OpenSlide failed to read the region at {location} (level {level}): {exc}; "
                "the file may be truncated or corrupt"
            ) from exc
        # Outside the scanned area OpenSlide returns transparent pixels: show them as glass.
        background = Image.new("RGB", region.size, (255, 255, 255))
        background.paste(region, mask=region.getchannel("A"))
        return background

    def thumbnail(self, max_side: int) -> Image.Image:
        """The whole slide from the level nearest ``max_side``, read in blocks when that level is much larger.

        A tiled TIFF without a pyramid has only level 0: reading it whole would hold the full slide in memory.
        """
        width, height = self.dimensions
        downsample = max(width, height) / max_side
        level = self._slide.get_best_level_for_downsample(downsample)
        level_w, level_h = self._slide.level_dimensions[level]
        level_ds = self._slide.level_downsamples[level]
        if level_ds >= downsample / 2:
            return _fit(self._read_region((0, 0), level, (level_w, level_h)), max_side)
        factor = level_ds / downsample  # < 0.5: each block shrinks at least twofold
        canvas = Image.new("RGB", (max(1, round(level_w * factor)), max(1, round(level_h * factor))), (255, 255, 255))
        for y0 in range(0, level_h, THUMBNAIL_BLOCK):
            for x0 in range(0, level_w, THUMBNAIL_BLOCK):
                bw, bh = min(THUMBNAIL_BLOCK, level_w - x0), min(THUMBNAIL_BLOCK, level_h - y0)
                box = (int(x0 * factor), int(y0 * factor), int((x0 + bw) * factor), int((y0 + bh) * factor))
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue
                block = self._read_region((round(x0 * level_ds), round(y0 * level_ds)), level, (bw, bh))
                canvas.paste(block.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BOX), box[:2])
        return canvas

    def read(self, tile: TileSpec, size: int) -> Image.Image:
        """Read from the pyramid level nearest ``tile.side / size`` (never coarser), then resize (Lanczos)."""
        level = self._slide.get_best_level_for_downsample(tile.side / size)
        downsample = self._slide.level_downsamples[level]
        read_side = max(1, round(tile.side / downsample))
        region = self._read_region((tile.x, tile.y), level, (read_side, read_side))
        return region if read_side == size else region.resize((size, size), Image.Resampling.LANCZOS)

    def content_hash(self) -> str:
        """SHA-256 of the slide file (for MRXS and DICOM folders, of the file OpenSlide was given)."""
        return sha256_file(self.path)

    def close(self) -> None:
        """Close the slide."""
        self._slide.close()


class PlainImageSource:
    """A large JPEG, PNG or untiled TIFF, decoded whole (bounded by ``assess.max_image_pixels``)."""

    def __init__(self, path: Path, max_pixels: int) -> None:
        previous = Image.MAX_IMAGE_PIXELS
        try:
            # The probe too: Pillow refuses images above twice its default limit (179 Mpx) before our check.
            Image.MAX_IMAGE_PIXELS = max_pixels
            with Image.open(path) as probe:
                width, height = probe.size
                dpi = probe.info.get("dpi")
        except (OSError, Image.DecompressionBombError) as exc:
            raise SlideError(f"{path}: not a slide or image ({exc}); expected {EXPECTED_INPUT}") from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous
        if width * height > max_pixels:
            raise SlideError(
                f"{path}: a plain {width}x{height} image ({width * height / 1e6:.0f} Mpx) is above "
                f"assess.max_image_pixels ({max_pixels / 1e6:.0f} Mpx); such an image is decoded whole. Convert it "
                "to a pyramidal tiled TIFF (for example `vips tiffsave in.jpg out.tif --tile --pyramid "
                "--compression jpeg`) or raise the limit"
            )
        previous = Image.MAX_IMAGE_PIXELS
        try:
            Image.MAX_IMAGE_PIXELS = max_pixels
            self._image = decode_image(path)
        except InvalidImageError as exc:
            reason = str(exc).removeprefix(f"{path}: ").split("; expected")[0]
            raise SlideError(
                f"{path}: neither a slide OpenSlide recognises nor a readable image ({reason}); expected "
                f"{EXPECTED_INPUT}"
            ) from exc
        finally:
            Image.MAX_IMAGE_PIXELS = previous
        self.path = path
        self.name = path.name
        self.kind = "image"
        self.dimensions = (width, height)
        self.origin = (0, 0)
        self._dpi = dpi

    def recorded_mpp(self) -> float | None:
        """From the dpi tags, only when they are a scanner's (see :data:`PLAUSIBLE_MPP`)."""
        if not self._dpi:
            return None
        try:
            mpp = 25400.0 / float(self._dpi[0])
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        return mpp if PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None

    def tiles(self) -> list[TileSpec] | None:
        """None: the assessment lays a grid over the image."""
        return None

    def thumbnail(self, max_side: int) -> Image.Image:
        """The image reduced to ``max_side``."""
        return _fit(self._image, max_side)

    def read(self, tile: TileSpec, size: int) -> Image.Image:
        """Crop and resize (Lanczos)."""
        crop = self._image.crop((tile.x, tile.y, tile.x + tile.side, tile.y + tile.side))
        return crop if tile.side == size else crop.resize((size, size), Image.Resampling.LANCZOS)

    def content_hash(self) -> str:
        """SHA-256 of the image file."""
        return sha256_file(self.path)

    def close(self) -> None:
        """Drop the decoded image."""
        self._image.close()


def _is_tile_name(name: str) -> bool:
    """A tile image, not a macOS resource fork (``._name``) or another file."""
    base = Path(name).name
    return Path(base).suffix.lower() in TILE_SUFFIXES and not base.startswith("._")


class TileSetSource:
    """One slide's TCIA tiles in a folder or a zip, placed on the slide by the x and y in their names."""

    def __init__(self, path: Path, tile_px: int) -> None:
        self.path = path
        self.name = path.name
        self._zip: zipfile.ZipFile | None = None
        if path.is_dir():
            members = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and _is_tile_name(p.name))
            self.kind = "tile-folder"
        else:
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise SlideError(f"{path}: not a readable zip archive ({exc}); expected {EXPECTED_INPUT}") from exc
            members = sorted(m.filename for m in self._zip.infolist() if not m.is_dir() and _is_tile_name(m.filename))
            self.kind = "tile-zip"
        try:
            if not members:
                raise SlideError(f"{path}: holds no tile images (.jpg, .png, .tif); expected {EXPECTED_INPUT}")
            self._placed = self._place(members)
        except SlideError:
            self.close()
            raise
        self.slide = next(iter(self._placed))[0]
        self._tiles = [TileSpec(x, y, tile_px, member) for (_, x, y), member in sorted(self._placed.items())]
        self.dimensions = (max(t.x for t in self._tiles) + tile_px, max(t.y for t in self._tiles) + tile_px)
        self.origin = (0, 0)

    def _place(self, members: list[str]) -> dict[tuple[str, int, int], str]:
        # Ingest's own parser: the same slide names (and the official label file's spaced spelling) as training.
        parsed: dict[str, TileName] = {}
        unnamed = []
        for member in members:
            try:
                parsed[member] = parse_tile_name(Path(member).name)
            except TileNameError:
                unnamed.append(member)
        if unnamed:
            raise SlideError(
                f"{self.path}: {len(unnamed)} of {len(members)} tile names carry no coordinates, e.g. "
                f"{unnamed[:3]}; expected TCIA names {TILE_NAME_PATTERN}"
            )
        placed: dict[tuple[str, int, int], str] = {}
        duplicates: list[str] = []
        for member, name in parsed.items():
            key = (name.slide, name.x, name.y)
            if key in placed:
                duplicates.append(f"{placed[key]} and {member}")
            placed[key] = member
        if duplicates:
            raise SlideError(
                f"{self.path}: {len(duplicates)} tile positions are given twice, e.g. {duplicates[:3]}; expected "
                "one file per <slide>-<x>-<y>"
            )
        slides = Counter(slide for slide, _, _ in placed)
        if len(slides) > 1:
            listed = ", ".join(f"{name} ({count} tiles)" for name, count in slides.most_common())
            raise SlideError(
                f"{self.path}: tiles of {len(slides)} slides in one input: {listed}; expected the tiles of one "
                "slide (assess each slide separately)"
            )
        return placed

    def recorded_mpp(self) -> float | None:
        """None: a tile set's scale is that of the training tiles (the assessment knows it)."""
        return None

    def tiles(self) -> list[TileSpec] | None:
        """One tile per file, ``assess.tcia_tile_px`` slide pixels wide, at its name's x and y."""
        return list(self._tiles)

    def _bytes(self, member: str) -> bytes:
        if self._zip is not None:
            try:
                return self._zip.read(member)
            # zlib.error: corrupt deflate data; RuntimeError: an encrypted member; NotImplementedError: a method
            # (Deflate64) zipfile cannot decompress.
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, RuntimeError, NotImplementedError) as exc:
                raise SlideError(
                    f"{self.path}: cannot read {member} from the zip ({exc}); expected an unencrypted, stored or "
                    "deflated zip of JPEG/PNG/TIFF tiles"
                ) from exc
        try:
            return (self.path / member).read_bytes()
        except OSError as exc:
            raise SlideError(f"{self.path / member}: cannot read file ({exc.strerror or exc})") from exc

    def thumbnail(self, max_side: int) -> Image.Image:
        """A mosaic of the tiles (JPEG draft decoding keeps it cheap), glass white."""
        width, height = self.dimensions
        scale = max_side / max(width, height)
        canvas = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))), (255, 255, 255))
        cell = max(1, round(self._tiles[0].side * scale))
        for tile in self._tiles:
            try:
                with Image.open(io.BytesIO(self._bytes(tile.key))) as image:
                    image.draft("RGB", (cell, cell))
                    small = image.convert("RGB").resize((cell, cell), Image.Resampling.BOX)
            except (OSError, SyntaxError, ValueError, SlideError):
                continue  # an unreadable tile is reported when the assessment reads it
            canvas.paste(small, (round(tile.x * scale), round(tile.y * scale)))
        return canvas

    def read(self, tile: TileSpec, size: int) -> Image.Image:
        """Decode the tile's file with the project's decoder and resize it (Lanczos)."""
        image = decode_image(self._bytes(tile.key), source=f"{self.path}/{tile.key}")
        return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.LANCZOS)

    def content_hash(self) -> str:
        """SHA-256 over each tile's name and bytes, in name order."""
        digest = hashlib.sha256()
        for member in sorted(self._placed.values()):
            digest.update(member.encode())
            try:
                digest.update(hashlib.sha256(self._bytes(member)).digest())
            except SlideError:
                digest.update(b"unreadable")  # reported by the assessment; it must not sink the hash
        return digest.hexdigest()

    def close(self) -> None:
        """Close the zip."""
        if self._zip is not None:
            self._zip.close()


def open_source(path: str | Path, max_image_pixels: int, tcia_tile_px: int) -> SlideSource:
    """Open an input by what it is: a folder or zip of tiles, a DICOM folder, a slide OpenSlide reads, an image.

    Args:
        path: The input.
        max_image_pixels: ``assess.max_image_pixels``.
        tcia_tile_px: ``assess.tcia_tile_px``, the side of a tile of a tile set in slide pixels.

    Returns:
        The source.

    Raises:
        SlideError: The input does not exist or is none of :data:`EXPECTED_INPUT`.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: no such file or folder; expected {EXPECTED_INPUT}")
    if path.is_dir():
        dicom = sorted(path.glob("*.dcm"))
        if dicom:
            return OpenSlideSource(dicom[0])
        return TileSetSource(path, tcia_tile_px)
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: empty file (0 bytes); expected {EXPECTED_INPUT}")
    if path.suffix.lower() == ".zip" or zipfile.is_zipfile(path):
        return TileSetSource(path, tcia_tile_px)
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as exc:
        raise SlideError(f"{path}: OpenSlide cannot read this file ({exc}); expected {EXPECTED_INPUT}") from exc
    if vendor is not None:
        return OpenSlideSource(path)
    return PlainImageSource(path, max_image_pixels)
