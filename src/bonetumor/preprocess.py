"""Image decoding and the preprocessing shared by training, evaluation and serving.

Every tile takes the same deterministic first steps, :func:`tile_ops`: the fitted stain normaliser (when the model
has one, :mod:`bonetumor.stain`), the centred square crop, and a resize to ``preprocess.tile_size``, which fixes
the physical scale of a pixel. Evaluation and serving then turn that tile into the normalised tensor
(:func:`build_eval_transform`, ``(3, tile_size, tile_size)``), and the model's test-time views
(:mod:`bonetumor.tta`) cut their fixed ``input_size`` crops out of it. Training takes random ``input_size`` crops of
the same resized tile instead (:func:`bonetumor.augment.build_train_transform`), and ends with the same
:func:`tensor_tail`. The served model carries the same parameters in its metadata, so there is no second
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
    """Return the deterministic transform from an RGB PIL image to the model's input tile tensor.

    :func:`tile_ops` (stain normalisation, centred square crop, resize to ``tile_size``), then :func:`tensor_tail`
    (scale to [0, 1], normalise with ``mean``/``std``). The result is ``(3, tile_size, tile_size)``: the input of
    the model's test-time views (:class:`bonetumor.tta.TestTimeAugmented`), which cut the ``input_size`` crops.

    Args:
        config: The preprocess section the model was trained with.
        stain: The model's fitted stain normaliser, or None when it was trained without one.
    """
    return v2.Compose([*tile_ops(config.tile_size, stain), *tensor_tail(config)])


class CenterSquareCrop:
    """Crop a PIL image to the largest centred square, so a non-square tile is cropped, never squashed."""

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return the centred square crop (the image itself when already square)."""
        width, height = image.size
        if width == height:
            return image
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))


def tile_ops(tile_size: int, stain: StainNormalizer | None = None) -> list[Any]:
    """Return the deterministic image-to-image steps every tile takes first, in training, evaluation and serving.

    The stain normaliser (on the full-resolution tile, when given), the centred square crop, and an antialiased
    resize to ``tile_size`` squared (``preprocess.tile_size``). Their output is what training caches per tile and
    crops at random.
    """
    return [
        *([stain] if stain is not None else []),
        CenterSquareCrop(),
        v2.Resize((tile_size, tile_size), antialias=True),
    ]


def tensor_tail(config: PreprocessConfig) -> list[Any]:
    """Return the steps that end both the training and the evaluation transform: to a float tensor, normalised."""
    return [
        v2.ToImage(),
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
