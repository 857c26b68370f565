"""The served model in process: runtime decision, engines, input checks, Grad-CAM, audit log, alias following."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bento_server import TILES, served_metadata
from conftest import CLASSES, SAMPLE
from PIL import Image

from bonetumor.config import ServingConfig, ValidateConfig
from bonetumor.errors import ArtifactError, ConfigError, InvalidImageError, ModelNotFoundError
from bonetumor.serving.audit import PredictionLog, read_prediction_log
from bonetumor.serving.engines import ONNX_DIR, OnnxPredictor, decide_runtime
from bonetumor.serving.holder import ModelHolder
from bonetumor.serving.http import RequestRejectedError, UploadEndpoint, check_fields, form_fields
from bonetumor.serving.predictor import Predictor, save_bundle
from bonetumor.serving.served import InputRejectedError, ServedModel
from bonetumor.training.candidates.int8 import int8_classifier
from bonetumor.training.models import build_model
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import with_views

TILE = SAMPLE / "images" / "Viable-Tumor" / "Case-48-P5-C20-15162-19423.jpg"
NEAR_BLANK = SAMPLE / "images" / "Non-Tumor" / "P9-B6-5195-29864.jpg"
IDENTITY = {"name": "m", "version": "7", "run_id": "r" * 32, "trained_at": "2026-12-01T10:00:00+00:00"}


# --------------------------------------------------------------------------------------------------------------
# Which runtime register lets the service use


def test_int8_serves_only_when_its_out_of_fold_loss_is_within_the_allowed_drop() -> None:
    scores = {"resnet50": {"f1_macro": 0.80}, "resnet50_int8": {"f1_macro": 0.795}}
    within = decide_runtime("resnet50", scores, 0.01, exported=True)
    assert within["engine"] == "onnx-int8"
    assert "is within 0.01 of FP32's 0.8000 (FP32 - INT8 = +0.0050" in within["reason"]
    assert within["files"] == {"onnx-fp32": "onnx/model.fp32.onnx", "onnx-int8": "onnx/model.int8.onnx"}
    better = decide_runtime("resnet50", {**scores, "resnet50_int8": {"f1_macro": 0.85}}, 0.01, exported=True)
    assert better["engine"] == "onnx-int8"
    assert "is at least as good as FP32's" in better["reason"]
    worse = decide_runtime("resnet50", {**scores, "resnet50_int8": {"f1_macro": 0.78}}, 0.01, exported=True)
    assert worse["engine"] == "onnx-fp32"
    assert "loses 0.0200" in worse["reason"]
    assert (worse["fp32_oof_f1_macro"], worse["int8_oof_f1_macro"]) == (0.80, 0.78)
    unmeasured = decide_runtime("resnet50", {"resnet50": {"f1_macro": 0.8}}, 0.01, exported=True)
    assert unmeasured["engine"] == "onnx-fp32"
    assert "candidates.int8: true" in unmeasured["reason"]
    assert decide_runtime("resnet50", scores, 0.01, exported=False)["engine"] == "torch"


# --------------------------------------------------------------------------------------------------------------
# The served model of a bundle with its ONNX files


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40 px ResNet50 bundle (untrained) with a stain target, referral rule, input checks and ONNX files."""
    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    model = build_model("resnet50", 3).eval()
    meta = served_metadata()
    stain = StainNormalizer.from_dict(meta.stain) if meta.stain else None
    int8_classifier(
        with_views(model, meta.views), meta.preprocess, stain, TILES[:6], root / ONNX_DIR, "m", classes=CLASSES
    )
    for engine, name in (("fp32", "model.fp32.onnx"), ("int8", "model.int8.onnx")):
        (root / ONNX_DIR / f"m.{engine}.onnx").rename(root / ONNX_DIR / name)
    runtime = decide_runtime("resnet50", {"resnet50": {"f1_macro": 0.5}}, 0.01, exported=True)
    save_bundle(model, dataclasses.replace(meta, runtime=runtime), root)
    return root


def served(bundle: Path, **serving: object) -> ServedModel:
    return ServedModel.create(
        bundle,
        Predictor.from_bundle(bundle),
        IDENTITY,
        ServingConfig(**serving),  # type: ignore[arg-type]
        ValidateConfig(),
    )


def test_onnx_fp32_answers_as_the_eager_model_does(bundle: Path) -> None:
    fast, eager = served(bundle), served(bundle, runtime="torch")
    assert (fast.engine_name, eager.engine_name) == ("onnx-fp32", "torch")
    for tile in TILES[::6]:
        a, b = fast.answer(tile.read_bytes(), tile.name), eager.answer(tile.read_bytes(), tile.name)
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-4)
        assert a["referral"] == b["referral"]
        assert a["input_sha256"] == b["input_sha256"]
    int8 = OnnxPredictor(bundle, fast.predictor.metadata, "onnx-int8")
    assert int8.predict_images([Image.open(TILE).convert("RGB")])[0]["label"] in CLASSES


def test_the_answer_names_who_answered_and_refers_a_tile_without_enough_tissue(bundle: Path) -> None:
    model = served(bundle)
    answer = model.answer(TILE.read_bytes(), TILE.name)
    assert answer["model"] == {"name": "m", "version": "7", "run_id": "r" * 32, "runtime": "onnx-fp32"}
    assert answer["tissue_fraction"] > 0.5
    blank = model.answer(NEAR_BLANK.read_bytes(), NEAR_BLANK.name)
    assert blank["referral"]["refer"] is True
    assert "not enough tissue: 21% of the tile is tissue" in blank["referral"]["reason"]
    assert blank["label"] in CLASSES  # still answered: the probabilities may help the pathologist


def test_uploads_below_the_training_minimum_are_refused_and_serving_min_size_overrides_it(bundle: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 120), (200, 120, 170)).save(buffer, format="PNG")
    with pytest.raises(
        InputRejectedError, match=r"small.png: the image is 100x120 px; expected a tile of at least 128x128"
    ):
        served(bundle).answer(buffer.getvalue(), "small.png")
    assert served(bundle, min_size=64).answer(buffer.getvalue(), "small.png")["label"] in CLASSES
    with pytest.raises(InvalidImageError, match="not a recognised image file"):
        served(bundle).answer(b"text", "notes.txt")


def test_a_batch_answers_every_good_file_like_single_requests_and_names_the_bad_one(bundle: Path) -> None:
    model = served(bundle)
    results = model.answer_many(
        [(TILE.name, TILE.read_bytes()), ("x.txt", b"x"), (NEAR_BLANK.name, NEAR_BLANK.read_bytes())]
    )
    assert [r["filename"] for r in results] == [TILE.name, "x.txt", NEAR_BLANK.name]
    assert "not a recognised image file" in results[1]["error"]
    single = model.answer(TILE.read_bytes(), TILE.name)
    assert results[0]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)
    assert results[2]["referral"]["refer"] is True


def test_explain_covers_the_tile_and_refuses_an_unknown_class(bundle: Path) -> None:
    model = served(bundle)
    answer = model.explain(TILE.read_bytes(), TILE.name, target="Viable-Tumor")
    assert answer["target"] == "Viable-Tumor"
    assert np.asarray(answer["heatmap"]).shape == (40, 40)
    assert answer["probabilities"] == pytest.approx(model.answer(TILE.read_bytes())["probabilities"], abs=1e-9)
    with pytest.raises(ConfigError, match=r"target 'Tumour' is not a class of this model; expected one of"):
        model.explain(TILE.read_bytes(), TILE.name, target="Tumour")


def test_a_missing_onnx_file_is_a_clear_error(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    for name in ("weights.pt", "metadata.json"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((bundle / name).read_bytes())
    with pytest.raises(ArtifactError, match=r"model.fp32.onnx: the bundle holds no onnx-fp32 file"):
        served(copy)


# --------------------------------------------------------------------------------------------------------------
# The prediction log


def test_the_prediction_log_keeps_audit_fields_without_image_bytes_and_rotates_by_size(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "p.jsonl", max_bytes=2000, backups=2)
    answers = [
        {
            "request_id": f"{i:032x}",
            "timestamp": "t",
            "input_sha256": "s",
            "label": "Non-Tumor",
            "confidence": 0.5,
            "referral": {"refer": False, "reason": ""},
            "probabilities": {"Non-Tumor": 0.5},
            "heatmap": [[0.0] * 50],
        }
        for i in range(40)
    ]
    for answer in answers:
        log.write(answer)
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "p.jsonl.1", "p.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())
    records = read_prediction_log(tmp_path / "p.jsonl")
    kept = [r["request_id"] for r in records]
    assert kept == [a["request_id"] for a in answers][-len(kept) :]  # oldest first, the newest kept
    assert "heatmap" not in records[0]
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[-1])["request_id"] == answers[-1]["request_id"]


# --------------------------------------------------------------------------------------------------------------
# The upload guard's form checks


def multipart(*parts: tuple[str, str | None]) -> tuple[bytes, str]:
    body = b""
    for name, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + b"\xff\xd8 data\r\n"
    return body + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"


@pytest.mark.parametrize(
    ("parts", "endpoint", "message"),
    [
        ([("file", "a.jpg")], UploadEndpoint("image"), "unexpected form field(s) ['file']"),
        ([], UploadEndpoint("image"), "no 'image' field"),
        ([("image", None)], UploadEndpoint("image"), "holds text, not a file"),
        ([("image", "a.jpg"), ("image", "b.jpg")], UploadEndpoint("image"), "takes one"),
        (
            [("image", "a.jpg"), ("target", None), ("target", None)],
            UploadEndpoint("image", optional_fields=("target",)),
            "more than once",
        ),
    ],
)
def test_the_guard_refuses_a_form_that_is_not_the_endpoints(
    parts: list[tuple[str, str | None]], endpoint: UploadEndpoint, message: str
) -> None:
    body, content_type = multipart(*parts)
    with pytest.raises(RequestRejectedError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_fields(form_fields(body, content_type), endpoint, "/predict")


def test_the_guard_accepts_the_endpoints_own_form_and_refuses_other_bodies() -> None:
    body, content_type = multipart(("images", "a.jpg"), ("images", "b.jpg"))
    check_fields(form_fields(body, content_type), UploadEndpoint("images", many=True), "/predict_batch")
    with pytest.raises(RequestRejectedError, match="expected multipart/form-data") as caught:
        form_fields(b"{}", "application/json")
    assert caught.value.status == 415


# --------------------------------------------------------------------------------------------------------------
# Following the alias


class FakeModel:
    def __init__(self, version: str) -> None:
        self.version = version


def test_the_holder_swaps_to_the_version_the_alias_names_and_keeps_serving_when_a_load_fails() -> None:
    alias = {"points_at": "1"}
    loads: list[str] = []

    def load(version: str) -> ServedModel:
        if version == "3":
            raise ArtifactError("version 3 is 'pending', not 'ready'")
        loads.append(version)
        return FakeModel(version)  # type: ignore[return-value]

    def resolve() -> str:
        if alias["points_at"] == "down":
            raise ModelNotFoundError("registry unreachable")
        return alias["points_at"]

    holder = ModelHolder(FakeModel("1"), resolve, load, reload_seconds=0.05)  # type: ignore[arg-type]
    assert holder.check_now() is False
    alias["points_at"] = "2"
    in_flight = holder.current  # a request that started before the move keeps its model
    assert holder.check_now() is True
    assert (in_flight.version, holder.current.version, loads) == ("1", "2", ["2"])
    for broken in ("3", "down"):
        alias["points_at"] = broken
        assert holder.check_now() is False
        assert holder.current.version == "2"
        assert holder.last_check["error"]
    alias["points_at"] = "4"
    holder.start()
    deadline = threading.Event()
    for _ in range(100):
        if holder.current.version == "4":
            break
        deadline.wait(0.05)
    holder.stop()
    assert holder.current.version == "4"


def _stain_shifted(image: Image.Image) -> Image.Image:
    """Another lab's staining: haematoxylin OD +0.3 and eosin x0.6 in the tissue (glass stays white)."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    from bonetumor.transforms.stain import rgb_to_od

    od = rgb_to_od(np.asarray(image))
    tissue = np.clip((od.max(axis=-1) - 0.05) / 0.10, 0.0, 1.0)
    stains = od @ hed_from_rgb.astype(np.float32)
    stains[..., 0] += 0.3 * tissue
    stains[..., 1] *= 1.0 - 0.4 * tissue
    rgb = np.clip(np.rint(256.0 * np.exp(-(stains @ rgb_from_hed.astype(np.float32))) - 1.0), 0, 255)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def _orientations(image: Image.Image) -> list[Image.Image]:
    t = Image.Transpose
    return [image, *(image.transpose(x) for x in (t.FLIP_LEFT_RIGHT, t.ROTATE_90, t.ROTATE_270))]


def test_served_answers_log_drift_features_and_a_stain_shifted_batch_drifts(bundle: Path, tmp_path: Path) -> None:
    """Served model with a drift reference -> prediction log -> drift test: shifted tiles drift, unshifted do not."""
    from bonetumor.monitoring.drift import detect_drift
    from bonetumor.monitoring.reference import build_reference
    from bonetumor.serving.predictor import load_bundle, write_metadata
    from bonetumor.serving.served import DRIFT_REFERENCE

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    files = sorted((SAMPLE / "images").glob("*/*.jpg"))
    images = [Image.open(f).convert("RGB") for f in files]
    reference_tiles = [t for i, t in enumerate(images) if i % 3 != 2]
    build_reference(Predictor.from_bundle(copy), reference_tiles).save(copy / DRIFT_REFERENCE)
    write_metadata(copy, load_bundle(copy)[1])  # the bundle's SHA-256 list covers the reference
    model = served(copy)
    assert model.drift is not None

    def serve(change: object, log_path: Path) -> list[dict[str, Any]]:
        views = [v for i, t in enumerate(images) if i % 3 == 2 for v in _orientations(t)]
        uploads = []
        for n, view in enumerate(views):
            buffer = io.BytesIO()
            (change(view) if callable(change) else view).save(buffer, format="PNG")
            uploads.append((f"tile{n}.png", buffer.getvalue()))
        log = PredictionLog(log_path, 10_000_000, 1)
        for answer in model.answer_many(uploads):
            assert set(answer["drift_features"]) == {"stats", "embedding"}
            log.write(answer)
        log.close()
        return read_prediction_log(log_path)

    plain = serve(None, tmp_path / "plain.jsonl")
    assert len(plain[0]["embedding"]) == model.drift.embeddings.shape[1]
    assert "drift_features" not in plain[0]  # the log keeps the numbers, flat; never the image
    assert detect_drift(model.drift, plain).status == "ok"
    shifted = detect_drift(model.drift, serve(_stain_shifted, tmp_path / "shifted.jsonl"))
    assert shifted.status == "drift"
    assert "haematoxylin_od" in " ".join(shifted.reasons)
