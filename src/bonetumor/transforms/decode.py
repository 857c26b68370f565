"""Decoding tiles and uploads: JPEG, PNG or TIFF into fully loaded 8-bit RGB, with clear errors.

Every path that reads a tile (ingest, validation, training, serving) decodes it here, so a corrupt or
unsupported file fails the same way everywhere, naming the file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from bonetumor.errors import InvalidImageError

#: Container formats accepted for tiles and uploads (Pillow format names).
SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "TIFF"})


#: Pixel modes that convert to RGB without losing meaning (alpha is dropped, grey replicated, CMYK converted).
CONVERTIBLE_MODES: frozenset[str] = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "CMYK", "YCbCr"})


def decode_image(data: bytes | str | Path, source: str | None = None) -> Image.Image:
    """Decode JPEG, PNG or TIFF bytes (or a file) into a fully loaded 8-bit RGB image.

    The whole image is decoded here, so a truncated or corrupt file fails now with a clear message instead of
    later inside a data loader or a model.

    Args:
        data: Encoded image bytes, or a path to an image file.
        source: Name used in error messages (a file path or ``"upload"``); defaults to the path or ``"image"``.

    Returns:
        An RGB image.

    Raises:
        InvalidImageError: The input is empty, not an image, in an unsupported format or pixel mode, or corrupt.
    """
    if isinstance(data, (str, Path)):
        name = source or str(data)
        try:
            raw = Path(data).read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    else:
        name = source or "image"
        raw = data
    if not raw:
        raise InvalidImageError(f"{name}: empty file (0 bytes); expected a JPEG, PNG or TIFF image")
    fmt: str | None = None
    try:
        image = Image.open(io.BytesIO(raw))
        fmt = image.format
        if fmt not in SUPPORTED_FORMATS:
            raise InvalidImageError(
                f"{name}: {fmt} images are not accepted; expected one of {sorted(SUPPORTED_FORMATS)}"
            )
        image.load()
    except UnidentifiedImageError as exc:
        raise InvalidImageError(f"{name}: not a recognised image file; expected JPEG, PNG or TIFF") from exc
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"{name}: image too large to decode safely ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow signals truncated or corrupt data with OSError ("image file is truncated") or SyntaxError.
        kind = f"{fmt} image" if fmt else "image"
        raise InvalidImageError(
            f"{name}: corrupt or truncated {kind} ({exc}); expected a complete JPEG, PNG or TIFF"
        ) from exc
    if image.mode not in CONVERTIBLE_MODES:
        raise InvalidImageError(
            f"{name}: pixel mode {image.mode} is not supported; "
            f"expected 8-bit RGB (or one of {sorted(CONVERTIBLE_MODES)})"
        )
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass(frozen=True)
class ImageInfo:
    """What decoding a tile file revealed, for data validation (no conversion applied).

    Attributes:
        decodes: Whether the full pixel data decoded.
        format: Pillow format name (``JPEG``...), or None when not recognised.
        mode: Pillow pixel mode (``RGB``, ``RGBA``, ``L``, ``I;16``...), or None.
        width: Width in pixels, or None.
        height: Height in pixels, or None.
        error: Why decoding failed, or None.
    """

    decodes: bool
    format: str | None
    mode: str | None
    width: int | None
    height: int | None
    error: str | None


def inspect_image(path: str | Path) -> ImageInfo:
    """Decode a file fully and report its format, mode and size, or why it does not decode."""
    try:
        with Image.open(path) as image:
            fmt, mode, (width, height) = image.format, image.mode, image.size
            image.load()
    except FileNotFoundError:
        return ImageInfo(False, None, None, None, None, "file not found")
    except UnidentifiedImageError:
        return ImageInfo(False, None, None, None, None, "not a recognised image file")
    except Image.DecompressionBombError as exc:
        return ImageInfo(False, None, None, None, None, f"too large to decode safely ({exc})")
    except (OSError, ValueError, SyntaxError) as exc:
        return ImageInfo(False, None, None, None, None, f"corrupt or truncated ({exc})")
    if fmt not in SUPPORTED_FORMATS:
        return ImageInfo(
            False, fmt, mode, width, height, f"{fmt} is not an accepted format {sorted(SUPPORTED_FORMATS)}"
        )
    return ImageInfo(True, fmt, mode, width, height, None)
