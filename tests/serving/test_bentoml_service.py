"""The BentoML service as a real `bentoml serve` subprocess answering HTTP."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator

import mlflow
import pytest
import requests
import torch
import yaml
from conftest import CLASSES, REPO, SAMPLE, bundle_metadata, free_port, venv_env

from bonetumor.config import TrackingConfig
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.registry.model_registry import log_and_register
from bonetumor.registry.tracking import setup_mlflow
from bonetumor.serving.predictor import ModelMetadata, save_bundle
from bonetumor.training.models import build_model
from bonetumor.transforms.stain import fit_from_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]


#: A referral rule that refers every tile below 0.99 confidence: an untrained model is never that sure.
REFER_BELOW = 0.99


def served_metadata() -> ModelMetadata:
    """The test model's metadata with a Reinhard stain target and a referral rule, as the pipeline writes them."""
    stain = fit_from_files("reinhard", sorted((SAMPLE / "images").rglob("*.jpg"))[:8])
    referral = ReferralPolicy(
        classes=CLASSES,
        temperature=1.5,
        confidence_threshold=REFER_BELOW,
        target_class="Viable-Tumor",
        target_recall=0.95,
        safe_class="Non-Tumor",
        max_target_prob_when_safe=0.2,
        n_tiles=30,
        coverage=0.1,
        accepted_accuracy=1.0,
        accepted_target_recall=1.0,
        target_met=True,
    )
    return dataclasses.replace(
        bundle_metadata(),
        stain=None if stain is None else stain.to_dict(),
        referral=referral.to_dict(),
        provenance={"data_version": "abc", "init": "scratch (no ImageNet weights available)"},
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Register an (untrained, 40 px tiles, 32 px views) model in a fresh sqlite registry and serve it."""
    root = tmp_path_factory.mktemp("serving")
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": "sqlite:///mlflow.db"}}))
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{root}/mlflow.db"), root)
    torch.manual_seed(0)
    served = served_metadata()
    bundle = save_bundle(build_model("resnet50", 3).eval(), served, root / "bundle")
    with mlflow.start_run():
        version = log_and_register(bundle, served, "bone-tumor-classifier", "champion", {})
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]

    port = free_port()
    log = (root / "bentoml.log").open("w")
    process = subprocess.Popen(
        ["bentoml", "serve", "service:BoneTumorClassifier", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO / "serving",
        env=venv_env(BONETUMOR_PROJECT_DIR=str(root), BENTOML_HOME=str(root / "bentoml-home")),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"bentoml serve did not become ready:\n{(root / 'bentoml.log').read_text()[-5000:]}")
            time.sleep(1)
        yield url, str(version.version)
    finally:
        import os
        import signal

        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def post(url: str, name: str, data: bytes, content_type: str = "application/octet-stream") -> requests.Response:
    return requests.post(f"{url}/predict", files={"image": (name, data, content_type)}, timeout=60)


def test_a_real_tile_gets_a_label_probabilities_and_the_model_version(server: tuple[str, str]) -> None:
    url, version = server
    tile = SAMPLE / "images" / "Viable-Tumor" / "Case-48-P5-C20-15162-19423.jpg"
    response = post(url, tile.name, tile.read_bytes(), "image/jpeg")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] in CLASSES
    assert set(answer["probabilities"]) == set(CLASSES)
    assert abs(sum(answer["probabilities"].values()) - 1.0) < 1e-5
    assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
    assert answer["model"] == {"name": "bone-tumor-classifier", "version": version}
    # Calibrated confidence, and the model's referral rule applied: below 0.99 the tile goes to a pathologist.
    assert answer["confidence"] == pytest.approx(max(answer["probabilities"].values()))
    assert answer["referral"]["refer"] is True
    assert f"does not exceed the referral threshold {REFER_BELOW:.2f}" in answer["referral"]["reason"]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.txt", b"this is not an image", "not a recognised image file"),
        ("empty.jpg", b"", "empty file"),
        (
            "cut.jpg",
            (SAMPLE / "images" / "Non-Tumor" / "P9-B12-15791-34183.jpg").read_bytes()[:1500],
            "corrupt or truncated",
        ),
    ],
)
def test_bad_uploads_get_400_with_the_reason_and_the_service_keeps_serving(
    server: tuple[str, str], name: str, data: bytes, message: str
) -> None:
    url, _ = server
    response = post(url, name, data)
    assert response.status_code == 400
    assert message in response.text
    tile = SAMPLE / "images" / "Non-Tumor" / "P9-B12-15791-34183.jpg"
    assert post(url, tile.name, tile.read_bytes(), "image/jpeg").status_code == 200


def test_model_info_names_the_served_version_and_its_preprocessing(server: tuple[str, str]) -> None:
    url, version = server
    info = requests.post(f"{url}/model_info", json={}, timeout=30).json()
    assert info["version"] == version
    assert info["classes"] == list(CLASSES)
    assert (info["tile_size"], info["input_size"]) == (40, 32)
    assert info["test_time_views"] == {"tile_size": 40, "input_size": 32, "crops": 5, "flips": True, "count": 10}
    assert info["init"] == "scratch (no ImageNet weights available)"
    assert info["provenance"]["data_version"] == "abc"
    assert info["stain_normalization"] == "reinhard"
    assert info["referral"]["confidence_threshold"] == REFER_BELOW
    assert info["referral"]["temperature"] == 1.5
