import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES
from PIL import Image
from skimage.color import hed2rgb
from torchvision.transforms import v2

from bonetumor.augment import (
    PREVIEW_CELL_INCHES,
    PREVIEW_DPI,
    AugmentPolicy,
    build_train_transform,
    describe,
    load_policy,
    preview_columns,
    run_augment,
    save_policy,
    train_image_ops,
)
from bonetumor.config import AugmentConfig, Config, PreprocessConfig
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.ingest import ingest
from bonetumor.preprocess import build_eval_transform
from bonetumor.stain import HedJitter, StainNormalizer, fit_stain_normalizer


def he_tile(size: int, h: float, e: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    hed = np.stack([rng.uniform(0, h, (size, size)), rng.uniform(0, e, (size, size)), np.zeros((size, size))], -1)
    return Image.fromarray(np.rint(hed2rgb(hed) * 255).astype(np.uint8), mode="RGB")


def test_policy_artifact_round_trips_and_detects_tampering(tmp_path: Path) -> None:
    policy = AugmentPolicy.from_config(
        AugmentConfig(rotation_degrees=30, zoom_max=1.5, hed_jitter=0.04, stain_normalization="macenko")
    )
    assert (policy.hed_jitter, policy.stain_normalization) == (0.04, "macenko")
    path = save_policy(policy, tmp_path / "policy.json")
    assert load_policy(path) == policy
    assert json.loads(path.read_text())["format_version"] == 2
    document = json.loads(path.read_text())
    document["policy"]["zoom_max"] = 3.0
    path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="digest does not match"):
        load_policy(path)


def test_policy_digest_covers_the_stain_fields() -> None:
    base = AugmentPolicy(rotation_degrees=90, hflip_p=0.5, vflip_p=0.5, zoom_max=1.25)
    assert base.digest() != AugmentPolicy(**{**asdict(base), "hed_jitter": 0.03}).digest()
    assert base.digest() != AugmentPolicy(**{**asdict(base), "stain_normalization": "reinhard"}).digest()
    text = describe(AugmentPolicy(**{**asdict(base), "hed_jitter": 0.03, "stain_normalization": "reinhard"}))
    assert "HED jitter +/-0.03" in text
    assert "stain normalisation reinhard" in text


def test_version_1_policy_is_rejected_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    fields = {"rotation_degrees": 90.0, "hflip_p": 0.5, "vflip_p": 0.5, "zoom_max": 1.25}
    path.write_text(json.dumps({"format_version": 1, "digest": "x", "policy": fields}))
    with pytest.raises(ArtifactError, match=r"format version 1 is out of date.*rerun `bonetumor augment`"):
        load_policy(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"stain_normalization": "vahadane"}, "'stain_normalization' is 'vahadane'"), ({"hed_jitter": ...}, "hed_jitter")],
)
def test_malformed_v2_policy_is_rejected(tmp_path: Path, change: dict, message: str) -> None:
    fields = {**asdict(AugmentPolicy(90, 0.5, 0.5, 1.25, 0.03, "reinhard")), **change}
    fields = {key: value for key, value in fields.items() if value is not ...}
    path = tmp_path / "policy.json"
    digest = AugmentPolicy(**fields).digest() if "hed_jitter" in fields else "x"
    path.write_text(json.dumps({"format_version": 2, "digest": digest, "policy": fields}))
    with pytest.raises(ArtifactError, match=message):
        load_policy(path)


def test_train_transform_is_random_but_shaped_like_the_eval_input() -> None:
    policy = AugmentPolicy(rotation_degrees=90, hflip_p=0.5, vflip_p=0.5, zoom_max=1.5)
    transform = build_train_transform(PreprocessConfig(image_size=48), policy)
    # A tile with an asymmetric pattern: augmented draws must differ from one another.
    image = Image.new("RGB", (96, 96), (255, 255, 255))
    image.paste((200, 30, 60), (0, 0, 60, 30))
    torch.manual_seed(0)
    draws = [transform(image) for _ in range(6)]
    assert all(d.shape == (3, 48, 48) and d.dtype == torch.float32 for d in draws)
    assert any(not torch.allclose(draws[0], d) for d in draws[1:])


def test_identity_policy_equals_plain_preprocessing() -> None:
    from bonetumor.preprocess import build_eval_transform

    policy = AugmentPolicy(rotation_degrees=0, hflip_p=0, vflip_p=0, zoom_max=1.0)
    image = Image.effect_noise((64, 64), 40).convert("RGB")
    config = PreprocessConfig(image_size=32)
    assert torch.allclose(build_train_transform(config, policy)(image), build_eval_transform(config)(image), atol=1e-5)


def test_train_and_eval_normalise_stain_identically_when_augmentation_is_off() -> None:
    stain = fit_stain_normalizer("macenko", [he_tile(48, 0.08, 0.05, seed=2)])
    assert stain is not None
    policy = AugmentPolicy(0, 0, 0, 1.0, hed_jitter=0.0, stain_normalization="macenko")
    config = PreprocessConfig(image_size=32)
    tile = he_tile(48, 0.03, 0.03, seed=1)
    train = build_train_transform(config, policy, stain)(tile)
    assert torch.allclose(train, build_eval_transform(config, stain)(tile), atol=1e-5)
    assert not torch.allclose(train, build_eval_transform(config)(tile), atol=0.1)


def test_train_steps_run_stain_then_geometry_then_hed_jitter() -> None:
    stain = StainNormalizer("reinhard", lab_mean=(60.0, 30.0, -5.0), lab_std=(10.0, 8.0, 4.0))
    policy = AugmentPolicy(90, 0.5, 0.5, 1.25, hed_jitter=0.05, stain_normalization="reinhard")
    steps = [type(step) for step in train_image_ops(policy, 32, stain)]
    assert steps == [
        StainNormalizer,
        v2.RandomRotation,
        v2.RandomHorizontalFlip,
        v2.RandomVerticalFlip,
        v2.RandomResizedCrop,
        HedJitter,
    ]
    with pytest.raises(ConfigError, match="uses 'reinhard' but the augmentation policy says"):
        build_train_transform(PreprocessConfig(image_size=32), AugmentPolicy(90, 0.5, 0.5, 1.25), stain)


def test_hed_jitter_makes_the_train_transform_random_in_colour() -> None:
    # No geometry: only the jitter can make two draws differ.
    policy = AugmentPolicy(0, 0, 0, 1.0, hed_jitter=0.05)
    transform = build_train_transform(PreprocessConfig(image_size=32), policy)
    tile = he_tile(32, 0.05, 0.05, seed=3)
    torch.manual_seed(0)
    draws = [transform(tile) for _ in range(3)]
    assert not torch.allclose(draws[0], draws[1], atol=1e-3)


@pytest.mark.parametrize(
    ("augment", "titles"),
    [
        (
            {"stain_normalization": "reinhard", "hed_jitter": 0.05},
            [
                "original",
                "stain-normalised (reinhard)",
                "HED jitter 1",
                "HED jitter 2",
                "geometric (rot/flip/zoom)",
                "full pipeline 1",
                "full pipeline 2",
            ],
        ),
        (
            {"stain_normalization": "none", "hed_jitter": 0.0},
            ["original", "geometric (rot/flip/zoom)", "full pipeline 1", "full pipeline 2"],
        ),
    ],
)
def test_stage_writes_policy_and_a_preview_column_per_transform(
    sample_images: Path, tmp_path: Path, augment: dict, titles: list[str]
) -> None:
    ingest(sample_images, CLASSES, tmp_path / "manifest.csv")
    config = Config.from_dict({"augment": {"preview_tiles": 3, "preview_samples": 2, **augment}})
    policy = run_augment(config, tmp_path / "manifest.csv", tmp_path / "augment")
    assert load_policy(tmp_path / "augment" / "policy.json") == policy
    stain = (
        StainNormalizer("reinhard", (60.0, 30.0, -5.0), (10.0, 8.0, 4.0))
        if policy.stain_normalization != "none"
        else None
    )
    assert [title for title, _ in preview_columns(policy, 32, 2, stain)] == titles
    with Image.open(tmp_path / "augment" / "preview.png") as preview:
        assert preview.width == round(len(titles) * PREVIEW_CELL_INCHES * PREVIEW_DPI)
        assert preview.height > 3 * PREVIEW_CELL_INCHES * PREVIEW_DPI
