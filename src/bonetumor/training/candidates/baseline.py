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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import joblib
import numpy as np
from PIL import Image
from skimage.feature import local_binary_pattern
from sklearn.ensemble import RandomForestClassifier
from torchvision.transforms import v2

from bonetumor.config import BaselineConfig, Config
from bonetumor.data.datasets import label_indices
from bonetumor.errors import ArtifactError, DatasetError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.training.candidates.base import Candidate, FitContext, FittedModel, Section, TrainingSet
from bonetumor.training.export import measure_latency
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import tile_ops
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.utils import write_json

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
        return self.image_features([decode_image(f) for f in files])

    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return the feature matrix of decoded tiles, one row per image."""
        rows = [tile_features(self.prepare(image), self.config.bins, self.config.texture) for image in images]
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
        return self._proba(self.features(files))

    def _proba(self, features: np.ndarray) -> np.ndarray:
        probs = np.zeros((len(features), len(self.classes)))
        if len(features):
            probs[:, self.forest.classes_] = self.forest.predict_proba(features)
        return probs

    def logits(self, files: Sequence[str | Path]) -> np.ndarray:
        """Return log-probabilities, floored at :data:`PROBABILITY_FLOOR` and renormalised (finite logits)."""
        return _floored_log(self.predict_proba(files))

    def image_logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return the logits of decoded tiles, as :meth:`logits` does for files."""
        return _floored_log(self._proba(self.image_features(images)))


def _floored_log(probs: np.ndarray) -> np.ndarray:
    probs = np.clip(probs, PROBABILITY_FLOOR, 1.0)
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


class BaselineFitted:
    """A fitted :class:`HistogramForest`."""

    def __init__(self, forest: HistogramForest) -> None:
        self.forest = forest
        self._latency: dict[tuple[int, int], float] = {}

    def logits(self, files: Sequence[Path]) -> np.ndarray:
        """Return the forest's logits of tile files."""
        return self.forest.logits(files)

    def latency_ms(self, tile_size: int, batch: int) -> float:
        """Return the CPU milliseconds per tile of features plus forest, on random ``tile_size`` RGB tiles.

        The histograms are the forest's preprocessing and are timed with it; decoding is not.
        """
        key = (tile_size, batch)
        if key not in self._latency:  # timed once per shape, as the networks are
            rng = np.random.default_rng(0)
            shape = (tile_size, tile_size, 3)
            images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(batch)]
            self._latency[key] = measure_latency(self.forest.image_logits, images)["ms_per_image_p50"]
        return self._latency[key]

    def metrics(self) -> dict[str, float]:
        """Nothing beyond the fold's scores."""
        return {}

    def tags(self) -> dict[str, str]:
        """None."""
        return {}

    def export(
        self,
        out_dir: Path,
        provenance: Mapping[str, Any] | None = None,
        referral: ReferralPolicy | None = None,
    ) -> Path:
        """Write ``forest.joblib`` (scikit-learn's own persistence) and ``baseline.json`` into ``out_dir``.

        ``baseline.json`` holds what the forest is, its classes, provenance and referral rule. Loading a joblib
        file runs pickled code: load only files you made yourself (:func:`load_baseline`).
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        joblib.dump(self.forest, out_dir / "forest.joblib")
        write_json(
            out_dir / "baseline.json",
            {
                "classes": list(self.forest.classes),
                "what": describe(self.forest.config),
                "provenance": dict(provenance or {}),
                "referral": None if referral is None else referral.to_dict(),
            },
        )
        return out_dir


def load_baseline(folder: str | Path) -> HistogramForest:
    """Load a forest :meth:`BaselineFitted.export` wrote (a trusted file: joblib unpickles code).

    Raises:
        ArtifactError: The file is missing or is not a :class:`HistogramForest`.
    """
    path = Path(folder) / "forest.joblib"
    try:
        forest = joblib.load(path)
    except (OSError, EOFError, ValueError) as exc:
        raise ArtifactError(
            f"{path}: cannot load the baseline ({exc}); expected a file BaselineFitted.export wrote"
        ) from exc
    if not isinstance(forest, HistogramForest):
        raise ArtifactError(f"{path}: holds a {type(forest).__name__}; expected a HistogramForest")
    return forest


class BaselineCandidate(Candidate):
    """The colour-histogram random forest, fitted on each fold's real training tiles: the bar to beat."""

    kind: ClassVar[str] = "baseline"
    section: ClassVar[Section] = "baseline"
    param_sections: ClassVar[tuple[str, ...]] = ("data", "augment", "baseline")

    def __init__(self) -> None:
        super().__init__(BASELINE)

    @classmethod
    def from_config(cls, config: Config) -> list[Candidate]:
        """Always one: every network is compared with it."""
        return [cls()]

    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> BaselineFitted:
        """Fit the forest on the real training tiles (GAN tiles balance a loss; a forest needs no such help)."""
        classes = context.config.data.classes
        real = data.real_rows
        forest = HistogramForest(context.config.baseline, classes, data.stain)
        return BaselineFitted(forest.fit(list(real["file"]), label_indices(real["label"], classes)))

    def mlflow_params(self, config: Config) -> dict[str, Any]:
        """What the forest is (trees, features, tile size)."""
        return {f"baseline.{k}": v for k, v in describe(config.baseline).items()}

    def summary(self, folds: list[dict[str, Any]], scores: list[float], out_dir: Path) -> dict[str, Any]:
        """The per-fold macro-F1 (its mean is the bar)."""
        return {"fold_macro_f1": scores}
