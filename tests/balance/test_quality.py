"""The GAN quality report, on generated H&E-like tiles with known answers (no real data)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonetumor.balance.quality import (
    CLOSEST_PAIRS,
    QualityReport,
    feature_network,
    kernel_inception_distance,
    nearest_real_distances,
    quality_report,
    render_closest_pairs,
    render_sample_grid,
    tile_features,
    two_sample_accuracy,
)
from bonetumor.config import GanQualityConfig
from bonetumor.errors import DatasetError

CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
#: Nucleus colour (RGB in [0, 1]) and number of nuclei per class: each class looks different.
NUCLEI = {0: ((0.45, 0.25, 0.60), (3, 6)), 1: ((0.62, 0.42, 0.72), (1, 3)), 2: ((0.30, 0.12, 0.48), (6, 10))}
STROMA = np.array([0.93, 0.62, 0.76])  # eosin pink
SLIDE_SHIFTS = {"slide-a": (0.02, 0.0, -0.01), "slide-b": (-0.02, 0.01, 0.02), "slide-c": (0.0, -0.02, 0.0)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # every test here: tiny models, shared cores


def he_tiles(
    rng: np.random.Generator, n: int, label: int, shift: tuple[float, float, float] = (0.0, 0.0, 0.0), size: int = 32
) -> np.ndarray:
    """Pink stroma with purple round nuclei and noise; ``shift`` is a slide's stain offset."""
    colour, (low, high) = NUCLEI[label]
    yy, xx = np.mgrid[0:size, 0:size]
    tiles = np.empty((n, size, size, 3))
    for i in range(n):
        tile = np.broadcast_to(STROMA, (size, size, 3)).copy()
        for _ in range(rng.integers(low, high + 1)):
            cy, cx = rng.uniform(0, size, 2)
            radius = rng.uniform(size / 16, size / 7)
            tile[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = colour
        tiles[i] = tile + np.asarray(shift) + rng.normal(0.0, 0.04, tile.shape)
    return (np.clip(tiles, 0.0, 1.0) * 255).round().astype(np.uint8)


def he_set(
    rng: np.random.Generator, per_slide_class: int, slides: dict[str, tuple[float, float, float]] = SLIDE_SHIFTS
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Tiles of every class from every slide, with labels and slide names."""
    tiles, labels, groups = [], [], []
    for (slide, shift), label in itertools.product(slides.items(), NUCLEI):
        tiles.append(he_tiles(rng, per_slide_class, label, shift))
        labels += [label] * per_slide_class
        groups += [slide] * per_slide_class
    return np.concatenate(tiles), np.array(labels), groups


def dihedral_copy(tile: np.ndarray, k: int) -> np.ndarray:
    return np.rot90(tile[:, ::-1] if k >= 4 else tile, k % 4)


LOOSE = GanQualityConfig(kid_subsets=5, max_kid_ratio=20.0, max_two_sample_accuracy=0.9, max_memorised_fraction=0.3)


# ----------------------------------------------------------------------------------------------- features


def test_feature_network_is_seeded_and_ignores_the_global_rng() -> None:
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = feature_network(7)
    assert torch.equal(torch.get_rng_state(), state)  # building it draws nothing from the global RNG
    torch.manual_seed(12345)
    torch.rand(100)
    again, other = feature_network(7), feature_network(8)
    for (name, a), (_, b), (_, c) in zip(
        first.state_dict().items(), again.state_dict().items(), other.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
        if name.endswith("weight"):
            assert not torch.equal(a, c), name
    assert not first.training
    assert not any(p.requires_grad for p in first.parameters())


def test_tile_features_are_float64_deterministic_and_of_one_dimension_at_every_size() -> None:
    rng = np.random.default_rng(0)
    small, large = he_tiles(rng, 5, 0, size=32), he_tiles(rng, 3, 0, size=64)
    f_small, f_large = tile_features(small, 0), tile_features(large, 0)
    assert f_small.dtype == np.float64
    assert f_small.shape[0] == 5
    assert f_large.shape[0] == 3
    assert f_small.shape[1] == f_large.shape[1]
    assert 128 <= f_small.shape[1] <= 512
    np.testing.assert_array_equal(tile_features(small, 0), f_small)
    assert not np.allclose(tile_features(small, 1), f_small)


# ---------------------------------------------------------------------------------------------------- KID


def test_kid_matches_the_unbiased_mmd_formula_on_a_worked_example() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(5, 3)), rng.normal(0.5, 1.0, size=(5, 3))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return float((a @ b / 3 + 1) ** 3)

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(5)) / 25
    # Subsets of the whole samples are the samples themselves: every subset gives the same value.
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=50, seed=0)
    assert mean == pytest.approx(xx + yy - 2 * xy)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_colour_shift() -> None:
    rng = np.random.default_rng(1)
    base = tile_features(he_tiles(rng, 100, 0), 0)
    same = tile_features(he_tiles(rng, 100, 0), 0)
    slight = tile_features(he_tiles(rng, 100, 0, shift=(0.05, -0.03, 0.0)), 0)
    strong = tile_features(he_tiles(rng, 100, 0, shift=(0.15, -0.09, 0.0)), 0)
    kid_same, _ = kernel_inception_distance(base, same, subsets=10, subset_size=50, seed=0)
    kid_slight, std_slight = kernel_inception_distance(base, slight, subsets=10, subset_size=50, seed=0)
    kid_strong, _ = kernel_inception_distance(base, strong, subsets=10, subset_size=50, seed=0)
    assert abs(kid_same) < 0.1 * kid_slight
    assert 0 < kid_slight < kid_strong
    assert kernel_inception_distance(base, slight, 10, 50, seed=0) == (kid_slight, std_slight)
    assert kernel_inception_distance(base, slight, 10, 50, seed=1)[0] != kid_slight


def test_kid_needs_two_rows_of_matching_dimension() -> None:
    with pytest.raises(DatasetError, match=r"shape \(N, D\) with N >= 2"):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)), 2, 2, 0)
    with pytest.raises(DatasetError, match="same dimension"):
        kernel_inception_distance(np.zeros((3, 4)), np.zeros((5, 3)), 2, 2, 0)


# ------------------------------------------------------------------------------------- two-sample accuracy


def test_two_sample_accuracy_is_chance_for_one_distribution_and_high_for_different_ones() -> None:
    rng = np.random.default_rng(2)
    real = tile_features(he_tiles(rng, 120, 2), 0)
    same = tile_features(he_tiles(rng, 60, 2), 0)  # unequal sizes: the real side is subsampled to 60
    shifted = tile_features(he_tiles(rng, 60, 2, shift=(0.12, -0.08, 0.05)), 0)
    assert two_sample_accuracy(real, same, seed=0) < 0.7
    assert two_sample_accuracy(real, shifted, seed=0) > 0.9
    assert two_sample_accuracy(real, shifted, seed=0) == two_sample_accuracy(real, shifted, seed=0)


# ---------------------------------------------------------------------------------------------- memorisation


def test_nearest_real_distances_see_through_flips_and_rotations() -> None:
    rng = np.random.default_rng(4)
    real = he_tiles(rng, 12, 1)
    copies = np.stack([dihedral_copy(real[3], 1), dihedral_copy(real[7], 4), dihedral_copy(real[1], 7)])
    synthetic = np.concatenate([copies, he_tiles(rng, 2, 1)])
    distance, index, real_distance = nearest_real_distances(real, synthetic)
    assert distance[:3] == pytest.approx(0.0, abs=1e-3)
    assert list(index[:3]) == [3, 7, 1]
    assert np.all(distance[3:] > 0.03)
    assert real_distance.shape == (12,)
    assert np.all(real_distance > 0.03)

    # Known answer by brute force, in float64.
    def rms(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a / 255.0 - b / 255.0) ** 2)))

    j = 4
    expected = min(rms(synthetic[j], dihedral_copy(r, k)) for r in real for k in range(8))
    assert distance[j] == pytest.approx(expected, abs=1e-4)
    expected_real = min(rms(real[0], dihedral_copy(r, k)) for r in real[1:] for k in range(8))
    assert real_distance[0] == pytest.approx(expected_real, abs=1e-4)


def test_nearest_real_distances_find_a_rotated_duplicate_among_the_real_tiles() -> None:
    rng = np.random.default_rng(5)
    real = he_tiles(rng, 6, 0)
    real[5] = dihedral_copy(real[2], 6)
    _, _, real_distance = nearest_real_distances(real, real[:2])
    assert real_distance[[2, 5]] == pytest.approx(0.0, abs=1e-3)
    assert np.all(np.delete(real_distance, [2, 5]) > 0.03)


# ---------------------------------------------------------------------------------------------------- report


def test_copies_of_real_tiles_are_memorised_and_fail_the_report() -> None:
    rng = np.random.default_rng(6)
    real, labels, groups = he_set(rng, 6)
    picks = rng.choice(len(real), 24, replace=False)
    synthetic = np.stack([dihedral_copy(real[i], int(k)) for i, k in zip(picks, rng.integers(0, 8, 24), strict=True)])
    report = quality_report(real, labels, groups, synthetic, labels[picks], CLASSES, LOOSE, "fold-0", seed=0)
    assert report.memorised_fraction == 1.0
    assert not report.passed
    assert any("balance.quality.max_memorised_fraction" in failure for failure in report.failures)
    assert [pair[1] for pair in report.closest_pairs] == [int(picks[s]) for s, _, _ in report.closest_pairs]
    assert all(d < 1e-3 for _, _, d in report.closest_pairs)
    assert report.metrics()["gan_quality_passed"] == 0.0


def test_independent_samples_of_the_real_distribution_pass(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    real, labels, groups = he_set(rng, 20)
    # An ideal GAN: new tiles of the same slides' look, balanced over classes (8 per slide and class).
    synthetic, synthetic_labels, _ = he_set(rng, 8)
    report = quality_report(real, labels, groups, synthetic, synthetic_labels, CLASSES, LOOSE, "full", seed=0)
    assert report.passed, report.failures
    assert report.floor_split == "slides"
    assert report.n_real == 180
    assert report.n_synthetic == 72
    assert report.two_sample_accuracy < 0.75
    assert report.memorised_fraction < 0.2
    assert set(report.per_class) == set(CLASSES)
    assert report.per_class["Viable-Tumor"]["n_real"] == 60
    assert report.per_class["Viable-Tumor"]["kid"] is not None
    distances = [d for _, _, d in report.closest_pairs]
    assert len(distances) == CLOSEST_PAIRS
    assert distances == sorted(distances)
    assert report.kid_subset_size == 60  # the smaller floor half (one slide) and the 72 matched tiles

    as_dict = json.loads(json.dumps(report.to_dict()))
    assert as_dict["passed"] is True
    assert as_dict["per_class"]["Non-Tumor"]["n_synthetic"] == 24
    metrics = report.metrics()
    assert all(type(value) is float for value in metrics.values())
    assert all(re.fullmatch(r"[A-Za-z0-9_\-./ ]+", name) for name in metrics)
    assert {"gan_kid", "gan_kid_ratio", "gan_kid_Non-Viable-Tumor", "gan_quality_passed"} <= set(metrics)
    assert metrics["gan_quality_passed"] == 1.0

    out = render_closest_pairs(report, real, synthetic, tmp_path / "pairs.png")
    with Image.open(out) as image:
        assert image.width >= CLOSEST_PAIRS * 100
        assert image.height >= 200


def test_a_shifted_gan_fails_the_kid_and_two_sample_thresholds() -> None:
    rng = np.random.default_rng(8)
    real, labels, groups = he_set(rng, 12)
    synthetic, synthetic_labels, _ = he_set(rng, 8, {"gan": (0.15, -0.1, 0.08)})
    report = quality_report(real, labels, groups, synthetic, synthetic_labels, CLASSES, LOOSE, "fold-1", seed=0)
    assert report.kid_ratio > LOOSE.max_kid_ratio
    keys = " ".join(report.failures)
    assert "balance.quality.max_kid_ratio" in keys
    assert "balance.quality.max_two_sample_accuracy" in keys


def test_the_kid_floor_is_slide_disjoint() -> None:
    # Every slide is one tile, lightly noised: near-identical within a slide, different between slides.
    rng = np.random.default_rng(9)
    bases = he_tiles(rng, 8, 0)
    real = np.concatenate([np.clip(b + rng.integers(-3, 4, (6, *b.shape)), 0, 255).astype(np.uint8) for b in bases])
    labels = np.zeros(len(real), dtype=int)
    groups = [f"slide-{i // 6}" for i in range(len(real))]
    synthetic = he_tiles(rng, 24, 0)
    config = GanQualityConfig(kid_subsets=10)
    by_slide = quality_report(real, labels, groups, synthetic, labels[:24], CLASSES, config, "s", seed=0)
    at_random = quality_report(real, labels, ["one"] * len(real), synthetic, labels[:24], CLASSES, config, "r", 0)
    assert (by_slide.floor_split, at_random.floor_split) == ("slides", "random")
    assert by_slide.kid_floor > 0
    assert by_slide.kid_floor > 5 * max(at_random.kid_floor, at_random.kid_floor_std)
    assert by_slide.kid_ratio < at_random.kid_ratio  # the honest floor is the more lenient yardstick


def test_bad_inputs_raise_dataset_errors_naming_the_expected_shape() -> None:
    rng = np.random.default_rng(10)
    real, labels, groups = he_set(rng, 2)
    config = GanQualityConfig()
    with pytest.raises(DatasetError, match=r"real tiles: expected uint8 tiles of shape \(N, S, S, 3\)"):
        quality_report(real[:0], labels[:0], [], real, labels, CLASSES, config, "x", 0)
    with pytest.raises(DatasetError, match=r"real labels: expected integer class indices of shape \(18,\)"):
        quality_report(real, labels[:-1], groups, real, labels, CLASSES, config, "x", 0)
    with pytest.raises(DatasetError, match="one slide per real tile"):
        quality_report(real, labels, groups[:-1], real, labels, CLASSES, config, "x", 0)
    with pytest.raises(DatasetError, match=r"class indices in \[0, 3\)"):
        quality_report(real, labels + 1, groups, real, labels, CLASSES, config, "x", 0)
    with pytest.raises(DatasetError, match="real tiles' size"):
        quality_report(real, labels, groups, he_tiles(rng, 4, 0, size=64), labels[:4], CLASSES, config, "x", 0)
    with pytest.raises(DatasetError, match=r"\(N, S, S, 3\)"):
        tile_features(real.astype(np.float32), 0)
    with pytest.raises(DatasetError, match=r"\(N, S, S, 3\)"):
        tile_features(real[:, :, :, :1], 0)
    with pytest.raises(DatasetError, match=r"N >= 2"):
        nearest_real_distances(real[:1], real)


# --------------------------------------------------------------------------------------------------- figures


def test_the_sample_grid_has_two_rows_per_class_and_a_column_per_tile(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    real, labels, _ = he_set(rng, 2)  # 6 real tiles per class: the real rows stay partly blank at 8 columns
    synthetic, synthetic_labels, _ = he_set(rng, 3)  # 9 per class
    sizes = {}
    for per_class in (4, 8):
        out = render_sample_grid(
            real, labels, synthetic, synthetic_labels, CLASSES, tmp_path / f"grid{per_class}.png", "fold-0", per_class
        )
        with Image.open(out) as image:
            sizes[per_class] = image.size
    (w4, h4), (w8, h8) = sizes[4], sizes[8]
    assert w8 - w4 == pytest.approx(4 * 120, abs=2)  # 1.2 in per column at 100 dpi
    assert h4 == h8 >= 2 * len(CLASSES) * 100  # two rows per class, each at least an inch
    with pytest.raises(DatasetError, match="'Viable-Tumor'"):
        render_sample_grid(real, labels, synthetic[:-1], synthetic_labels[:-1], CLASSES, tmp_path / "x.png", "t", 9)


def test_closest_pairs_must_index_the_given_tiles(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    tiles = he_tiles(rng, 3, 0)
    report = QualityReport(
        set_name="x",
        n_real=3,
        n_synthetic=3,
        kid=0.0,
        kid_std=0.0,
        kid_floor=0.0,
        kid_ratio=0.0,
        two_sample_accuracy=0.5,
        memorised_fraction=0.0,
        real_nn_quantile=0.1,
        per_class={},
        closest_pairs=[(0, 5, 0.1)],
        thresholds={},
        failures=(),
    )
    with pytest.raises(DatasetError, match="expected indices into 3 synthetic and 3 real tiles"):
        render_closest_pairs(report, tiles, tiles, tmp_path / "pairs.png")
