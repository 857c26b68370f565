"""A damaged model bundle is refused with an error naming the file and what to do, never served or a traceback.

Bundles record the SHA-256 of their files (``weights.pt``, ``onnx/*.onnx``) in ``metadata.json``; every file is
checked before it is loaded, in process and through the registry. Bundles from before the record (format 4 and
earlier) still load, with a warning, and their damaged files still get a clear error.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from conftest import CLASSES, SAMPLE, bundle_metadata
from PIL import Image
from torch import nn

from bonetumor.config import TrackingConfig
from bonetumor.errors import ArtifactError
from bonetumor.registry.model_registry import log_and_register, open_served_model
from bonetumor.registry.tracking import setup_mlflow
from bonetumor.serving.engines import ONNX_DIR, ONNX_FILES, OnnxPredictor
from bonetumor.serving.predictor import (
    HASHES_KEY,
    METADATA_FILE,
    WEIGHTS_FILE,
    Predictor,
    load_bundle,
    save_bundle,
    write_metadata,
)
from bonetumor.training.export import export_onnx
from bonetumor.training.models import build_model
from bonetumor.utils import sha256_file

TILE = SAMPLE / "images" / "Viable-Tumor" / "Case-4-C29-29639-16570.jpg"
FP32 = f"{ONNX_DIR}/{ONNX_FILES['onnx-fp32']}"
REREGISTER = "re-register the model (`dvc repro -f register`)"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle as register writes one: the ResNet50's weights, an ONNX FP32 file (a tiny real graph), metadata."""
    root = tmp_path_factory.mktemp("pristine") / "bundle"
    torch.manual_seed(0)
    # The ONNX graph only has to take a tile and give 3 logits for the engine to load and answer.
    export_onnx(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3)).eval(), 40, root / FP32)
    return save_bundle(build_model("resnet50", 3).eval(), bundle_metadata(), root)


@pytest.fixture
def bundle(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine bundle to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def metadata(bundle: Path) -> dict[str, Any]:
    return dict(json.loads((bundle / METADATA_FILE).read_text()))


def rewrite_metadata(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    raw = metadata(bundle)
    edit(raw)
    (bundle / METADATA_FILE).write_text(json.dumps(raw))


def as_format_4(bundle: Path) -> None:
    """Make the bundle one written before bundles recorded their files' SHA-256."""

    def edit(raw: dict[str, Any]) -> None:
        del raw[HASHES_KEY]
        raw["format_version"] = 4

    rewrite_metadata(bundle, edit)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_bundle_records_the_sha256_of_every_file_and_loads_when_they_match(bundle: Path) -> None:
    assert metadata(bundle)[HASHES_KEY] == {
        FP32: sha256_file(bundle / FP32),
        WEIGHTS_FILE: sha256_file(bundle / WEIGHTS_FILE),
    }
    _, meta = load_bundle(bundle)
    assert meta == bundle_metadata()
    onnx = OnnxPredictor(bundle, meta, "onnx-fp32")
    assert onnx.predict_images([Image.open(TILE).convert("RGB")])[0]["label"] in CLASSES


def test_a_weights_file_with_one_byte_changed_is_refused_naming_both_hashes(bundle: Path) -> None:
    weights = bundle / WEIGHTS_FILE
    expected = sha256_file(weights)
    flip_byte(weights)  # torch would load this file, with one weight changed
    actual = sha256_file(weights)
    for load in (load_bundle, Predictor.from_bundle):
        with pytest.raises(ArtifactError) as caught:
            load(bundle)
        assert str(caught.value) == (
            f"{weights}: SHA-256 {actual} does not match {expected}, recorded in metadata.json when the bundle "
            f"was written: the file is corrupt or was changed since; {REREGISTER} to write a fresh bundle"
        )


def test_a_truncated_weights_file_is_refused_before_torch_reads_it(bundle: Path) -> None:
    weights = bundle / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match=f"{re.escape(str(weights))}: SHA-256 [0-9a-f]{{64}} does not match"):
        load_bundle(bundle)


def test_an_onnx_file_with_one_byte_changed_is_refused_by_the_engine(bundle: Path) -> None:
    meta = load_bundle(bundle)[1]
    expected = sha256_file(bundle / FP32)
    flip_byte(bundle / FP32)
    with pytest.raises(ArtifactError) as caught:
        OnnxPredictor(bundle, meta, "onnx-fp32")
    message = str(caught.value)
    assert message.startswith(f"{bundle / FP32}: SHA-256 {sha256_file(bundle / FP32)} does not match {expected}")
    assert REREGISTER in message


def test_an_onnx_file_the_metadata_does_not_record_is_refused(bundle: Path) -> None:
    meta = load_bundle(bundle)[1]
    rewrite_metadata(bundle, lambda raw: raw[HASHES_KEY].pop(FP32))
    with pytest.raises(ArtifactError, match=re.escape(f"metadata.json records no SHA-256 for {FP32}")):
        OnnxPredictor(bundle, meta, "onnx-fp32")


def test_an_older_bundle_without_hashes_loads_with_a_warning(bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    as_format_4(bundle)
    with caplog.at_level(logging.WARNING, logger="bonetumor.serving.predictor"):
        _, meta = load_bundle(bundle)
        OnnxPredictor(bundle, meta, "onnx-fp32")
    assert meta.format_version == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    for name, warning in zip((WEIGHTS_FILE, FP32), warnings, strict=True):
        assert f"records no SHA-256 of the bundle's files (written before bundle format 5): {name} is loaded " in (
            warning
        )


WEIGHTS_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (
        lambda data: data[: len(data) // 2],
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory):",
    ),
    "empty": (lambda data: b"", "EOFError"),
    "not a torch file": (lambda data: b"hello world" * 100, "KeyError"),
    "JSON": (lambda data: b'{"fc.weight": [1, 2]}', "UnpicklingError: Weights only load failed):"),
}


@pytest.mark.parametrize("damage", list(WEIGHTS_DAMAGE))
def test_a_damaged_weights_file_of_an_older_bundle_gets_an_error_naming_it(bundle: Path, damage: str) -> None:
    as_format_4(bundle)
    change, cause = WEIGHTS_DAMAGE[damage]
    weights = bundle / WEIGHTS_FILE
    weights.write_bytes(change(weights.read_bytes()))
    with pytest.raises(ArtifactError) as caught:
        load_bundle(bundle)
    message = str(caught.value)
    assert message.startswith(f"{weights}: not a readable PyTorch state dict ({cause}")
    assert message.endswith(f"the file is truncated or corrupt; {REREGISTER} to write a fresh bundle")


def test_a_weights_file_holding_a_tensor_is_no_state_dict(bundle: Path) -> None:
    as_format_4(bundle)
    torch.save(torch.zeros(3), bundle / WEIGHTS_FILE)
    with pytest.raises(ArtifactError, match=r"weights\.pt: holds a Tensor, not a state dict"):
        load_bundle(bundle)


def test_a_damaged_onnx_file_of_an_older_bundle_gets_an_error_naming_it(bundle: Path) -> None:
    meta = load_bundle(bundle)[1]
    as_format_4(bundle)
    onnx = bundle / FP32
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    expected = f"{re.escape(str(onnx))}: ONNX Runtime cannot parse the file .*: it is truncated or corrupt"
    with pytest.raises(ArtifactError, match=expected):
        OnnxPredictor(bundle, meta, "onnx-fp32")


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def edit(raw: dict[str, Any]) -> None:
        del raw[key]

    return edit


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw.update(values)


#: An edit of metadata.json (or its bytes) and what the error says about it.
METADATA_DAMAGE: dict[str, tuple[Callable[[dict[str, Any]], None] | bytes, str]] = {
    "truncated": (b'{"arch": "resnet50", "classes": ["Non-', "is not valid JSON (Unterminated string"),
    "binary": (b"\x89PNG\r\n\x1a\n\xff\xfe", "is not valid JSON ('utf-8' codec can't decode"),
    "a list": (b"[1, 2]", "not a model bundle of format version [1, 2, 3, 4, 5] (found 'a JSON list')"),
    "unknown format": (_set(format_version=99), "not a model bundle of format version [1, 2, 3, 4, 5] (found 99)"),
    "missing arch": (_drop("arch"), "malformed metadata: missing field(s) ['arch'], unknown field(s) []; expected"),
    "unknown field": (_set(colour="pink"), "malformed metadata: missing field(s) [], unknown field(s) ['colour']"),
    "tile size as text": (_set(tile_size="40"), "malformed metadata: tile_size is str, expected int"),
    "tile size true": (_set(tile_size=True), "malformed metadata: tile_size is bool, expected int"),
    "no classes": (_set(classes=[]), "malformed metadata: classes [], mean"),
    "two std": (_set(std=[0.2, 0.2]), "expected a non-empty list of class names and three numbers each"),
    "no hashes": (_drop(HASHES_KEY), "a format 5 bundle must record the SHA-256 of its files in field 'sha256'"),
    "bad hash": (_set(sha256={WEIGHTS_FILE: "abc"}), "field 'sha256' must map each file of the bundle to its SHA-256"),
}


@pytest.mark.parametrize("damage", list(METADATA_DAMAGE))
def test_damaged_metadata_gets_an_error_naming_the_file_and_what_is_wrong(bundle: Path, damage: str) -> None:
    change, expected = METADATA_DAMAGE[damage]
    path = bundle / METADATA_FILE
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        rewrite_metadata(bundle, change)
    with pytest.raises(ArtifactError) as caught:
        load_bundle(bundle)
    message = str(caught.value)
    assert str(path) in message
    assert expected in message
    assert REREGISTER in message


def test_a_missing_metadata_file_is_named(bundle: Path) -> None:
    (bundle / METADATA_FILE).unlink()
    with pytest.raises(ArtifactError, match=f"model metadata not found at {re.escape(str(bundle / METADATA_FILE))}"):
        load_bundle(bundle)


def test_a_registered_version_whose_stored_weights_were_changed_is_refused_when_served(
    pristine: Path, tmp_path: Path
) -> None:
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), tmp_path)
    bundle = Path(shutil.copytree(pristine, tmp_path / "bundle"))
    (bundle / FP32).unlink()  # the torch engine serves: runtime is unset and there is no ONNX file
    write_metadata(bundle, bundle_metadata())
    with mlflow.start_run():
        log_and_register(bundle, bundle_metadata(), "bone-tumor-classifier", "champion", {})
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": "sqlite:///mlflow.db"}}))
    holder, _ = open_served_model(tmp_path / "params.yaml")  # intact: served
    assert holder.current.version == "1"

    stored = list((tmp_path / "mlartifacts").rglob(WEIGHTS_FILE))
    assert len(stored) == 1, stored
    flip_byte(stored[0])
    with pytest.raises(ArtifactError) as caught:
        open_served_model(tmp_path / "params.yaml")
    message = str(caught.value)
    assert message.startswith("bone-tumor-classifier version 1 is refused: ")
    assert f"{WEIGHTS_FILE}: SHA-256 {sha256_file(stored[0])} does not match {sha256_file(bundle / WEIGHTS_FILE)}" in (
        message
    )
    assert REREGISTER in message
