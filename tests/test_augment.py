import json
from pathlib import Path

import pytest
import torch
from conftest import CLASSES
from PIL import Image

from bonetumor.augment import AugmentPolicy, build_train_transform, load_policy, run_augment, save_policy
from bonetumor.config import AugmentConfig, Config, PreprocessConfig
from bonetumor.errors import ArtifactError
from bonetumor.ingest import ingest


def test_policy_artifact_round_trips_and_detects_tampering(tmp_path: Path) -> None:
    policy = AugmentPolicy.from_config(AugmentConfig(rotation_degrees=30, zoom_max=1.5))
    path = save_policy(policy, tmp_path / "policy.json")
    assert load_policy(path) == policy
    document = json.loads(path.read_text())
    document["policy"]["zoom_max"] = 3.0
    path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="digest does not match"):
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


def test_stage_writes_policy_and_preview(sample_images: Path, tmp_path: Path) -> None:
    ingest(sample_images, CLASSES, tmp_path / "manifest.csv")
    config = Config.from_dict({"augment": {"preview_tiles": 3, "preview_samples": 2}})
    policy = run_augment(config, tmp_path / "manifest.csv", tmp_path / "augment")
    assert load_policy(tmp_path / "augment" / "policy.json") == policy
    with Image.open(tmp_path / "augment" / "preview.png") as preview:
        assert preview.width > 200
        assert preview.height > 200
