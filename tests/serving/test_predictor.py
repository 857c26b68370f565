import io
import json
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, SAMPLE, bundle_metadata
from PIL import Image

from bonetumor.errors import ArtifactError, InvalidImageError
from bonetumor.serving.predictor import Predictor, load_bundle, save_bundle
from bonetumor.training.models import build_model
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import build_eval_transform


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_bundle(build_model("resnet50", 3).eval(), bundle_metadata(), tmp_path / "bundle")


def test_bundle_round_trip_gives_identical_outputs(bundle: Path) -> None:
    torch.manual_seed(0)
    original = build_model("resnet50", 3).eval()
    loaded, meta = load_bundle(bundle)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(original(x), loaded(x))
    assert meta == bundle_metadata()


def test_predictor_uses_the_training_preprocessing_and_the_test_time_views(bundle: Path) -> None:
    predictor = Predictor.from_bundle(bundle, name="m", version="7")
    tile = SAMPLE / "images" / "Viable-Tumor" / "Case-4-C29-29639-16570.jpg"
    answer = predictor.predict_bytes(tile.read_bytes())
    assert answer["label"] in CLASSES
    assert set(answer["probabilities"]) == set(CLASSES)
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["model"] == {"name": "m", "version": "7"}
    # Same numbers as running the network by hand on the shared eval transform and the ten views.
    network, meta = load_bundle(bundle)
    x = build_eval_transform(meta.preprocess)(decode_image(tile))[None]
    views = [x[:, :, t : t + 32, c : c + 32] for t, c in [(4, 4), (0, 0), (0, 8), (8, 0), (8, 8)]]
    with torch.no_grad():
        probs = [torch.softmax(network(v), 1) for crop in views for v in (crop, torch.flip(crop, dims=[3]))]
        expected = torch.stack(probs).mean(0)[0]
    assert [answer["probabilities"][c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-6)


def test_a_format_2_bundle_loads_as_one_view_of_its_image_size(bundle: Path) -> None:
    raw = json.loads((bundle / "metadata.json").read_text())
    for key in ("tile_size", "input_size", "test_crops", "test_flips"):
        del raw[key]
    raw.update(format_version=2, image_size=32)
    (bundle / "metadata.json").write_text(json.dumps(raw))
    _, meta = load_bundle(bundle)
    assert (meta.tile_size, meta.input_size, meta.views.count) == (32, 32, 1)


def test_predictor_accepts_png_and_tiff_and_refuses_junk(bundle: Path) -> None:
    predictor = Predictor.from_bundle(bundle)
    for fmt in ("PNG", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGBA", (50, 50), (200, 100, 150, 255)).save(buffer, format=fmt)
        assert predictor.predict_bytes(buffer.getvalue())["label"] in CLASSES
    with pytest.raises(InvalidImageError, match="not a recognised image"):
        predictor.predict_bytes(b"hello")


def test_bundle_whose_weights_do_not_fit_is_refused(bundle: Path) -> None:
    (bundle / "metadata.json").write_text((bundle / "metadata.json").read_text().replace('"resnet50"', '"vgg19"'))
    with pytest.raises(ArtifactError, match="do not fit a vgg19"):
        load_bundle(bundle)


def test_half_written_bundle_is_refused(bundle: Path) -> None:
    (bundle / "metadata.json").write_text('{"arch": ')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_bundle(bundle)
