"""Image decoding and the preprocessing shared by training, evaluation and serving.

Every tile takes the same deterministic first steps, :func:`tile_ops`: the fitted stain normaliser (when the model
has one, :mod:`bonetumor.transforms.stain`), the centred square crop, and a resize to ``preprocess.tile_size``, which
fixes the physical scale of a pixel. Evaluation and serving then turn that tile into the normalised tensor
(:func:`build_eval_transform`, ``(3, tile_size, tile_size)``), and the model's test-time views
(:mod:`bonetumor.transforms.tta`) cut their fixed ``input_size`` crops out of it. Training takes random ``input_size``
crops of the same resized tile instead (:func:`bonetumor.transforms.augment.build_train_transform`), and ends with the
same :func:`tensor_tail`. The served model carries the same parameters in its metadata, so there is no second
implementation to drift.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from bonetumor.config import PreprocessConfig
from bonetumor.transforms.stain import StainNormalizer


def build_eval_transform(config: PreprocessConfig, stain: StainNormalizer | None = None) -> v2.Compose:
    """Return the deterministic transform from an RGB PIL image to the model's input tile tensor.

    :func:`tile_ops` (stain normalisation, centred square crop, resize to ``tile_size``), then :func:`tensor_tail`
    (scale to [0, 1], normalise with ``mean``/``std``). The result is ``(3, tile_size, tile_size)``: the input of
    the model's test-time views (:class:`bonetumor.transforms.tta.TestTimeAugmented`), which cut the ``input_size``
    crops.

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
