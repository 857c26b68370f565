"""Drift monitoring on the real sample tiles: features, reference, the tests and the report.

A randomly initialised ResNet18 (3 classes, the project's 64 px tiles seen as 48 px crops) stands in for the
trained model: its embeddings still respond to colour and blur. The reference is built on 20 of the 30 sample
tiles; the served records come from the other 10 (each also mirrored and turned, so there are 40).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from conftest import CLASSES, SAMPLE
from PIL import Image, ImageFilter
from skimage.color import hed_from_rgb, rgb_from_hed

from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.monitoring.drift import (
    REPORT_FILES,
    DriftThresholds,
    detect_drift,
    holm,
    mmd_test,
    psi,
    write_drift_report,
)
from bonetumor.monitoring.features import (
    STATISTICS,
    EmbeddingExtractor,
    centre_view,
    embed_images,
    predict_and_embed,
    tile_statistics,
)
from bonetumor.monitoring.reference import (
    DriftReference,
    build_reference,
    features_from_embeddings,
    reference_paths,
    served_features,
)
from bonetumor.serving.predictor import ModelMetadata, Predictor
from bonetumor.training.models import build_model
from bonetumor.transforms.stain import rgb_to_od


def _metadata(crops: int = 1, flips: bool = False) -> ModelMetadata:
    return ModelMetadata(
        arch="resnet18",
        classes=CLASSES,
        tile_size=64,
        input_size=48,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        dropout=0.0,
        test_crops=crops,
        test_flips=flips,
    )


def _tiles() -> list[Image.Image]:
    files = sorted((SAMPLE / "images").glob("*/*.jpg"))
    assert len(files) == 30
    return [Image.open(path).convert("RGB") for path in files]


def _views(image: Image.Image) -> list[Image.Image]:
    """The tile, mirrored, and turned both ways: more served records, the same tissue."""
    transpose = Image.Transpose
    return [
        image,
        *(image.transpose(t) for t in (transpose.FLIP_LEFT_RIGHT, transpose.ROTATE_90, transpose.ROTATE_270)),
    ]


def stain_shift(image: Image.Image, haematoxylin: float = 0.3, eosin: float = 0.6) -> Image.Image:
    """Another lab's staining: more haematoxylin, less eosin in the tissue (glass stays white)."""
    od = rgb_to_od(np.asarray(image))
    tissue = np.clip((od.max(axis=-1) - 0.05) / 0.10, 0.0, 1.0)
    stains = od @ hed_from_rgb.astype(np.float32)
    stains[..., 0] += haematoxylin * tissue
    stains[..., 1] *= 1.0 + (eosin - 1.0) * tissue
    rgb = np.clip(np.rint(256.0 * np.exp(-(stains @ rgb_from_hed.astype(np.float32))) - 1.0), 0, 255)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


class Setup:
    """The predictor, the reference and the held-out tiles shared by the module's tests."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.predictor = Predictor(torchvision.models.resnet18(num_classes=3), _metadata(), version="7")
        tiles = _tiles()
        # Every third tile (3 or 4 of each class) is served, the other 20 make the reference.
        self.reference_tiles = [t for i, t in enumerate(tiles) if i % 3 != 2]
        self.served_tiles = [t for i, t in enumerate(tiles) if i % 3 == 2]
        answers = self.predictor.predict_images(self.reference_tiles)
        labels = [a["label"] for a in answers]
        self.reference = build_reference(
            self.predictor,
            self.reference_tiles,
            label_rates={c: labels.count(c) / len(labels) for c in CLASSES},
            referral_rate=0.2,
        )

    def records(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Prediction-log records of serving ``images`` (the answer and its drift features)."""
        answers, embeddings = predict_and_embed(self.predictor, images)
        features = features_from_embeddings(self.reference, images, embeddings)
        return [
            {
                "request_id": f"r{i}",
                "label": answer["label"],
                "referral": {"refer": i % 5 == 0, "reason": ""},  # 20 %, as the reference expects
                "model": {"name": "bonetumor", "version": "7"},
                **feature,
            }
            for i, (answer, feature) in enumerate(zip(answers, features, strict=True))
        ]

    def served(self, change: Any = None) -> list[Image.Image]:
        views = [view for tile in self.served_tiles for view in _views(tile)]
        return [change(view) for view in views] if change else views


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Setup()
    finally:
        torch.set_num_threads(threads)


# --- features ---------------------------------------------------------------------------------------------------


def test_tile_statistics_are_named_ordered_and_see_stain_blur_and_glass() -> None:
    tile = _tiles()[3]
    stats = tile_statistics(tile)
    assert tuple(stats) == STATISTICS
    assert all(math.isfinite(v) for v in stats.values())
    assert 0 <= stats["tissue_fraction"] <= 1
    assert 0 <= stats["saturation"] <= 1
    blurred = tile_statistics(tile.filter(ImageFilter.GaussianBlur(3)))
    assert blurred["sharpness"] < stats["sharpness"] - 2
    assert abs(blurred["red_mean"] - stats["red_mean"]) < 0.01  # blur keeps the colours
    shifted = tile_statistics(stain_shift(tile))
    assert shifted["haematoxylin_od"] > stats["haematoxylin_od"] + 0.2
    assert shifted["eosin_od"] < stats["eosin_od"]
    glass = tile_statistics(Image.new("RGB", (256, 256), (250, 250, 250)))
    assert glass["tissue_fraction"] == 0
    assert glass["haematoxylin_od"] == 0
    assert glass["eosin_od"] == 0
    assert glass["sharpness"] == 0
    assert glass["red_std"] == pytest.approx(0, abs=1e-6)


def test_tile_statistics_of_a_large_tile_match_its_reduced_copy() -> None:
    tile = _tiles()[5]
    large = tile.resize((1024, 1024), Image.Resampling.NEAREST)
    assert tile_statistics(large) == pytest.approx(tile_statistics(large.reduce(4)))
    with pytest.raises(TypeError, match="PIL image"):
        tile_statistics(np.zeros((8, 8, 3)))  # type: ignore[arg-type]


@pytest.mark.parametrize(("arch", "dim"), [("resnet50", 2048), ("vgg19_bn", 512)])
def test_embedding_is_the_input_of_the_last_linear_layer(one_torch_thread: None, arch: str, dim: int) -> None:
    model = build_model(arch, 3, dropout=0.5)  # in training mode: embed must switch dropout off
    pooled: list[torch.Tensor] = []
    handle = model.get_submodule("avgpool").register_forward_hook(
        lambda _m, _i, out: pooled.append(torch.flatten(out, 1))
    )
    batch = torch.randn(2, 3, 32, 32)
    with EmbeddingExtractor(model) as extractor:
        embeddings = extractor.embed(batch)
        assert extractor.dim == dim
    handle.remove()
    assert embeddings.shape == (2, dim)
    np.testing.assert_allclose(embeddings, pooled[0].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert model.training  # restored
    assert not extractor.layer._forward_pre_hooks  # the hook is gone


def test_embedding_rows_match_with_test_time_views(one_torch_thread: None) -> None:
    torch.manual_seed(1)
    predictor = Predictor(torchvision.models.resnet18(num_classes=3), _metadata(crops=5, flips=True))
    tiles = _tiles()[:3]
    answers, captured = predict_and_embed(predictor, tiles)
    assert [a["label"] for a in answers] == [a["label"] for a in predictor.predict_images(tiles)]
    np.testing.assert_allclose(captured, embed_images(predictor, tiles), rtol=1e-4, atol=1e-5)
    assert embed_images(predictor, []).shape == (0, 512)


def test_one_extractor_serves_many_calls_and_ignores_other_threads(one_torch_thread: None) -> None:
    torch.manual_seed(2)
    predictor = Predictor(torchvision.models.resnet18(num_classes=3), _metadata(crops=5, flips=True))
    tiles = _tiles()[:2]
    batch = torch.stack([centre_view(predictor, tile) for tile in tiles])
    with EmbeddingExtractor(predictor.model) as extractor:
        first = embed_images(predictor, tiles, extractor)
        _, during = predict_and_embed(predictor, tiles, extractor)
        np.testing.assert_allclose(during, first, rtol=1e-4, atol=1e-5)

        def elsewhere() -> None:  # a forward pass in another thread while this one is capturing
            worker = threading.Thread(target=lambda: extractor.model(batch))
            worker.start()
            worker.join()

        with pytest.raises(ConfigError, match="was not called"):
            extractor.during(elsewhere)
    assert not extractor.layer._forward_pre_hooks


def test_a_model_without_a_linear_layer_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"no nn\.Linear"):
        EmbeddingExtractor(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)))


# --- reference and served features ------------------------------------------------------------------------------


def test_reference_shapes_and_served_features(setup: Setup) -> None:
    ref = setup.reference
    assert ref.n_tiles == 20
    assert ref.statistics.shape == (20, len(STATISTICS))
    assert ref.components == 8
    assert ref.pca_components.shape == (8, 512)
    assert ref.embeddings.shape == (20, 8)
    np.testing.assert_allclose(ref.pca_components @ ref.pca_components.T, np.eye(8), atol=1e-8)
    assert ref.version == "7"
    assert ref.referral_rate == 0.2
    assert ref.label_rates is not None
    assert sum(ref.label_rates.values()) == pytest.approx(1.0)
    assert not ref.statistics.flags.writeable
    logged = served_features(setup.predictor, ref, setup.served_tiles[0])
    assert set(logged) == {"stats", "embedding"}
    assert tuple(logged["stats"]) == STATISTICS
    assert len(logged["embedding"]) == 8
    assert all(v == round(v, 5) for v in logged["embedding"])
    assert len(json.dumps(logged)) < 700  # small enough for every log line
    expected = ref.project(embed_images(setup.predictor, setup.served_tiles[:1]))[0]
    np.testing.assert_allclose(logged["embedding"], expected, atol=1e-5)


def test_a_reference_of_another_model_is_refused(setup: Setup) -> None:
    other = replace(setup.reference, pca_mean=np.zeros(7), pca_components=np.ones((8, 7)))
    with pytest.raises(ArtifactError, match="length 7"):
        served_features(setup.predictor, other, setup.served_tiles[0])
    with pytest.raises(ConfigError, match="at least 2"):
        build_reference(setup.predictor, setup.reference_tiles[:1])
    with pytest.raises(ConfigError, match="Unknown-Class"):
        build_reference(setup.predictor, setup.reference_tiles[:2], label_rates={"Unknown-Class": 1.0})


def test_reference_round_trip(setup: Setup, tmp_path: Path) -> None:
    npz = setup.reference.save(tmp_path / "ref" / "drift_reference")
    assert npz.name == "drift_reference.npz"
    assert reference_paths(npz)[1].is_file()
    for given in (npz, npz.with_suffix(".json")):
        loaded = DriftReference.load(given)
        for name in ("statistics", "pca_mean", "pca_components", "embeddings"):
            np.testing.assert_array_equal(getattr(loaded, name), getattr(setup.reference, name))
        assert loaded.label_rates == setup.reference.label_rates
        assert (loaded.version, loaded.created_at) == (setup.reference.version, setup.reference.created_at)
    # The archive holds plain arrays only: it opens without pickle.
    with np.load(npz, allow_pickle=False) as archive:
        assert sorted(archive.files) == ["embeddings", "pca_components", "pca_mean", "statistics"]


def test_a_damaged_or_missing_reference_gives_a_clear_error(setup: Setup, tmp_path: Path) -> None:
    npz = setup.reference.save(tmp_path / "drift_reference.npz")
    meta = npz.with_suffix(".json")
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"drift_reference\.npz: SHA-256 does not match"):
        DriftReference.load(npz)
    # Damaged in a way the recorded hash does not catch (the JSON rewritten to match): numpy's own failure.
    record = json.loads(meta.read_text())
    from bonetumor.utils import sha256_file

    meta.write_text(json.dumps({**record, "sha256": sha256_file(npz)}))
    with pytest.raises(ArtifactError, match="not a readable numpy archive"):
        DriftReference.load(npz)
    meta.write_text("{not json")
    with pytest.raises(ArtifactError, match=r"drift_reference\.json is not valid JSON"):
        DriftReference.load(npz)
    meta.unlink()
    with pytest.raises(ArtifactError, match=r"metadata not found at .*drift_reference\.json"):
        DriftReference.load(npz)
    setup.reference.save(npz)
    npz.unlink()
    with pytest.raises(ArtifactError, match=r"arrays not found at .*drift_reference\.npz"):
        DriftReference.load(npz)


# --- detection --------------------------------------------------------------------------------------------------


def test_unshifted_tiles_do_not_drift(setup: Setup) -> None:
    records = setup.records(setup.served())
    report = detect_drift(setup.reference, records, DriftThresholds())
    assert report.status == "ok", report.reasons
    assert not report.drifted
    assert report.exit_code == 0
    assert report.n_served == 40
    kinds = [check.kind for check in report.checks]
    assert kinds.count("statistic") == len(STATISTICS)
    rows = [check for check in report.checks if check.kind == "statistic"]
    # The KS p-values are adjusted for the 12 statistics tested together (Holm).
    assert [row.adjusted_p for row in rows] == pytest.approx(holm([row.p_value or 0.0 for row in rows]))
    assert {"embedding", "label", "referral"} <= set(kinds)
    c2st = next(check for check in report.checks if check.name == "embedding (C2ST)")
    assert 0 <= c2st.value <= 1
    assert not c2st.flagged


def test_a_stain_shift_drifts_and_names_the_stain(setup: Setup) -> None:
    report = detect_drift(setup.reference, setup.records(setup.served(stain_shift)))
    assert report.status == "drift"
    assert report.drifted
    assert report.exit_code == 1
    assert "haematoxylin_od" in report.flagged
    assert "sharpness" not in report.flagged
    assert "tissue_fraction" not in report.flagged
    assert any(reason.startswith("haematoxylin_od: served mean") for reason in report.reasons)
    row = next(check for check in report.checks if check.name == "haematoxylin_od")
    assert row.adjusted_p is not None
    assert row.adjusted_p < 0.01
    assert row.effect is not None
    assert row.effect > 0.25


def test_blur_drifts_through_sharpness(setup: Setup) -> None:
    report = detect_drift(setup.reference, setup.records(setup.served(lambda v: v.filter(ImageFilter.GaussianBlur(3)))))
    assert report.status == "drift"
    assert "sharpness" in report.flagged
    assert not {"red_mean", "green_mean", "blue_mean", "haematoxylin_od", "eosin_od"} & set(report.flagged)


def test_too_few_records_is_insufficient_not_drift(setup: Setup) -> None:
    records = setup.records(setup.served(stain_shift)[:10])
    report = detect_drift(setup.reference, [*records, {"request_id": "e", "error": "not an image"}])
    assert report.status == "insufficient"
    assert not report.drifted
    assert report.exit_code == 2
    assert report.checks == ()
    assert report.n_served == 10
    assert report.skipped == {"no features": 1}
    assert report.reasons[0].startswith("not enough data: 10 served records")
    # Records of another model version do not count either.
    other = [{**r, "model": {"version": "8"}} for r in setup.records(setup.served())]
    assert detect_drift(setup.reference, other).skipped == {"other model version": 40}


def test_changed_answer_rates_drift(setup: Setup) -> None:
    records = setup.records(setup.served())
    referred = [{**r, "referral": {"refer": True, "reason": "low confidence"}} for r in records]
    report = detect_drift(setup.reference, referred)
    assert report.flagged == ["referral"]
    assert report.status == "drift"
    assert "referral rate: served 100.0% vs reference 20.0%" in report.reasons[0]
    rare = min(CLASSES, key=lambda c: setup.reference.label_rates[c])  # type: ignore[index]
    relabelled = [{**r, "label": rare} for r in records]
    assert "labels" in detect_drift(setup.reference, relabelled).flagged


def test_malformed_records_are_refused(setup: Setup) -> None:
    record = setup.records(setup.served_tiles[:1])[0]
    with pytest.raises(ArtifactError, match=r"record 0 .*'stats' with"):
        detect_drift(setup.reference, [{**record, "stats": {"red_mean": 0.5}}])
    with pytest.raises(ArtifactError, match=r"3 values .* another reference"):
        detect_drift(setup.reference, [{**record, "embedding": [0.1, 0.2, 0.3]}])
    with pytest.raises(ArtifactError, match="not classes of the drift reference"):
        detect_drift(setup.reference, [{**record, "label": "Cartilage"}] * 20)


# --- the statistics themselves ----------------------------------------------------------------------------------


def test_holm_psi_and_mmd() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    rng = np.random.default_rng(0)
    ref = rng.normal(size=500)
    assert psi(ref, rng.normal(size=500)) < 0.05
    assert psi(ref, rng.normal(1.0, size=500)) > 0.25
    assert psi(np.ones(50), np.ones(30)) < 0.01  # tied reference values: the bins merge
    x = rng.normal(size=(40, 4))
    same = mmd_test(x, rng.normal(size=(40, 4)), permutations=200)
    moved = mmd_test(x, rng.normal(0.8, size=(40, 4)), permutations=200)
    assert same[1] > 0.05
    assert moved[1] < 0.01
    assert moved[0] > same[0]
    assert mmd_test(x, x[::-1].copy(), permutations=50, seed=3) == mmd_test(x, x[::-1].copy(), 50, seed=3)


@pytest.mark.parametrize(
    ("field", "value"),
    [("ks_alpha", 0.0), ("mmd_alpha", 1.5), ("psi_threshold", -1.0), ("permutations", 50), ("min_records", 1)],
)
def test_thresholds_are_checked(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        DriftThresholds(**{field: value})  # type: ignore[arg-type]


# --- report -----------------------------------------------------------------------------------------------------


def test_write_drift_report(setup: Setup, tmp_path: Path) -> None:
    records = setup.records(setup.served(stain_shift))
    report = detect_drift(setup.reference, records)
    markdown = write_drift_report(report, setup.reference, records, tmp_path / "report")
    assert markdown == tmp_path / "report" / "drift.md"
    for name in REPORT_FILES:
        assert (tmp_path / "report" / name).stat().st_size > 0
    for png in REPORT_FILES[2:]:
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown.read_text()
    assert "Status: `drift` (exit code 1)" in text
    assert "| statistic | reference mean | served mean | KS D | p | Holm p | PSI | drift |" in text
    assert "| haematoxylin_od |" in text
    assert "Rule: a tile statistic drifts when" in text
    saved = json.loads((tmp_path / "report" / "drift.json").read_text())
    assert saved["status"] == "drift"
    assert saved["exit_code"] == 1
    assert "haematoxylin_od" in saved["flagged"]
    assert len(saved["checks"]) == len(report.checks)
    # An insufficient report still writes every file (the reference alone in the figures).
    empty = write_drift_report(detect_drift(setup.reference, []), setup.reference, [], tmp_path / "empty")
    assert "Not enough data" in empty.read_text()
    assert (tmp_path / "empty" / "drift_embeddings.png").is_file()
