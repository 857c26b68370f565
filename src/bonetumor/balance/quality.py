"""The quality report of a conditional GAN's synthetic tiles against the real training tiles it learned from.

Three questions decide whether synthetic tiles may join a training set:

* **Do they look like the real tiles?** The kernel inception distance (KID) between real and synthetic tiles,
  measured against a floor: the KID between two *slide-disjoint* halves of the real tiles. Tiles of one slide look
  alike, so a floor from a random split would be far too low and no GAN could reach it.
* **Can a classifier tell them apart?** The cross-validated accuracy of a logistic regression on real against
  synthetic tiles (0.5 = indistinguishable).
* **Are they copies?** The share of synthetic tiles closer (in pixel space, over the 8 flips and right-angle
  rotations, since the GAN trains on dihedral-augmented tiles) to some real tile than real tiles usually are to
  each other.

Features come from a small randomly initialised, never trained convolutional network (available offline, with no
downloaded weights), seeded by ``balance.quality.feature_seed`` so that every set is measured in the same space.
Real and synthetic tiles are compared at the same size (the GAN's).

Inputs everywhere: tiles are ``uint8`` arrays of shape ``(N, S, S, 3)``, labels integer class indices of shape
``(N,)`` and ``classes`` the class names those indices point into.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from bonetumor.config import GanQualityConfig
from bonetumor.errors import DatasetError

#: Channel widths of the random feature network's stages; each stage contributes its mean and std per channel.
FEATURE_WIDTHS: tuple[int, ...] = (32, 64, 128)
#: Smallest tile side the feature network accepts (its last stage must still see a few pixels).
MIN_TILE_SIZE = 32
#: Random slide-disjoint splits of the real tiles the KID floor is averaged over.
FLOOR_SPLITS = 10
#: Lower bound of the KID ratio's denominator (see :func:`quality_report`).
KID_RATIO_EPS = 1e-6
#: Closest synthetic-real pairs kept in the report (and drawn by :func:`render_closest_pairs`).
CLOSEST_PAIRS = 8
#: Fewest tiles per side for a per-class two-sample accuracy; below it the figure is pure noise.
MIN_PER_CLASS_TWO_SAMPLE = 4
#: Fewest real (and synthetic) tiles of a class for its per-class KID.
MIN_PER_CLASS_KID_REAL, MIN_PER_CLASS_KID_SYNTHETIC = 4, 2

_BATCH = 128
_CELL_IN, _LABEL_IN, _TITLE_IN = 1.2, 1.6, 0.35
_DPI = 100
_METRIC_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


# --------------------------------------------------------------------------------------------------- features


class _RandomFeatures(nn.Module):
    """Stages of 3x3 convolution + ReLU (the first at full resolution, the others stride 2).

    Each stage's activations are pooled to a per-channel mean and standard deviation: the early stages carry
    colour (stain), the later ones texture (nuclei, fibres), and the std pooling keeps how patchy a tile is.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        channels = [3, *widths]
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1)
            for i, (c_in, c_out) in enumerate(itertools.pairwise(channels))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, S, S)`` tiles in [-1, 1] to ``(N, 2 * sum(widths))`` pooled features."""
        pooled: list[torch.Tensor] = []
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))
            flat = h.flatten(2)
            pooled += [flat.mean(2), flat.std(2)]
        return torch.cat(pooled, dim=1)


def feature_network(seed: int) -> torch.nn.Module:
    """The fixed random feature network: seeded, never trained, in eval mode, gradients off.

    The weights are drawn from a local :class:`torch.Generator` (He-normal, zero biases), so the same seed gives
    the same network whatever the global torch RNG state, and building it leaves that state untouched.

    Args:
        seed: Seed of the weights (``balance.quality.feature_seed``).

    Returns:
        A module mapping ``(N, 3, S, S)`` float tiles (S >= 32) to ``(N, 448)`` features.
    """
    # The layers' own default initialisation draws from the global RNG: fork it so the caller's stream is left
    # as it was; those default weights are overwritten below from the local generator anyway.
    with torch.random.fork_rng(devices=[]):
        net = _RandomFeatures(FEATURE_WIDTHS)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in net.modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            # He-normal keeps the activation scale roughly constant through the ReLU stages.
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
            if conv.bias is not None:
                conv.bias.zero_()
    net.requires_grad_(False)
    return net.eval()


def tile_features(tiles: np.ndarray, seed: int) -> np.ndarray:
    """Features of tiles in the random network's space.

    Args:
        tiles: ``uint8`` tiles of shape ``(N, S, S, 3)``, S >= 32.
        seed: Seed of the feature network.

    Returns:
        ``float64`` features of shape ``(N, D)``.

    Raises:
        DatasetError: If ``tiles`` is empty or not ``uint8`` of shape ``(N, S, S, 3)`` with S >= 32.
    """
    _check_tiles(tiles, "tiles")
    net = feature_network(seed)
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(tiles), _BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(tiles[start : start + _BATCH]))
            x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(net(x).double().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------------ KID


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between the rows of x and y under the kernel k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    # Unbiased: the diagonals (a tile against itself) are left out of the within-sample terms.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def _kid_values(x: np.ndarray, y: np.ndarray, subsets: int, subset_size: int, rng: np.random.Generator) -> np.ndarray:
    """The MMD^2 of each of ``subsets`` random subsets (without replacement) of the two samples."""
    size = min(subset_size, len(x), len(y))
    values = np.empty(subsets)
    for i in range(subsets):
        xi = rng.choice(len(x), size, replace=False)
        yi = rng.choice(len(y), size, replace=False)
        values[i] = _polynomial_mmd2(x[xi], y[yi])
    return values


def _check_features(x: np.ndarray, name: str, min_rows: int) -> None:
    if x.ndim != 2 or len(x) < min_rows or x.shape[1] < 1:
        raise DatasetError(f"{name}: expected a feature array of shape (N, D) with N >= {min_rows}, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DatasetError(f"{name}: expected finite features, found NaN or infinity")


def _check_pair(x: np.ndarray, y: np.ndarray, names: tuple[str, str], min_rows: int) -> None:
    _check_features(x, names[0], min_rows)
    _check_features(y, names[1], min_rows)
    if x.shape[1] != y.shape[1]:
        raise DatasetError(
            f"{names[1]}: expected features of the same dimension as {names[0]} ({x.shape[1]}), got {y.shape[1]}"
        )


def kernel_inception_distance(
    x: np.ndarray, y: np.ndarray, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """Kernel inception distance (KID) between two samples of features.

    The unbiased MMD^2 under the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3, averaged over ``subsets``
    random subsets of ``min(subset_size, len(x), len(y))`` rows of each sample, drawn without replacement. Being
    unbiased, it is about 0 (and may be slightly negative) for two samples of one distribution.

    Args:
        x: Features of shape ``(N, D)``, N >= 2.
        y: Features of shape ``(M, D)``, M >= 2.
        subsets: Number of subsets to average over (>= 1).
        subset_size: Rows per subset (>= 2), capped by the sizes of the samples.
        seed: Seed of the subset draws.

    Returns:
        The mean and the standard deviation of the subsets' MMD^2.

    Raises:
        DatasetError: If a sample has fewer than 2 rows, the dimensions differ or the features are not finite.
        ValueError: If ``subsets < 1`` or ``subset_size < 2``.
    """
    _check_pair(x, y, ("x", "y"), 2)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"expected subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    values = _kid_values(np.asarray(x, np.float64), np.asarray(y, np.float64), subsets, subset_size, _rng(seed))
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------------------- two-sample accuracy


def two_sample_accuracy(real: np.ndarray, synthetic: np.ndarray, seed: int) -> float:
    """Cross-validated accuracy of a classifier telling real from synthetic features (0.5 = indistinguishable).

    The larger group is randomly subsampled to the smaller one's size, so that always answering one group scores
    0.5. A standardised logistic regression is scored out of fold with ``min(5, n)`` stratified folds (n: the
    smaller group's size), and the accuracy is that of all the out-of-fold predictions together.

    Args:
        real: Features of the real tiles, shape ``(N, D)``, N >= 2.
        synthetic: Features of the synthetic tiles, shape ``(M, D)``, M >= 2.
        seed: Seed of the subsampling and of the folds.

    Returns:
        The accuracy in [0, 1].

    Raises:
        DatasetError: If a group has fewer than 2 rows, the dimensions differ or the features are not finite.
    """
    _check_pair(real, synthetic, ("real", "synthetic"), 2)
    rng = _rng(seed)
    n = min(len(real), len(synthetic))
    real = real[np.sort(rng.choice(len(real), n, replace=False))]
    synthetic = synthetic[np.sort(rng.choice(len(synthetic), n, replace=False))]
    x = np.concatenate([real, synthetic])
    y = np.repeat([0, 1], n)
    model = Pipeline([("scale", StandardScaler()), ("classify", LogisticRegression(max_iter=2000))])
    folds = StratifiedKFold(n_splits=min(5, n), shuffle=True, random_state=int(rng.integers(2**31)))
    predicted = cross_val_predict(model, x, y, cv=folds)
    return float(np.mean(predicted == y))


# ----------------------------------------------------------------------------------------------- memorisation


def _dihedral(tiles: np.ndarray, k: int) -> np.ndarray:
    """The k-th (0-7) of the 8 flips/right-angle rotations of ``(N, S, S, C)`` tiles; k = 0 is the identity."""
    flipped = tiles[:, :, ::-1] if k >= 4 else tiles
    return np.ascontiguousarray(np.rot90(flipped, k % 4, axes=(1, 2)))


def _pixels(tiles: np.ndarray) -> np.ndarray:
    # Centred on 0 so that the squared norms stay small next to the cross term (less float32 cancellation).
    return tiles.astype(np.float32) / 255.0 - 0.5


def _nearest_dihedral(query: np.ndarray, reference: np.ndarray, exclude_self: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per query tile, the RMS pixel distance to the nearest reference tile in any of its 8 orientations.

    Args:
        query: Centred pixel tiles, float32 ``(M, S, S, 3)``.
        reference: Centred pixel tiles, float32 ``(N, S, S, 3)``.
        exclude_self: ``query`` is ``reference``: skip each tile's own orientations (leave-one-out).

    Returns:
        The distances ``(M,)`` and the indices of the nearest reference tiles ``(M,)``.
    """
    q = query.reshape(len(query), -1)
    pixels = q.shape[1]
    q_norm = np.einsum("ij,ij->i", q, q, dtype=np.float64)
    # Every orientation is a permutation of the pixels, so the reference norms are the same for all 8.
    r_flat = reference.reshape(len(reference), -1)
    r_norm = np.einsum("ij,ij->i", r_flat, r_flat, dtype=np.float64)
    best = np.full(len(q), np.inf)
    best_index = np.zeros(len(q), dtype=np.int64)
    # Reference chunks of about 64 MiB keep memory flat at S = 128 with thousands of tiles.
    chunk = max(1, 2**24 // pixels)
    rows = np.arange(len(q))
    for k in range(8):
        for start in range(0, len(reference), chunk):
            block = _dihedral(reference[start : start + chunk], k).reshape(-1, pixels)
            sq = q_norm[:, None] + r_norm[None, start : start + len(block)] - 2.0 * (q @ block.T).astype(np.float64)
            if exclude_self:
                own = np.arange(start, start + len(block))
                sq[own, own - start] = np.inf
            nearest = sq.argmin(axis=1)
            value = sq[rows, nearest]
            better = value < best
            best[better] = value[better]
            best_index[better] = nearest[better] + start
    return np.sqrt(np.maximum(best, 0.0) / pixels), best_index


def nearest_real_distances(real: np.ndarray, synthetic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Memorisation distances in pixel space, invariant to the 8 flips/rotations of the real tiles.

    Tiles are taken as floats in [0, 1], flattened; the distance is the root mean square pixel difference. The GAN
    trains on dihedral-augmented tiles, so it could reproduce a rotated or mirrored copy: every real tile is
    compared in all 8 orientations and the nearest counts.

    Args:
        real: ``uint8`` real tiles ``(N, S, S, 3)``, N >= 2.
        synthetic: ``uint8`` synthetic tiles ``(M, S, S, 3)`` of the same size.

    Returns:
        The distance of each synthetic tile to its nearest real tile ``(M,)``, the index of that real tile ``(M,)``,
        and the distance of each real tile to its nearest *other* real tile ``(N,)`` (leave-one-out).

    Raises:
        DatasetError: If the arrays are not such tiles, differ in size, or there are fewer than 2 real tiles.
    """
    _check_tiles(real, "real tiles", min_count=2, min_size=1)
    _check_tiles(synthetic, "synthetic tiles", min_size=1)
    _check_same_size(real, synthetic)
    real_px, synthetic_px = _pixels(real), _pixels(synthetic)
    synthetic_distance, synthetic_index = _nearest_dihedral(synthetic_px, real_px, exclude_self=False)
    real_distance, _ = _nearest_dihedral(real_px, real_px, exclude_self=True)
    return synthetic_distance, synthetic_index, real_distance


# ----------------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class QualityReport:
    """The quality of one training set's synthetic tiles, and whether they pass the thresholds.

    Attributes:
        set_name: The training set (a fold, or ``full``).
        n_real: Real tiles compared.
        n_synthetic: Synthetic tiles compared.
        kid: KID(real, synthetic) in the random feature space, all classes pooled (class-matched, see
            :func:`quality_report`).
        kid_std: Its standard deviation over the KID subsets.
        kid_floor: KID between two slide-disjoint halves of the real tiles, averaged over random splits.
        kid_ratio: ``kid / max(kid_floor, max(KID_RATIO_EPS, kid_floor_std))``.
        two_sample_accuracy: Cross-validated accuracy of a classifier telling real from synthetic tiles.
        memorised_fraction: Share of synthetic tiles nearer a real tile than ``real_nn_quantile``.
        real_nn_quantile: The ``memorisation_quantile`` quantile of the real tiles' leave-one-out
            nearest-neighbour distances (RMS pixel distance, dihedral-invariant).
        per_class: Per class name: ``n_real``, ``n_synthetic``, ``kid``, ``two_sample_accuracy`` and
            ``memorised_fraction`` (``None`` where the class has too few tiles for the figure).
        closest_pairs: The closest (synthetic index, real index, distance) pairs, ascending.
        thresholds: The thresholds applied (the ``balance.quality`` keys).
        failures: One sentence per failed threshold; empty when the report passes.
        kid_floor_std: Standard deviation of the floor's subset estimates, over all splits.
        kid_subset_size: Rows per KID subset, the same for the floor and for KID(real, synthetic).
        floor_split: ``slides`` (the halves are slide-disjoint) or ``random`` (fewer than 2 slides, or no
            slide-disjoint split leaves 2 tiles on each side: a random split, so the floor is too low).
    """

    set_name: str
    n_real: int
    n_synthetic: int
    kid: float
    kid_std: float
    kid_floor: float
    kid_ratio: float
    two_sample_accuracy: float
    memorised_fraction: float
    real_nn_quantile: float
    per_class: dict[str, dict[str, float | None]]
    closest_pairs: list[tuple[int, int, float]]
    thresholds: dict[str, float]
    failures: tuple[str, ...]
    # Defaults so that a report can be built from the fields above alone (for example in another stage's tests).
    kid_floor_std: float = 0.0
    kid_subset_size: int = 0
    floor_split: str = "slides"

    @property
    def passed(self) -> bool:
        """Whether every threshold holds."""
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe copy (floats, ints, strings, lists and ``None``), with ``passed``."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            out[field.name] = getattr(self, field.name)
        out["per_class"] = {name: dict(values) for name, values in self.per_class.items()}
        out["closest_pairs"] = [[int(s), int(r), float(d)] for s, r, d in self.closest_pairs]
        out["thresholds"] = dict(self.thresholds)
        out["failures"] = list(self.failures)
        out["passed"] = self.passed
        return out

    def metrics(self) -> dict[str, float]:
        """Flat metrics for MLflow: ``gan_kid``, ..., ``gan_quality_passed`` and per class ``gan_kid_<class>`` etc."""
        out = {
            "gan_kid": self.kid,
            "gan_kid_std": self.kid_std,
            "gan_kid_floor": self.kid_floor,
            "gan_kid_ratio": self.kid_ratio,
            "gan_two_sample_accuracy": self.two_sample_accuracy,
            "gan_memorised_fraction": self.memorised_fraction,
            "gan_real_nn_quantile": self.real_nn_quantile,
            "gan_quality_passed": 1.0 if self.passed else 0.0,
        }
        for name, values in self.per_class.items():
            safe = _METRIC_UNSAFE.sub("_", name)
            for key in ("kid", "two_sample_accuracy", "memorised_fraction"):
                value = values.get(key)
                if value is not None:
                    out[f"gan_{key}_{safe}"] = value
        return {key: float(value) for key, value in out.items()}


def quality_report(
    real_tiles: np.ndarray,
    real_labels: np.ndarray,
    real_groups: Sequence[str],
    synthetic_tiles: np.ndarray,
    synthetic_labels: np.ndarray,
    classes: Sequence[str],
    config: GanQualityConfig,
    set_name: str,
    seed: int,
) -> QualityReport:
    """The quality report of synthetic tiles against the real tiles the GAN was trained on.

    * **KID floor.** The real tiles are split into two halves by slide (every slide wholly on one side, slides
      assigned in random order to the half with fewer tiles so far), over :data:`FLOOR_SPLITS` random splits, and
      the KID between the halves is averaged. With fewer than 2 slides, or when no split leaves 2 tiles on each
      side, the tiles are split at random instead (``floor_split = "random"``; that floor is too low).
    * **KID.** Real tiles are drawn class by class to match the synthetic tiles' class composition (the same
      number of each class on both sides, redrawn for every subset), because the synthetic set is balanced and the
      real one is not: a mismatch of composition alone would make a perfect GAN look distant. The subset size is
      the same for the floor and for KID(real, synthetic): the smallest half of the floor's splits, capped by the
      class-matched sample size, so the two are comparable.
    * **KID ratio.** Unbiased KID can be about 0 or negative, so ``kid_ratio = kid / max(kid_floor, eps)`` with
      ``eps = max(KID_RATIO_EPS, kid_floor_std)``: when the floor is below its own noise, the ratio counts the
      KID in units of that noise instead of exploding (or flipping sign).
    * **Two-sample accuracy** on the class-matched samples (see :func:`two_sample_accuracy`).
    * **Memorisation.** A synthetic tile is a near copy when its nearest real tile (any class, any of the 8
      orientations, see :func:`nearest_real_distances`) is nearer than the ``memorisation_quantile`` quantile
      of the real tiles' leave-one-out nearest-neighbour distances.

    Features are computed with ``config.feature_seed`` (the same network for every set); ``seed`` drives the
    splits, the subsets, the matching and the folds.

    Args:
        real_tiles: ``uint8`` real tiles ``(N, S, S, 3)``, N >= 4, S >= 32.
        real_labels: Class indices of the real tiles ``(N,)``.
        real_groups: Slide of each real tile (N strings).
        synthetic_tiles: ``uint8`` synthetic tiles ``(M, S, S, 3)`` of the same size, M >= 2.
        synthetic_labels: Class indices of the synthetic tiles ``(M,)``.
        classes: Class names the indices point into.
        config: Thresholds and settings (``balance.quality``).
        set_name: Name of the training set, for the report.
        seed: Seed of every random draw.

    Returns:
        The report; ``failures`` names each failed threshold and its params.yaml key.

    Raises:
        DatasetError: If an input does not have the expected shape, type or length, a label is out of range, or
            no class has both real and synthetic tiles.
    """
    real_labels, synthetic_labels, groups = _checked(
        real_tiles, real_labels, real_groups, synthetic_tiles, synthetic_labels, len(classes)
    )

    real_f = tile_features(real_tiles, config.feature_seed)
    synthetic_f = tile_features(synthetic_tiles, config.feature_seed)
    rng = _rng(seed)

    halves, floor_split = _floor_halves(groups, FLOOR_SPLITS, rng)
    matched = _class_matched_size(real_labels, synthetic_labels)
    if matched < 2:
        raise DatasetError(
            f"synthetic labels: expected at least 2 synthetic tiles of classes that also have real tiles, got {matched}"
        )
    subset_size = min(min(min(len(a), len(b)) for a, b in halves), matched)

    floor_values = np.concatenate(
        [_kid_values(real_f[a], real_f[b], config.kid_subsets, subset_size, rng) for a, b in halves]
    )
    kid_floor, kid_floor_std = float(floor_values.mean()), float(floor_values.std())
    kid_values = np.empty(config.kid_subsets)
    for i in range(config.kid_subsets):
        ri, si = _class_matched(real_labels, synthetic_labels, rng)
        pick = rng.choice(len(ri), subset_size, replace=False)
        kid_values[i] = _polynomial_mmd2(real_f[ri[pick]], synthetic_f[si[pick]])
    kid, kid_std = float(kid_values.mean()), float(kid_values.std())
    kid_ratio = kid / max(kid_floor, KID_RATIO_EPS, kid_floor_std)

    ri, si = _class_matched(real_labels, synthetic_labels, rng)
    accuracy = two_sample_accuracy(real_f[ri], synthetic_f[si], _child_seed(rng))

    synthetic_d, synthetic_i, real_d = nearest_real_distances(real_tiles, synthetic_tiles)
    real_nn_quantile = float(np.quantile(real_d, config.memorisation_quantile))
    memorised = synthetic_d < real_nn_quantile

    per_class = _per_class(
        classes, real_labels, synthetic_labels, real_f, synthetic_f, memorised, subset_size, config, rng
    )

    order = np.argsort(synthetic_d, kind="stable")[:CLOSEST_PAIRS]
    closest = [(int(j), int(synthetic_i[j]), float(synthetic_d[j])) for j in order]
    memorised_fraction = float(memorised.mean())
    thresholds = {
        "max_kid_ratio": float(config.max_kid_ratio),
        "max_two_sample_accuracy": float(config.max_two_sample_accuracy),
        "max_memorised_fraction": float(config.max_memorised_fraction),
        "memorisation_quantile": float(config.memorisation_quantile),
    }
    failures = _failures(config, kid, kid_floor, kid_ratio, accuracy, memorised_fraction, real_nn_quantile)
    return QualityReport(
        set_name=set_name,
        n_real=len(real_tiles),
        n_synthetic=len(synthetic_tiles),
        kid=kid,
        kid_std=kid_std,
        kid_floor=kid_floor,
        kid_ratio=float(kid_ratio),
        two_sample_accuracy=accuracy,
        memorised_fraction=memorised_fraction,
        real_nn_quantile=real_nn_quantile,
        per_class=per_class,
        closest_pairs=closest,
        thresholds=thresholds,
        failures=tuple(failures),
        kid_floor_std=kid_floor_std,
        kid_subset_size=subset_size,
        floor_split=floor_split,
    )


def _floor_halves(
    groups: np.ndarray, splits: int, rng: np.random.Generator
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Index pairs of the two halves of each floor split, and ``slides`` or ``random`` (see QualityReport)."""
    names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    halves: list[tuple[np.ndarray, np.ndarray]] = []
    if len(names) >= 2:
        for _ in range(splits):
            side = np.zeros(len(names), dtype=bool)
            filled = [0, 0]
            # Random order, each slide to the emptier half: balanced-ish halves that differ from split to split.
            for g in rng.permutation(len(names)):
                half = int(filled[1] < filled[0])
                side[g] = bool(half)
                filled[half] += int(counts[g])
            in_b = side[inverse]
            if min(filled) >= 2:
                halves.append((np.flatnonzero(~in_b), np.flatnonzero(in_b)))
    if halves:
        return halves, "slides"
    n = len(groups)
    for _ in range(splits):
        order = rng.permutation(n)
        halves.append((np.sort(order[: n // 2]), np.sort(order[n // 2 :])))
    return halves, "random"


def _class_matched_size(real_labels: np.ndarray, synthetic_labels: np.ndarray) -> int:
    classes = np.union1d(real_labels, synthetic_labels)
    return int(sum(min(np.sum(real_labels == c), np.sum(synthetic_labels == c)) for c in classes))


def _class_matched(
    real_labels: np.ndarray, synthetic_labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random real and synthetic indices, aligned so that position j holds the same class on both sides."""
    real_idx: list[np.ndarray] = []
    synthetic_idx: list[np.ndarray] = []
    for c in np.union1d(real_labels, synthetic_labels):
        r, s = np.flatnonzero(real_labels == c), np.flatnonzero(synthetic_labels == c)
        k = min(len(r), len(s))
        real_idx.append(rng.choice(r, k, replace=False))
        synthetic_idx.append(rng.choice(s, k, replace=False))
    return np.concatenate(real_idx), np.concatenate(synthetic_idx)


# ---------------------------------------------------------------------------------------------------- figures


def render_sample_grid(
    real_tiles: np.ndarray,
    real_labels: np.ndarray,
    synthetic_tiles: np.ndarray,
    synthetic_labels: np.ndarray,
    classes: Sequence[str],
    out_png: Path,
    title: str,
    per_class: int = 8,
) -> Path:
    """Real and synthetic tiles side by side: per class a row of real tiles, then a row of synthetic ones.

    Real tiles are picked evenly through each class (tiles are often ordered by slide, so this shows several
    slides); a class with fewer than ``per_class`` real tiles leaves the rest of its row blank. Every synthetic
    cell is filled.

    Args:
        real_tiles: ``uint8`` real tiles ``(N, S, S, 3)``.
        real_labels: Their class indices ``(N,)``.
        synthetic_tiles: ``uint8`` synthetic tiles ``(M, S', S', 3)``.
        synthetic_labels: Their class indices ``(M,)``.
        classes: Class names, one pair of rows each.
        out_png: Where to write the PNG (parent folders are made).
        title: Figure title.
        per_class: Columns: tiles per row.

    Returns:
        ``out_png``.

    Raises:
        DatasetError: If an input does not have the expected shape or length, or a class has fewer than
            ``per_class`` synthetic tiles.
    """
    if per_class < 1:
        raise ValueError(f"per_class: expected >= 1, got {per_class}")
    _check_tiles(real_tiles, "real tiles", min_count=0, min_size=1)
    _check_tiles(synthetic_tiles, "synthetic tiles", min_size=1)
    real_labels = _check_labels(real_labels, len(real_tiles), len(classes), "real labels")
    synthetic_labels = _check_labels(synthetic_labels, len(synthetic_tiles), len(classes), "synthetic labels")
    picks: list[tuple[str, np.ndarray, np.ndarray]] = []
    for c, name in enumerate(classes):
        synthetic_idx = np.flatnonzero(synthetic_labels == c)
        if len(synthetic_idx) < per_class:
            raise DatasetError(
                f"synthetic tiles of class {name!r}: expected at least {per_class} for the grid, got "
                f"{len(synthetic_idx)}"
            )
        real_idx = _evenly(np.flatnonzero(real_labels == c), per_class)
        picks += [(f"{name} real", real_tiles, real_idx), (f"{name} GAN", synthetic_tiles, synthetic_idx[:per_class])]

    fig = _cell_figure(len(picks), per_class, title)
    axes = fig.subplots(len(picks), per_class, squeeze=False)
    for row, (label, tiles, idx) in enumerate(picks):
        for col in range(per_class):
            _show(axes[row][col], tiles[idx[col]] if col < len(idx) else None)
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    return _save(fig, out_png)


def render_closest_pairs(
    report: QualityReport, real_tiles: np.ndarray, synthetic_tiles: np.ndarray, out_png: Path
) -> Path:
    """The report's closest synthetic-real pairs: synthetic tiles on top, their nearest real tiles below.

    Each real tile is drawn in the orientation (of the 8 flips/rotations) that matched its synthetic tile, and
    each column is titled with the pair's RMS pixel distance. The title gives the real-to-real nearest-neighbour
    quantile distance for reference: pairs below it count as near copies.

    Args:
        report: The quality report.
        real_tiles: The real tiles the report was computed on.
        synthetic_tiles: The synthetic tiles the report was computed on.
        out_png: Where to write the PNG (parent folders are made).

    Returns:
        ``out_png``.

    Raises:
        DatasetError: If the tiles are not such arrays or do not hold the report's indices.
    """
    _check_tiles(real_tiles, "real tiles", min_size=1)
    _check_tiles(synthetic_tiles, "synthetic tiles", min_size=1)
    for s, r, _ in report.closest_pairs:
        if not (0 <= s < len(synthetic_tiles) and 0 <= r < len(real_tiles)):
            raise DatasetError(
                f"closest pair ({s}, {r}): expected indices into {len(synthetic_tiles)} synthetic and "
                f"{len(real_tiles)} real tiles (the tiles the report was computed on)"
            )
    cols = max(len(report.closest_pairs), 1)
    quantile = report.thresholds.get("memorisation_quantile", float("nan"))
    title = (
        f"{report.set_name}: closest GAN-real pairs (RMS pixel distance over flips/rotations)\n"
        f"real-to-real nearest-neighbour {quantile:g} quantile: {report.real_nn_quantile:.3f}"
        " (below it a GAN tile counts as a near copy)"
    )
    fig = _cell_figure(2, cols, title, column_titles=True)
    axes = fig.subplots(2, cols, squeeze=False)
    for col in range(cols):
        if col >= len(report.closest_pairs):
            _show(axes[0][col], None)
            _show(axes[1][col], None)
            continue
        s, r, distance = report.closest_pairs[col]
        _show(axes[0][col], synthetic_tiles[s])
        _show(axes[1][col], _matching_orientation(real_tiles[r], synthetic_tiles[s]))
        axes[0][col].set_title(f"d = {distance:.3f}", fontsize=9)
    axes[0][0].set_ylabel("GAN", rotation=0, ha="right", va="center", fontsize=9)
    axes[1][0].set_ylabel("nearest real", rotation=0, ha="right", va="center", fontsize=9)
    return _save(fig, out_png)


def _evenly(indices: np.ndarray, count: int) -> np.ndarray:
    if len(indices) <= count:
        return indices
    return indices[np.linspace(0, len(indices) - 1, count).round().astype(int)]


def _matching_orientation(real: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
    if real.shape != synthetic.shape:
        return real
    oriented = _dihedral(real[None], 0)
    best = np.inf
    for k in range(8):
        candidate = _dihedral(real[None], k)
        distance = float(np.mean((_pixels(candidate) - _pixels(synthetic[None])) ** 2))
        if distance < best:
            best, oriented = distance, candidate
    return oriented[0]


def _cell_figure(rows: int, cols: int, title: str, column_titles: bool = False) -> Figure:
    """A titled figure laid out for a rows x cols grid of tile cells, with room for row labels on the left."""
    # Cells of over an inch at 100 dpi: large enough to see nuclei and stroma.
    top_in = _TITLE_IN + 0.2 * title.count("\n") + (0.25 if column_titles else 0.0)
    bottom_in = 0.1
    width, height = _LABEL_IN + cols * _CELL_IN, top_in + rows * _CELL_IN + bottom_in
    fig = Figure(figsize=(width, height), dpi=_DPI)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    fig.subplots_adjust(
        left=_LABEL_IN / width,
        right=1 - 0.05 / width,
        top=1 - top_in / height,
        bottom=bottom_in / height,
        wspace=0.06,
        hspace=0.25 if column_titles else 0.06,
    )
    return fig


def _show(ax: Any, tile: np.ndarray | None) -> None:
    """Draw a tile (or leave the cell blank) without ticks; the axis stays so that a row label still shows."""
    if tile is not None:
        ax.imshow(tile, interpolation="nearest")
    else:
        for spine in ax.spines.values():
            spine.set_visible(False)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=_DPI)
    return out_png


# ----------------------------------------------------------------------------------------------- validation


def _check_tiles(tiles: np.ndarray, name: str, min_count: int = 1, min_size: int = MIN_TILE_SIZE) -> None:
    expected = f"uint8 tiles of shape (N, S, S, 3) with N >= {min_count} and S >= {min_size}"
    if not isinstance(tiles, np.ndarray) or tiles.dtype != np.uint8:
        raise DatasetError(f"{name}: expected {expected}, got {type(tiles).__name__} of {getattr(tiles, 'dtype', '?')}")
    if tiles.ndim != 4 or tiles.shape[1] != tiles.shape[2] or tiles.shape[3] != 3:
        raise DatasetError(f"{name}: expected {expected}, got shape {tiles.shape}")
    if len(tiles) < min_count or tiles.shape[1] < min_size:
        raise DatasetError(f"{name}: expected {expected}, got shape {tiles.shape}")


def _check_same_size(real: np.ndarray, synthetic: np.ndarray) -> None:
    if real.shape[1:] != synthetic.shape[1:]:
        raise DatasetError(
            f"synthetic tiles: expected the real tiles' size {real.shape[1:]} (resize the real tiles to the GAN's "
            f"size), got {synthetic.shape[1:]}"
        )


def _check_labels(labels: np.ndarray, count: int, num_classes: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (count,) or (count and not np.issubdtype(labels.dtype, np.integer)):
        raise DatasetError(
            f"{name}: expected integer class indices of shape ({count},), got {labels.dtype} {labels.shape}"
        )
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{name}: expected class indices in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _child_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


def _per_class(
    classes: Sequence[str],
    real_labels: np.ndarray,
    synthetic_labels: np.ndarray,
    real_f: np.ndarray,
    synthetic_f: np.ndarray,
    memorised: np.ndarray,
    subset_size: int,
    config: GanQualityConfig,
    rng: np.random.Generator,
) -> dict[str, dict[str, float | None]]:
    """Each class's counts, KID, two-sample accuracy and near-copy share (None where it has too few tiles)."""
    per_class: dict[str, dict[str, float | None]] = {}
    for c, name in enumerate(classes):
        r, s = real_labels == c, synthetic_labels == c
        n_r, n_s = int(r.sum()), int(s.sum())
        class_kid: float | None = None
        if n_r >= MIN_PER_CLASS_KID_REAL and n_s >= MIN_PER_CLASS_KID_SYNTHETIC:
            class_kid = float(_kid_values(real_f[r], synthetic_f[s], config.kid_subsets, subset_size, rng).mean())
        class_accuracy: float | None = None
        if min(n_r, n_s) >= MIN_PER_CLASS_TWO_SAMPLE:
            class_accuracy = two_sample_accuracy(real_f[r], synthetic_f[s], _child_seed(rng))
        per_class[str(name)] = {
            "n_real": n_r,
            "n_synthetic": n_s,
            "kid": class_kid,
            "two_sample_accuracy": class_accuracy,
            "memorised_fraction": float(memorised[s].mean()) if n_s else None,
        }

    return per_class


def _failures(
    config: GanQualityConfig,
    kid: float,
    kid_floor: float,
    kid_ratio: float,
    accuracy: float,
    memorised_fraction: float,
    real_nn_quantile: float,
) -> list[str]:
    """One sentence per threshold the report fails: the figure, the threshold and its params.yaml key."""
    failures: list[str] = []
    if kid_ratio > config.max_kid_ratio:
        failures.append(
            f"KID ratio {kid_ratio:.3g} > balance.quality.max_kid_ratio {config.max_kid_ratio:g}: the synthetic tiles "
            f"are further from the real ones (KID {kid:.3g}) than real tiles of other slides are (floor "
            f"{kid_floor:.3g})"
        )
    if accuracy > config.max_two_sample_accuracy:
        failures.append(
            f"two-sample accuracy {accuracy:.2f} > balance.quality.max_two_sample_accuracy "
            f"{config.max_two_sample_accuracy:g}: a classifier tells the synthetic tiles from real ones"
        )
    if memorised_fraction > config.max_memorised_fraction:
        failures.append(
            f"memorised fraction {memorised_fraction:.2f} > balance.quality.max_memorised_fraction "
            f"{config.max_memorised_fraction:g}: that share of synthetic tiles are near copies of real tiles (nearer "
            f"than the real tiles' {config.memorisation_quantile:g} quantile nearest-neighbour distance "
            f"{real_nn_quantile:.3g})"
        )
    return failures


def _checked(
    real_tiles: np.ndarray,
    real_labels: np.ndarray,
    real_groups: Sequence[str],
    synthetic_tiles: np.ndarray,
    synthetic_labels: np.ndarray,
    n_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate :func:`quality_report`'s inputs; return the labels and groups as arrays."""
    _check_tiles(real_tiles, "real tiles", min_count=4)
    _check_tiles(synthetic_tiles, "synthetic tiles", min_count=2)
    _check_same_size(real_tiles, synthetic_tiles)
    real_labels = _check_labels(real_labels, len(real_tiles), n_classes, "real labels")
    synthetic_labels = _check_labels(synthetic_labels, len(synthetic_tiles), n_classes, "synthetic labels")
    groups = np.asarray([str(g) for g in real_groups])
    if len(groups) != len(real_tiles):
        raise DatasetError(f"real groups: expected one slide per real tile ({len(real_tiles)}), got {len(groups)}")
    return real_labels, synthetic_labels, groups
