"""The BentoML service as a real `bentoml serve` subprocess answering HTTP (fixture ``served``)."""

from __future__ import annotations

import base64
import hashlib
import io
from datetime import datetime
from pathlib import Path

import pytest
import requests
from bento_server import REFER_BELOW, BentoServer
from conftest import CLASSES, SAMPLE
from PIL import Image

from bonetumor.serving.audit import read_prediction_log

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TILE = SAMPLE / "images" / "Viable-Tumor" / "Case-48-P5-C20-15162-19423.jpg"
NEAR_BLANK = SAMPLE / "images" / "Non-Tumor" / "P9-B6-5195-29864.jpg"


def post(url: str, name: str, data: bytes, field: str = "image", path: str = "/predict") -> requests.Response:
    return requests.post(f"{url}{path}", files={field: (name, data, "application/octet-stream")}, timeout=60)


def png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 120, 170)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_real_tile_gets_a_calibrated_answer_with_its_audit_fields(served: BentoServer) -> None:
    response = post(served.url, TILE.name, TILE.read_bytes())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] in CLASSES
    assert set(answer["probabilities"]) == set(CLASSES)
    assert abs(sum(answer["probabilities"].values()) - 1.0) < 1e-5
    assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)
    # Calibrated confidence and the model's referral rule: below 0.99 the tile goes to a pathologist.
    assert answer["confidence"] == pytest.approx(max(answer["probabilities"].values()))
    assert answer["referral"]["refer"] is True
    assert f"does not exceed the referral threshold {REFER_BELOW:.2f}" in answer["referral"]["reason"]
    # Audit fields: who answered what, when.
    assert len(answer["request_id"]) == 32
    assert datetime.fromisoformat(answer["timestamp"]).tzinfo is not None
    assert answer["input_sha256"] == hashlib.sha256(TILE.read_bytes()).hexdigest()
    assert answer["model"]["name"] == "bone-tumor-classifier"
    assert answer["model"]["version"] == served.version
    assert len(answer["model"]["run_id"]) == 32
    assert answer["model"]["runtime"] == "onnx-fp32"  # no out-of-fold INT8 score in the test bundle
    assert 0.5 < answer["tissue_fraction"] <= 1.0
    second = post(served.url, TILE.name, TILE.read_bytes()).json()
    assert second["request_id"] != answer["request_id"]
    assert second["probabilities"] == answer["probabilities"]


def _multipart_without_image(url: str) -> requests.Response:
    return requests.post(f"{url}/predict", files={"target": (None, "Viable-Tumor")}, timeout=30)


BAD_REQUESTS = {
    "text file": (lambda url: post(url, "notes.txt", b"this is not an image"), 400, "not a recognised image file"),
    "empty file": (lambda url: post(url, "empty.jpg", b""), 400, "empty file"),
    "truncated JPEG": (lambda url: post(url, "cut.jpg", TILE.read_bytes()[:1500]), 400, "corrupt or truncated"),
    "1x1 PNG": (lambda url: post(url, "dot.png", png(1)), 400, "1x1 px; expected a tile of at least 128x128"),
    "100 px PNG": (lambda url: post(url, "small.png", png(100)), 400, "expected a tile of at least 128x128"),
    "field 'file'": (
        lambda url: post(url, TILE.name, TILE.read_bytes(), field="file"),
        400,
        "unexpected form field(s) ['file']; expected the file in field 'image'",
    ),
    "no file field": (_multipart_without_image, 400, "unexpected form field(s) ['target']"),
    "image as text": (
        lambda url: requests.post(f"{url}/predict", files={"image": (None, "abc")}, timeout=30),
        400,
        "holds text, not a file",
    ),
    "JSON body": (lambda url: requests.post(f"{url}/predict", json={"image": "x"}, timeout=30), 415, "multipart"),
    "raw bytes": (
        lambda url: requests.post(f"{url}/predict", data=TILE.read_bytes(), timeout=30),
        415,
        "expected multipart/form-data",
    ),
    "garbage JSON to /model_info": (
        lambda url: requests.post(
            f"{url}/model_info", data=b"garbage", headers={"Content-Type": "application/json"}, timeout=30
        ),
        400,
        "validation error",
    ),
    "GET /predict": (lambda url: requests.get(f"{url}/predict", timeout=30), 405, "POST /predict as multipart"),
    "two files to /predict": (
        lambda url: requests.post(
            f"{url}/predict",
            files=[("image", ("a.jpg", TILE.read_bytes())), ("image", ("b.jpg", TILE.read_bytes()))],
            timeout=30,
        ),
        400,
        "takes one",
    ),
    "over the size limit": (lambda url: post(url, "big.jpg", b"\xff" * 2_100_000), 413, "the limit is 2000000 bytes"),
}


@pytest.mark.parametrize("kind", list(BAD_REQUESTS))
def test_every_malformed_request_gets_a_4xx_that_says_what_was_expected(served: BentoServer, kind: str) -> None:
    send, status, message = BAD_REQUESTS[kind]
    response = send(served.url)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    # The service keeps serving, and logs the refusal as one line, not as an ERROR traceback.
    assert post(served.url, TILE.name, TILE.read_bytes()).status_code == 200
    log = served.log()
    assert "Traceback" not in log
    assert "[ERROR]" not in log


def test_a_tile_with_too_little_tissue_is_referred_with_the_reason(served: BentoServer) -> None:
    answer = post(served.url, NEAR_BLANK.name, NEAR_BLANK.read_bytes()).json()
    assert answer["tissue_fraction"] < 0.25
    assert answer["referral"]["refer"] is True
    assert answer["referral"]["reason"].startswith("not enough tissue: 21% of the tile is tissue, below the 25%")


def test_the_batch_endpoint_answers_each_file_and_names_the_bad_one(served: BentoServer) -> None:
    other = SAMPLE / "images" / "Non-Tumor" / "P9-B12-15791-34183.jpg"
    files = [
        ("images", (TILE.name, TILE.read_bytes())),
        ("images", ("notes.txt", b"hello")),
        ("images", (other.name, other.read_bytes())),
    ]
    response = requests.post(f"{served.url}/predict_batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [TILE.name, "notes.txt", other.name]
    assert "not a recognised image file" in results[1]["error"]
    assert "label" not in results[1]
    for result, tile in ((results[0], TILE), (results[2], other)):
        single = post(served.url, tile.name, tile.read_bytes()).json()
        assert result["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)
        assert result["model"]["version"] == served.version


def test_explain_returns_the_overlay_and_the_raw_heatmap_for_the_named_class(served: BentoServer) -> None:
    response = requests.post(
        f"{served.url}/explain",
        files={"image": (TILE.name, TILE.read_bytes()), "target": (None, b"Non-Tumor")},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["target"] == "Non-Tumor"
    assert answer["heatmap_size"] == [40, 40]  # the tile size: every test-time view put back where it came from
    assert len(answer["heatmap"]) == 40
    values = [v for row in answer["heatmap"] for v in row]
    assert min(values) >= 0.0
    assert max(values) <= 1.0  # each heatmap is scaled to its own max (all 0 when no region supports the class)
    for key in ("overlay_png", "heatmap_png"):
        image = Image.open(io.BytesIO(base64.b64decode(answer[key])))
        assert (image.format, image.size) == ("PNG", (256, 256))
    predicted = post(served.url, TILE.name, TILE.read_bytes(), path="/explain").json()
    assert predicted["target"] == predicted["label"]
    assert predicted["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-9)
    files = {"image": (TILE.name, TILE.read_bytes()), "target": (None, b"X")}
    bad = requests.post(f"{served.url}/explain", files=files, timeout=60)
    assert bad.status_code == 400
    assert "expected one of ['Non-Tumor', 'Non-Viable-Tumor', 'Viable-Tumor']" in bad.json()["error"]


def test_model_info_answers_get_with_the_runtime_and_why(served: BentoServer) -> None:
    info = requests.get(f"{served.url}/model_info", timeout=30).json()
    assert info == requests.post(f"{served.url}/model_info", json={}, timeout=30).json() | {
        "alias_check": info["alias_check"]
    }
    assert info["version"] == served.version
    assert info["trained_at"] == "2026-12-01T10:00:00+00:00"
    assert info["runtime"]["engine"] == "onnx-fp32"
    assert "INT8 was not scored out of fold" in info["runtime"]["reason"]
    assert info["input_checks"]["min_size"] == 128
    assert info["classes"] == list(CLASSES)
    assert info["test_time_views"] == {"tile_size": 40, "input_size": 32, "crops": 5, "flips": True, "count": 10}
    assert info["stain_normalization"] == "reinhard"
    assert info["referral"]["temperature"] == 1.5


def test_the_model_card_is_served_as_markdown_and_model_info_points_at_it(served: BentoServer) -> None:
    response = requests.get(f"{served.url}/model_card", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    card = response.text
    assert card.startswith(f"# Model card: bone-tumor-classifier version {served.version} (")
    assert "## Intended use" in card
    assert "**Not for:**" in card
    assert "## Changes since the previous champion" in card
    assert requests.get(f"{served.url}/model_info", timeout=30).json()["model_card"] == "/model_card"


def test_every_answer_is_in_the_prediction_log_and_no_upload_stays_on_disk(served: BentoServer) -> None:
    answers = [post(served.url, TILE.name, TILE.read_bytes()).json() for _ in range(3)]
    records = {r["request_id"]: r for r in read_prediction_log(served.root / "predictions.jsonl")}
    for answer in answers:
        record = records[answer["request_id"]]
        assert record["input_sha256"] == answer["input_sha256"]
        assert record["label"] == answer["label"]
        assert record["referral"] == answer["referral"]
        assert record["model"]["version"] == served.version
        assert record["endpoint"] == "/predict"
    assert all(len(line) < 2000 for line in (served.root / "predictions.jsonl").read_text().splitlines())
    digest = hashlib.sha256(TILE.read_bytes()).hexdigest()
    spooled = [p for p in Path(served.root / "tmp").rglob("*") if p.is_file()]
    assert not [p for p in spooled if hashlib.sha256(p.read_bytes()).hexdigest() == digest]


def test_health_metrics_and_the_page_are_served(served: BentoServer) -> None:
    assert requests.get(f"{served.url}/livez", timeout=10).status_code == 200
    assert requests.get(f"{served.url}/readyz", timeout=10).status_code == 200
    post(served.url, TILE.name, TILE.read_bytes())
    post(served.url, "notes.txt", b"not an image")
    metrics = requests.get(f"{served.url}/metrics", timeout=10).text
    counted = [line for line in metrics.splitlines() if line.startswith("bonetumor_answers_total{")]
    assert counted
    assert any(f'version="{served.version}"' in line and 'referred="true"' in line for line in counted)
    assert any(line.startswith("bonetumor_rejected_uploads_total{") for line in metrics.splitlines())
    page = requests.get(f"{served.url}/ui/", timeout=10)
    assert page.status_code == 200
    assert "not a diagnosis" in page.text
