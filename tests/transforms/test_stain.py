import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import hed2rgb, rgb2lab, rgb_from_hed

from bonetumor.config import PreprocessConfig
from bonetumor.errors import ArtifactError, ConfigError, DatasetError
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.stain import (
    HedJitter,
    StainNormalizer,
    fit_from_files,
    fit_stain_normalizer,
    load_stain_normalizer,
    save_stain_normalizer,
)

#: skimage's hed2rgb works in optical density divided by ln(1e6); multiply to get optical density.
OD_PER_HED_UNIT = math.log(1e6)


def he_tile(size: int, h: float, e: float, seed: int, glass_rows: int = 0, glass: int = 255) -> Image.Image:
    """A synthetic H&E tile: independent uniform haematoxylin and eosin amounts, the top rows empty glass."""
    rng = np.random.default_rng(seed)
    hed = np.zeros((size, size, 3))
    hed[..., 0] = rng.uniform(0, h, (size, size))
    hed[..., 1] = rng.uniform(0, e, (size, size))
    rgb = np.rint(hed2rgb(hed) * 255).astype(np.uint8)
    rgb[:glass_rows] = glass
    return Image.fromarray(rgb, mode="RGB")


def tissue_mean(image: np.ndarray, glass_rows: int) -> np.ndarray:
    return image[glass_rows:].reshape(-1, 3).mean(axis=0)


def noisy_tile(colour: tuple[int, int, int], noise: float, seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, dtype=float) + rng.normal(0, noise, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), mode="RGB")


def lab_stats(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb2lab(np.asarray(image)).reshape(-1, 3)
    return lab.mean(axis=0), lab.std(axis=0)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


# --- HED jitter -----------------------------------------------------------------------------------------------


def test_hed_jitter_changes_stain_colours_but_keeps_glass_near_white() -> None:
    tile = he_tile(32, 0.05, 0.05, seed=1, glass_rows=8)
    jitter = HedJitter(0.05)
    torch.manual_seed(3)
    draws = [pixels(jitter(tile)) for _ in range(4)]
    original = pixels(tile)
    assert all(np.abs(d[8:] - original[8:]).mean() > 1.0 for d in draws)
    assert any(np.abs(d - draws[0]).mean() > 1.0 for d in draws[1:])
    # Glass has no stain; only the shift reaches it: at most 2.3 * 0.05 optical density, i.e. >= ~228.
    assert all(d[:8].min() >= 225 for d in draws)


def test_hed_jitter_repeats_under_torch_seed_and_strength_zero_is_identity() -> None:
    tile = he_tile(24, 0.05, 0.04, seed=2)
    jitter = HedJitter(0.1)
    torch.manual_seed(7)
    first = [pixels(jitter(tile)) for _ in range(2)]
    torch.manual_seed(7)
    second = [pixels(jitter(tile)) for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1])
    assert np.array_equal(pixels(HedJitter(0.0)(tile)), pixels(tile))


def test_hed_jitter_rejects_a_bad_strength() -> None:
    with pytest.raises(ConfigError, match="hed_jitter"):
        HedJitter(-0.1)
    with pytest.raises(ConfigError, match="hed_jitter"):
        HedJitter(1.5)


# --- Reinhard --------------------------------------------------------------------------------------------------


def test_reinhard_target_is_pooled_mean_and_within_tile_spread() -> None:
    tiles = [noisy_tile((230, 170, 200), 10, seed=1), noisy_tile((120, 50, 150), 14, seed=2)]
    stats = [lab_stats(t) for t in tiles]
    normaliser = fit_stain_normalizer("reinhard", tiles)
    assert isinstance(normaliser, StainNormalizer)
    # Equal-sized, all-tissue tiles: the pooled mean is the mean of the tile means, and the spread is the root
    # mean within-tile variance, not the (larger) spread of all pixels together.
    assert np.allclose(normaliser.lab_mean, np.mean([m for m, _ in stats], axis=0), atol=0.05)
    assert np.allclose(normaliser.lab_std, np.sqrt(np.mean([s**2 for _, s in stats], axis=0)), atol=0.05)
    pooled_std = rgb2lab(np.concatenate([np.asarray(t) for t in tiles])).reshape(-1, 3).std(axis=0)
    assert np.all(np.asarray(normaliser.lab_std) < pooled_std - 1.0)


def test_reinhard_moves_a_tiles_lab_statistics_to_the_target() -> None:
    target = noisy_tile((190, 100, 165), 12, seed=3, size=48)
    source = noisy_tile((215, 150, 200), 8, seed=4, size=48)
    normaliser = fit_stain_normalizer("reinhard", [target])
    assert normaliser is not None
    out_mean, out_std = lab_stats(normaliser(source))
    src_mean, _ = lab_stats(source)
    assert np.linalg.norm(src_mean - np.asarray(normaliser.lab_mean)) > 10
    assert np.allclose(out_mean, normaliser.lab_mean, atol=1.0)
    assert np.allclose(out_std, normaliser.lab_std, rtol=0.1)


def test_reinhard_leaves_glass_unchanged_and_blank_tiles_alone() -> None:
    normaliser = fit_stain_normalizer("reinhard", [noisy_tile((190, 100, 165), 12, seed=3)])
    assert normaliser is not None
    tile = np.asarray(noisy_tile((215, 150, 200), 8, seed=4)).copy()
    tile[:10] = 250  # glass
    out = pixels(normaliser(Image.fromarray(tile)))
    assert np.array_equal(out[:10], tile[:10].astype(int))
    assert np.abs(out[12:] - tile[12:]).mean() > 5
    blank = Image.new("RGB", (32, 32), (245, 245, 245))
    assert normaliser(blank) is blank  # too little tissue to estimate a stain: returned as is


def test_fit_on_blank_tiles_or_no_tiles_is_a_clear_error() -> None:
    blank = Image.new("RGB", (32, 32), (250, 250, 250))
    for method in ("reinhard", "macenko"):
        with pytest.raises(DatasetError, match="tissue pixels"):
            fit_stain_normalizer(method, [blank, blank])
        with pytest.raises(DatasetError, match="no tiles"):
            fit_stain_normalizer(method, [])
    assert fit_stain_normalizer("none", [blank]) is None
    with pytest.raises(ConfigError, match="stain_normalization='vahadane'"):
        fit_stain_normalizer("vahadane", [blank])


# --- Macenko ---------------------------------------------------------------------------------------------------


def test_macenko_recovers_the_stains_and_maps_a_tile_to_the_target() -> None:
    target = he_tile(48, 0.08, 0.05, seed=2, glass_rows=12)
    # Scanned glass is rarely pure white: a light grey must stay light, not be re-rendered as stain.
    source = he_tile(48, 0.03, 0.03, seed=1, glass_rows=12, glass=240)
    normaliser = fit_stain_normalizer("macenko", [target])
    assert normaliser is not None
    truth = rgb_from_hed[:2] / np.linalg.norm(rgb_from_hed[:2], axis=1, keepdims=True)
    fitted = np.asarray(normaliser.stain_matrix).reshape(2, 3)
    assert np.all(np.sum(fitted * truth, axis=1) > 0.995)  # haematoxylin first, then eosin
    # 99th percentile of U(0, c) amounts, in optical density.
    assert np.allclose(
        normaliser.max_concentrations, [0.99 * 0.08 * OD_PER_HED_UNIT, 0.99 * 0.05 * OD_PER_HED_UNIT], rtol=0.05
    )
    out = pixels(normaliser(source))
    before = np.abs(tissue_mean(pixels(source), 12) - tissue_mean(pixels(target), 12)).max()
    after = np.abs(tissue_mean(out, 12) - tissue_mean(pixels(target), 12)).max()
    assert before > 20
    assert after < 3
    assert out[:12].min() >= 232  # glass stays near-white
    white = pixels(normaliser(he_tile(48, 0.03, 0.03, seed=1, glass_rows=12)))
    assert white[:12].min() == 255


def test_macenko_needs_two_stains_and_skips_tiles_without_tissue() -> None:
    eosin_only = he_tile(32, 0.0, 0.06, seed=3)
    with pytest.raises(DatasetError, match="single stain"):
        fit_stain_normalizer("macenko", [eosin_only])
    normaliser = fit_stain_normalizer("macenko", [he_tile(32, 0.06, 0.05, seed=4)])
    assert normaliser is not None
    blank = Image.new("RGB", (32, 32), (250, 250, 250))
    assert normaliser(blank) is blank
    assert normaliser(eosin_only) is eosin_only


def test_fit_from_files_decodes_a_seeded_subsample(tmp_path: Path) -> None:
    files = []
    for i, (h, e) in enumerate([(0.02, 0.02), (0.05, 0.03), (0.08, 0.06), (0.04, 0.07)]):
        he_tile(24, h, e, seed=i).save(tmp_path / f"t{i}.png")
        files.append(tmp_path / f"t{i}.png")
    first = fit_from_files("macenko", files, max_tiles=2, seed=5)
    assert first == fit_from_files("macenko", files, max_tiles=2, seed=5)
    assert first != fit_from_files("macenko", files, max_tiles=4, seed=5)
    assert fit_from_files("none", [tmp_path / "missing.png"]) is None  # nothing is read
    with pytest.raises(ConfigError, match="max_tiles"):
        fit_from_files("reinhard", files, max_tiles=0)


# --- Artifact round trip ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_normaliser_round_trips_through_json_and_pickle(method: str, tmp_path: Path) -> None:
    normaliser = fit_stain_normalizer(method, [he_tile(32, 0.06, 0.05, seed=6)])
    assert normaliser is not None
    data = normaliser.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert StainNormalizer.from_dict(data) == normaliser
    path = save_stain_normalizer(normaliser, tmp_path / "stain.json")
    assert load_stain_normalizer(path) == normaliser
    # DataLoader workers get a pickled copy (bytes made right here, so S301 does not apply).
    assert pickle.loads(pickle.dumps(normaliser)) == normaliser  # noqa: S301
    tile = he_tile(32, 0.03, 0.04, seed=7)
    assert np.array_equal(pixels(load_stain_normalizer(path)(tile)), pixels(normaliser(tile)))


REINHARD = {"format_version": 1, "method": "reinhard", "lab_mean": [60.0, 30.0, -5.0], "lab_std": [10.0, 8.0, 4.0]}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"lab_std": [10.0, 8.0]}, ArtifactError, "'lab_std': expected a list of 3"),
        ({"lab_std": [10.0, 0.0, 4.0]}, ArtifactError, "'lab_std': expected numbers > 0"),
        ({"lab_mean": [60.0, "a", -5.0]}, ArtifactError, "'lab_mean': expected finite numbers"),
        ({"lab_mean": None}, ArtifactError, "'lab_mean': expected a list"),
        ({"method": "vahadane"}, ConfigError, "'method'"),
        ({"format_version": 9}, ArtifactError, "'format_version'"),
        ({"stain_matrix": [1.0] * 6}, ArtifactError, r"unknown field\(s\) \['stain_matrix'\]"),
        ({"lab_mean": ...}, ArtifactError, r"missing field\(s\) \['lab_mean'\]"),
    ],
)
def test_malformed_normaliser_dicts_name_the_field(change: dict, error: type[Exception], message: str) -> None:
    data = {**REINHARD, **change}
    data = {key: value for key, value in data.items() if value is not ...}
    with pytest.raises(error, match=message) as caught:
        StainNormalizer.from_dict(data, source="model.json")
    assert "model.json" in str(caught.value)


def test_a_normaliser_file_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "stain.json"
    path.write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="expected a mapping"):
        load_stain_normalizer(path)


# --- The shared evaluation transform ---------------------------------------------------------------------------


def test_eval_transform_applies_the_normaliser_before_the_shared_tail() -> None:
    config = PreprocessConfig(tile_size=32, input_size=32)
    normaliser = fit_stain_normalizer("macenko", [he_tile(48, 0.08, 0.05, seed=2)])
    assert normaliser is not None
    tile = he_tile(48, 0.03, 0.03, seed=1)
    plain, stained = build_eval_transform(config), build_eval_transform(config, normaliser)
    assert torch.equal(build_eval_transform(config, None)(tile), plain(tile))
    assert torch.allclose(stained(tile), plain(normaliser(tile)))
    assert not torch.allclose(stained(tile), plain(tile), atol=0.1)
    assert stained(tile).shape == (3, 32, 32)
