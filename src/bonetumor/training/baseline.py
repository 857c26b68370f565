"""The baseline every network must beat: colour (and optionally texture) histograms into a random forest.

H&E tiles of the three classes differ strongly in colour: necrosis is pale pink, viable tumour dense purple,
normal bone and marrow white and red. A random forest on per-channel histograms already separates much of that,
so a deep model that does not beat it on the same folds has learnt nothing a histogram does not know. The
baseline sees each tile through :func:`bonetumor.transforms.preprocess.tile_ops` (the centred square,
``baseline.tile_size``, and the fold's stain normaliser only with ``baseline.stain_normalization``: normalising stain
removes the colour signal a histogram lives on, and a weaker bar would flatter the networks). It is scored on the same
folds, with the same metrics, intervals and referral rule as the networks.

Features (:func:`tile_features`): ``bins``-bin histograms of R, G, B and of H, S, V (PIL's HSV), each normalised
to sum to 1; with ``texture``, a uniform local-binary-pattern histogram (8 neighbours, radius 1) of the grey tile
(scikit-image). Scikit-learn's ``RandomForestClassifier`` with ``trees`` trees learns on them. Its logits are the
log of its (clipped) probabilities, so temperature scaling and the referral rule treat it like the networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage.feature import local_binary_pattern
from sklearn.ensemble import RandomForestClassifier
from torchvision.transforms import v2

from bonetumor.config import BaselineConfig
from bonetumor.errors import DatasetError
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import tile_ops
from bonetumor.transforms.stain import StainNormalizer

#: Name of the baseline in the train output, the evaluation and the reports.
BASELINE = "baseline"
#: Smallest probability turned into a logit (a forest gives exact zeros).
PROBABILITY_FLOOR = 1e-4
#: Local binary patterns: neighbours and radius; "uniform" patterns give ``LBP_POINTS + 2`` codes.
LBP_POINTS = 8
LBP_RADIUS = 1


def tile_features(image: Image.Image, bins: int, texture: bool = False) -> np.ndarray:
    """Return the baseline's feature vector of one prepared tile (RGB image).

    Args:
        image: The tile after :func:`bonetumor.transforms.preprocess.tile_ops`.
        bins: Histogram bins per channel.
        texture: Append the uniform LBP histogram of the grey tile.

    Returns:
        ``6 * bins`` (+ ``LBP_POINTS + 2`` with texture) non-negative floats; each histogram sums to 1.
    """
    rgb = np.asarray(image.convert("RGB"))
    hsv = np.asarray(image.convert("RGB").convert("HSV"))
    pixels = rgb.shape[0] * rgb.shape[1]
    parts = [
        np.histogram(channels[..., c], bins=bins, range=(0, 256))[0] / pixels
        for channels in (rgb, hsv)
        for c in range(3)
    ]
    if texture:
        grey = np.asarray(image.convert("L"))
        codes = local_binary_pattern(grey, LBP_POINTS, LBP_RADIUS, method="uniform")
        parts.append(np.histogram(codes, bins=LBP_POINTS + 2, range=(0, LBP_POINTS + 2))[0] / pixels)
    return np.concatenate(parts).astype(np.float64)


class HistogramForest:
    """Colour-histogram random forest over tiles, with the shared deterministic tile steps.

    Args:
        config: The ``baseline`` section (``tile_size``, ``stain_normalization``, histogram and forest settings).
        classes: Class names in output order.
        stain: The fold's fitted stain normaliser; applied only with ``config.stain_normalization``.
    """

    def __init__(
        self,
        config: BaselineConfig,
        classes: Sequence[str],
        stain: StainNormalizer | None = None,
    ) -> None:
        self.config = config
        self.classes = tuple(classes)
        self.prepare = v2.Compose(tile_ops(config.tile_size, stain if config.stain_normalization else None))
        self.forest = RandomForestClassifier(n_estimators=config.trees, random_state=config.seed, n_jobs=-1)

    def features(self, files: Sequence[str | Path]) -> np.ndarray:
        """Return the feature matrix of tile files, one row per file.

        Raises:
            InvalidImageError: A file does not decode.
        """
        rows = [tile_features(self.prepare(decode_image(f)), self.config.bins, self.config.texture) for f in files]
        width = 6 * self.config.bins + (LBP_POINTS + 2 if self.config.texture else 0)
        return np.stack(rows) if rows else np.zeros((0, width))

    def fit(self, files: Sequence[str | Path], labels: Sequence[int]) -> HistogramForest:
        """Fit the forest on training tiles and their class indices.

        Raises:
            DatasetError: No tiles, or a label outside the classes.
        """
        y = np.asarray(labels, dtype=np.int64)
        if y.size == 0 or len(files) != y.size:
            raise DatasetError(f"baseline: {len(files)} files and {y.size} labels; expected one label per tile, >= 1")
        if y.min() < 0 or y.max() >= len(self.classes):
            raise DatasetError(f"baseline: labels span {y.min()}..{y.max()}; expected 0..{len(self.classes) - 1}")
        self.forest.fit(self.features(files), y)
        return self

    def predict_proba(self, files: Sequence[str | Path]) -> np.ndarray:
        """Return ``(N, len(classes))`` probabilities (0 for a class the training tiles lacked)."""
        probs = np.zeros((len(files), len(self.classes)))
        if len(files):
            probs[:, self.forest.classes_] = self.forest.predict_proba(self.features(files))
        return probs

    def logits(self, files: Sequence[str | Path]) -> np.ndarray:
        """Return log-probabilities, floored at :data:`PROBABILITY_FLOOR` and renormalised (finite logits)."""
        probs = np.clip(self.predict_proba(files), PROBABILITY_FLOOR, 1.0)
        return np.log(probs / probs.sum(axis=1, keepdims=True)).astype(np.float32)


def describe(config: BaselineConfig) -> dict[str, Any]:
    """Return what the baseline is, for runs and reports."""
    return {
        "model": "random forest",
        "trees": config.trees,
        "features": f"RGB and HSV histograms, {config.bins} bins per channel"
        + (", uniform LBP texture histogram" if config.texture else ""),
        "tile_size": config.tile_size,
        "stain_normalization": config.stain_normalization,
    }
