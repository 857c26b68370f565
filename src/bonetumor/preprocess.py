"""Image decoding and the preprocessing shared by training, evaluation and serving.

One function builds the tensor a model sees from an image (:func:`build_eval_transform`); the training
transform is the augmentation policy followed by exactly that function's steps, and the served model carries the
same parameters (and its fitted stain normaliser, :mod:`bonetumor.stain`) in its metadata. There is no second
implementation to drift.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from bonetumor.config import PreprocessConfig
from bonetumor.errors import InvalidImageError

if TYPE_CHECKING:
    # Only for the annotation: stain imports decode_image from here at call time.
    from bonetumor.stain import StainNormalizer

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


def build_eval_transform(config: PreprocessConfig, stain: StainNormalizer | None = None) -> v2.Compose:
    """Return the deterministic transform from an RGB PIL image to the model's input tensor.

    Stain normalisation first (when the model was trained with a fitted normaliser), then the shared tail:
    centre square crop, resize to ``image_size`` squared (antialiased), scale to [0, 1], normalise with
    ``mean``/``std``.

    Args:
        config: The preprocess section the model was trained with.
        stain: The model's fitted stain normaliser, or None when it was trained without one.
    """
    return v2.Compose(([stain] if stain is not None else []) + tensor_tail(config))


class CenterSquareCrop:
    """Crop a PIL image to the largest centred square, so a non-square tile is cropped, never squashed.

    Training's zoom step already cuts square crops; this keeps evaluation and serving consistent with it.
    """

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return the centred square crop (the image itself when already square)."""
        width, height = image.size
        if width == height:
            return image
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))


def tensor_tail(config: PreprocessConfig) -> list[Any]:
    """Return the crop, resize and normalise steps that end both the training and the evaluation transform."""
    size = config.image_size
    return [
        CenterSquareCrop(),
        v2.ToImage(),
        v2.Resize((size, size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(config.mean), std=list(config.std)),
    ]


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
