from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import CLASS_COLOURS, CLASSES
from PIL import Image
from torch import nn

from bonetumor.config import PreprocessConfig
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.serving.predictor import ModelMetadata, Predictor
from bonetumor.training.export import (
    OnnxClassifier,
    agreement,
    export_onnx,
    measure_latency,
    quantize_int8,
    softmax,
)
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.tta import TestTimeAugmented, TestTimeViews

SIZE = 32
PREPROCESS = PreprocessConfig(tile_size=SIZE, input_size=SIZE)


def tiles(per_class: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """Tiles of each class's colour, shifted per tile, plus pixel noise (48 px; the transform resizes to 32)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for _ in range(per_class):
            colour = np.array(CLASS_COLOURS[name], dtype=float) + rng.normal(0, 15, 3)
            pixels = np.clip(colour + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(pixels, mode="RGB"))
            labels.append(label)
    return images, labels


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(16, len(CLASSES)),
    )


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A tiny CNN trained to tell the class colours apart (a well-separated model with non-trivial logits)."""
    torch.manual_seed(0)
    transform = build_eval_transform(PREPROCESS)
    images, labels = tiles(20, seed=0)
    x = torch.stack([transform(image) for image in images])
    y = torch.tensor(labels)
    model = tiny_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    threads = torch.get_num_threads()
    # One thread: a model this small gains nothing from more, and OpenMP threads crawl on a busy machine.
    torch.set_num_threads(1)
    try:
        for _ in range(40):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, "the tiny model did not learn the colours; the INT8 test would be meaningless"
    return model


@pytest.fixture(scope="module")
def onnx_file(trained: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(trained, SIZE, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_export_onnx_matches_torch_with_a_dynamic_batch(trained: nn.Module, onnx_file: Path) -> None:
    onnx.checker.check_model(str(onnx_file))
    batch = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = trained(batch).numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert actual.shape == (5, len(CLASSES))
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_export_onnx_restores_mode_and_writes_nothing_when_verification_fails(tmp_path: Path) -> None:
    model = tiny_cnn().train()
    out = tmp_path / "bad.onnx"
    with pytest.raises(ArtifactError, match="differ from torch"):
        export_onnx(model, SIZE, out, atol=-1.0)  # no difference can pass a negative tolerance
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert model.training


def test_onnx_classifier_gives_the_probabilities_of_the_torch_predictor(trained: nn.Module, onnx_file: Path) -> None:
    images, _ = tiles(3, seed=1)
    metadata = ModelMetadata(
        arch="tiny",
        classes=CLASSES,
        tile_size=SIZE,
        input_size=SIZE,
        mean=PREPROCESS.mean,
        std=PREPROCESS.std,
        dropout=0.0,
        test_crops=1,
        test_flips=False,
    )
    answers = Predictor(trained, metadata).predict_images(images)
    expected = np.array([[a["probabilities"][c] for c in CLASSES] for a in answers])

    classifier = OnnxClassifier(onnx_file, CLASSES, build_eval_transform(PREPROCESS), threads=1)
    probs = classifier.predict_proba(images)

    assert probs.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    assert classifier.predict_proba([]).shape == (0, len(CLASSES))


def test_the_exported_graph_averages_the_test_time_views_as_torch_does(trained: nn.Module, tmp_path: Path) -> None:
    # The served ONNX/INT8 files take whole tiles and cut and average the views inside the graph.
    views = TestTimeViews(tile_size=40, input_size=SIZE, crops=5, flips=True)
    wrapped = TestTimeAugmented(trained, views).eval()
    path = export_onnx(wrapped, 40, tmp_path / "views.onnx")
    transform = build_eval_transform(PreprocessConfig(tile_size=40, input_size=SIZE))
    images, _ = tiles(3, seed=6)
    batch = torch.stack([transform(im) for im in images])
    with torch.no_grad():
        expected = torch.softmax(wrapped(batch), 1).numpy()
        one_view = torch.softmax(trained(batch[:, :, 4:36, 4:36]), 1).numpy()
    probs = OnnxClassifier(path, CLASSES, transform, threads=1).predict_proba(images)
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    # Ten views, not the centre crop alone (compared as log-probabilities: the trained model is very sure).
    assert np.abs(np.log(probs) - np.log(one_view)).max() > 0.05
    int8 = quantize_int8(path, tmp_path / "views.int8.onnx", [b.numpy() for b in batch])
    assert int8.method == "static_qdq"
    assert (
        agreement(expected, OnnxClassifier(int8.path, CLASSES, transform).predict_proba(images))["top1_agreement"]
        >= 0.8
    )


def test_onnx_classifier_rejects_a_class_list_of_the_wrong_length(onnx_file: Path) -> None:
    with pytest.raises(ArtifactError, match=r"expected \(batch, 2\)"):
        OnnxClassifier(onnx_file, CLASSES[:2], build_eval_transform(PREPROCESS))


def test_quantize_int8_static_agrees_with_torch(trained: nn.Module, onnx_file: Path, tmp_path: Path) -> None:
    transform = build_eval_transform(PREPROCESS)
    calibration, _ = tiles(8, seed=2)
    result = quantize_int8(onnx_file, tmp_path / "int8.onnx", [transform(im).numpy() for im in calibration])

    assert result.method == "static_qdq"
    assert result.fallback_reason is None
    assert result.calibration_images == 24
    ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops

    images, _ = tiles(15, seed=3)
    with torch.no_grad():
        expected = torch.softmax(trained(torch.stack([transform(im) for im in images])), 1).numpy()
    probs = OnnxClassifier(result.path, CLASSES, transform).predict_proba(images)
    scores = agreement(expected, probs)
    assert scores["top1_agreement"] >= 0.9
    assert scores["max_abs_prob_diff"] < 0.5


def test_quantize_int8_without_calibration_falls_back_to_dynamic(onnx_file: Path, tmp_path: Path) -> None:
    result = quantize_int8(onnx_file, tmp_path / "dyn.onnx", None)
    assert result.method == "dynamic"
    assert result.fallback_reason is not None
    assert "calibration" in result.fallback_reason
    images, _ = tiles(2, seed=4)
    probs = OnnxClassifier(result.path, CLASSES, build_eval_transform(PREPROCESS)).predict_proba(images)
    assert probs.shape == (6, 3)
    assert np.isfinite(probs).all()


def test_quantize_int8_rejects_calibration_tiles_of_the_wrong_size(onnx_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"calibration image 1 has shape \(3, 16, 16\)"):
        quantize_int8(
            onnx_file,
            tmp_path / "x.onnx",
            [np.zeros((3, SIZE, SIZE), np.float32), np.zeros((3, 16, 16), np.float32)],
        )


def test_measure_latency_times_every_repeat_per_image() -> None:
    calls = []

    def slow(batch: list[int]) -> None:
        calls.append(len(batch))
        time.sleep(0.004)

    result = measure_latency(slow, [0, 1], warmup=1, repeats=4)
    assert len(calls) == 5
    assert result["batch_size"] == 2
    # 4 ms per call of 2 images: at least 2 ms per image.
    assert 2.0 <= result["ms_per_image_p50"] <= result["ms_per_image_p95"]
    assert result["ms_per_image_mean"] >= 2.0
    with pytest.raises(ConfigError, match="repeats"):
        measure_latency(slow, [0], repeats=0)


def test_agreement_and_softmax() -> None:
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    b = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [0.4, 0.5, 0.1]])
    result = agreement(a, b)
    assert result["top1_agreement"] == pytest.approx(0.5)
    assert result["max_abs_prob_diff"] == pytest.approx(0.4)
    with pytest.raises(ArtifactError, match="shapes"):
        agreement(a, b[:2])
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    torch.testing.assert_close(
        torch.from_numpy(softmax(logits)), torch.softmax(torch.from_numpy(logits), 1), rtol=0, atol=1e-12
    )
