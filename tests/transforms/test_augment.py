import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, plain_policy
from PIL import Image
from skimage.color import hed2rgb
from torchvision.transforms import v2

from bonetumor.config import AugmentConfig, Config, PreprocessConfig
from bonetumor.data.ingest import ingest
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.transforms.augment import (
    PREVIEW_CELL_INCHES,
    PREVIEW_DPI,
    AugmentPolicy,
    RandomRotate90,
    RandomScaledCrop,
    build_train_transform,
    describe,
    load_policy,
    preview_columns,
    run_augment,
    save_policy,
    train_image_ops,
)
from bonetumor.transforms.preprocess import CenterSquareCrop, build_eval_transform, tile_ops
from bonetumor.transforms.stain import HedJitter, StainNormalizer, fit_stain_normalizer


def he_tile(size: int, h: float, e: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    hed = np.stack([rng.uniform(0, h, (size, size)), rng.uniform(0, e, (size, size)), np.zeros((size, size))], -1)
    return Image.fromarray(np.rint(hed2rgb(hed) * 255).astype(np.uint8), mode="RGB")


def prepared(image: Image.Image, config: PreprocessConfig, stain: StainNormalizer | None = None) -> Image.Image:
    """What the training dataset caches for a tile: the shared deterministic tile steps."""
    return v2.Compose(tile_ops(config.tile_size, stain))(image)


def test_policy_artifact_round_trips_and_detects_tampering(tmp_path: Path) -> None:
    policy = AugmentPolicy.from_config(
        AugmentConfig(rotation_degrees=30, zoom_max=1.5, hed_jitter=0.04, stain_normalization="macenko")
    )
    assert (policy.hed_jitter, policy.stain_normalization, policy.rotate90) == (0.04, "macenko", True)
    path = save_policy(policy, tmp_path / "policy.json")
    assert load_policy(path) == policy
    assert json.loads(path.read_text())["format_version"] == 3
    document = json.loads(path.read_text())
    document["policy"]["zoom_max"] = 3.0
    path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="digest does not match"):
        load_policy(path)


def test_policy_digest_covers_every_field() -> None:
    base = plain_policy(hflip_p=0.5)
    for change in (
        {"hed_jitter": 0.03},
        {"stain_normalization": "reinhard"},
        {"rotate90": True},
        {"color_jitter": 0.1},
        {"hue_jitter": 0.05},
    ):
        assert base.digest() != AugmentPolicy(**{**asdict(base), **change}).digest()
    text = describe(AugmentPolicy(**{**asdict(base), "hed_jitter": 0.03, "stain_normalization": "reinhard"}))
    assert "HED jitter +/-0.03" in text
    assert "stain normalisation reinhard" in text
    assert "random crops" in text


@pytest.mark.parametrize("version", [1, 2])
def test_older_policy_versions_are_rejected_with_the_fix(tmp_path: Path, version: int) -> None:
    path = tmp_path / "policy.json"
    fields = {"rotation_degrees": 90.0, "hflip_p": 0.5, "vflip_p": 0.5, "zoom_max": 1.25}
    path.write_text(json.dumps({"format_version": version, "digest": "x", "policy": fields}))
    with pytest.raises(ArtifactError, match=rf"format version {version} is out of date.*rerun `bonetumor augment`"):
        load_policy(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"stain_normalization": "vahadane"}, "'stain_normalization' is 'vahadane'"), ({"rotate90": ...}, "rotate90")],
)
def test_malformed_policy_is_rejected(tmp_path: Path, change: dict, message: str) -> None:
    fields = {**asdict(plain_policy(hed_jitter=0.03, stain_normalization="reinhard")), **change}
    fields = {key: value for key, value in fields.items() if value is not ...}
    path = tmp_path / "policy.json"
    digest = AugmentPolicy(**fields).digest() if "rotate90" in fields else "x"
    path.write_text(json.dumps({"format_version": 3, "digest": digest, "policy": fields}))
    with pytest.raises(ArtifactError, match=message):
        load_policy(path)


def test_train_transform_gives_random_crops_of_the_input_size() -> None:
    config = PreprocessConfig(tile_size=64, input_size=32)
    policy = plain_policy(rotate90=True, hflip_p=0.5, vflip_p=0.5, zoom_max=1.2)
    transform = build_train_transform(config, policy)
    # A tile with an asymmetric pattern: augmented draws must differ from one another.
    image = Image.new("RGB", (96, 96), (255, 255, 255))
    image.paste((200, 30, 60), (0, 0, 60, 30))
    torch.manual_seed(0)
    draws = [transform(prepared(image, config)) for _ in range(6)]
    assert all(d.shape == (3, 32, 32) and d.dtype == torch.float32 for d in draws)
    assert any(not torch.allclose(draws[0], d) for d in draws[1:])


def test_random_scaled_crop_cuts_a_square_of_the_tile_at_a_jittered_scale() -> None:
    tile = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3).astype(np.uint8))
    plain = RandomScaledCrop(16)
    torch.manual_seed(1)
    for _ in range(20):
        crop = np.asarray(plain(tile))
        # Without zoom the crop is an exact 16 px window of the tile (no resampling).
        matches = [
            (top, left)
            for top in range(49)
            for left in range(49)
            if np.array_equal(np.asarray(tile)[top : top + 16, left : left + 16], crop)
        ]
        assert matches
    zoomed = RandomScaledCrop(16, zoom_max=2.0)
    assert all(zoomed(tile).size == (16, 16) for _ in range(20))
    with pytest.raises(ConfigError, match="zoom_max"):
        RandomScaledCrop(16, zoom_max=0.5)


def test_rotate90_is_lossless_and_covers_every_quarter_turn() -> None:
    tile = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    torch.manual_seed(0)
    seen = {np.asarray(RandomRotate90()(tile)).tobytes() for _ in range(40)}
    expected = {np.asarray(tile.rotate(90 * k)).tobytes() for k in range(4)}
    assert seen == expected


def test_identity_policy_gives_the_centre_view_of_the_eval_tile() -> None:
    policy = plain_policy()
    image = Image.effect_noise((64, 64), 40).convert("RGB")
    config = PreprocessConfig(tile_size=32, input_size=32)
    train = build_train_transform(config, policy)(prepared(image, config))
    assert torch.allclose(train, build_eval_transform(config)(image), atol=1e-5)


def test_train_and_eval_normalise_stain_identically_when_augmentation_is_off() -> None:
    stain = fit_stain_normalizer("macenko", [he_tile(48, 0.08, 0.05, seed=2)])
    assert stain is not None
    policy = plain_policy(stain_normalization="macenko")
    config = PreprocessConfig(tile_size=32, input_size=32)
    tile = he_tile(48, 0.03, 0.03, seed=1)
    train = build_train_transform(config, policy, stain)(prepared(tile, config, stain))
    assert torch.allclose(train, build_eval_transform(config, stain)(tile), atol=1e-5)
    assert not torch.allclose(train, build_eval_transform(config)(tile), atol=0.1)


def test_train_steps_run_stain_then_tile_then_crop_geometry_then_colour() -> None:
    stain = StainNormalizer("reinhard", lab_mean=(60.0, 30.0, -5.0), lab_std=(10.0, 8.0, 4.0))
    policy = AugmentPolicy(30, True, 0.5, 0.5, 1.25, hed_jitter=0.05, color_jitter=0.1, stain_normalization="reinhard")
    config = PreprocessConfig(tile_size=64, input_size=32)
    steps = [type(step) for step in train_image_ops(policy, config, stain)]
    assert steps == [
        StainNormalizer,
        CenterSquareCrop,
        v2.Resize,
        v2.RandomRotation,
        RandomScaledCrop,
        v2.RandomHorizontalFlip,
        v2.RandomVerticalFlip,
        RandomRotate90,
        HedJitter,
        v2.ColorJitter,
    ]
    with pytest.raises(ConfigError, match="uses 'reinhard' but the augmentation policy says"):
        build_train_transform(config, plain_policy(), stain)


def test_hed_jitter_makes_the_train_transform_random_in_colour() -> None:
    # No geometry: only the jitter can make two draws differ.
    config = PreprocessConfig(tile_size=32, input_size=32)
    transform = build_train_transform(config, plain_policy(hed_jitter=0.05))
    tile = prepared(he_tile(32, 0.05, 0.05, seed=3), config)
    torch.manual_seed(0)
    draws = [transform(tile) for _ in range(3)]
    assert not torch.allclose(draws[0], draws[1], atol=1e-3)


@pytest.mark.parametrize(
    ("augment", "titles"),
    [
        (
            {"stain_normalization": "reinhard", "hed_jitter": 0.05},
            [
                "tile (64 px)",
                "stain-normalised (reinhard)",
                "HED jitter 1",
                "HED jitter 2",
                "geometric (48 px crop)",
                "training input 1",
                "training input 2",
                "test-time centre crop",
            ],
        ),
        (
            {"stain_normalization": "none", "hed_jitter": 0.0},
            ["tile (64 px)", "geometric (48 px crop)", "training input 1", "training input 2", "test-time centre crop"],
        ),
    ],
)
def test_stage_writes_policy_and_a_preview_column_per_transform(
    sample_images: Path, tmp_path: Path, augment: dict, titles: list[str]
) -> None:
    ingest(sample_images, CLASSES, tmp_path / "manifest.csv")
    config = Config.from_dict(
        {
            "preprocess": {"tile_size": 64, "input_size": 48},
            "augment": {"preview_tiles": 3, "preview_samples": 2, **augment},
        }
    )
    policy = run_augment(config, tmp_path / "manifest.csv", tmp_path / "augment")
    assert load_policy(tmp_path / "augment" / "policy.json") == policy
    stain = (
        StainNormalizer("reinhard", (60.0, 30.0, -5.0), (10.0, 8.0, 4.0))
        if policy.stain_normalization != "none"
        else None
    )
    assert [title for title, _ in preview_columns(policy, config.preprocess, 2, stain)] == titles
    with Image.open(tmp_path / "augment" / "preview.png") as preview:
        assert preview.width == round(len(titles) * PREVIEW_CELL_INCHES * PREVIEW_DPI)
        assert preview.height > 3 * PREVIEW_CELL_INCHES * PREVIEW_DPI
