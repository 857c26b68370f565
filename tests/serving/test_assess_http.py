"""Whole-slide assessment over HTTP: the /assess task of a real `bentoml serve`, and the upload guard's spooling.

The server tests run a second ``bentoml serve`` of the session's registered model (fixture ``served``) from a
project of their own, with a small ``assess.max_upload_bytes`` so that the 413 is cheap to reach. The guard's
streaming is also checked in-process, at the ASGI level, where the chunks and the disk can be watched.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import http.client
import io
import json
import tempfile
import time
import zipfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from bento_server import ASSESS_LAYOUT, BentoServer, serve_project, write_test_slide
from conftest import CLASSES, SAMPLE
from PIL import Image

from bonetumor.serving.audit import read_prediction_log
from bonetumor.serving.http import SPOOL_PREFIX, UploadEndpoint, UploadGuard, safe_filename, take_spooled
from bonetumor.slide.demo import layout_counts

#: assess.max_upload_bytes of the test project: above the test slide, below what the 413 tests send.
ASSESS_LIMIT = 6_000_000
#: serving.max_upload_bytes of the test project (the tile endpoints keep it).
TILE_LIMIT = 1_000_000
TIMEOUT_S = 180


# ---------------------------------------------------------------------------------------------------------------
# The guard, in-process


SLIDE = UploadEndpoint(
    "slide", example="slide.svs", spool=True, max_bytes=1000, limit_setting="assess.max_upload_bytes"
)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> bytes:
    """A multipart body of ``(field, filename or None, content)`` parts."""
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


class Downstream:
    """The app behind the guard: records what it got and, like the /assess task, takes the spooled file."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        body = json.loads(message["body"])
        upload = take_spooled(body["upload_id"])
        headers = dict(scope["headers"])
        self.calls.append(
            {"body": body, "content": upload.path.read_bytes(), "name": upload.filename, "headers": headers}
        )
        self.folder = upload.path.parent
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def run_guard(
    body: bytes,
    chunk: int = 7,
    declared: int | None = -1,
    content_type: str = "multipart/form-data; boundary=XyZ",
    method: str = "POST",
) -> tuple[int, dict[str, Any], Downstream, int]:
    """Send ``body`` in ``chunk``-byte messages through the guard; return status, JSON, the app, chunks read."""
    app = Downstream()
    guard = UploadGuard(app, {"/assess/submit": SLIDE}, max_bytes=10)
    headers = [(b"content-type", content_type.encode())]
    if declared is not None:
        headers.append((b"content-length", str(len(body) if declared == -1 else declared).encode()))
    scope = {"type": "http", "method": method, "path": "/assess/submit", "headers": headers}
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        if read > len(pieces):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": pieces[read - 1], "more_body": read < len(pieces)}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    payload = sent[1]["body"]
    return status, (json.loads(payload) if status != 200 else {}), app, read


def spool_folders() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*"))


def test_the_guard_streams_a_slide_to_disk_and_hands_over_only_its_id() -> None:
    before = spool_folders()
    content = bytes(range(256)) * 3  # 768 bytes, under the 1000-byte limit, over the guard's default of 10
    body = multipart([("slide", "../../etc/My slide;1.svs", content)])
    status, _, app, read = run_guard(body, chunk=7)
    assert status == 200
    assert read == -(-len(body) // 7)  # every chunk read once, no second pass over a buffered body
    (call,) = app.calls
    assert call["content"] == content
    assert call["name"] == "My slide_1.svs"  # no folders, no odd characters, the suffix kept
    assert set(call["body"]) == {"upload_id"}
    assert call["headers"][b"content-type"] == b"application/json"
    assert not app.folder.exists()  # removed once the app behind the guard is done
    assert spool_folders() == before


REFUSALS = {
    "declared size over the endpoint's limit": (
        dict(body=multipart([("slide", "s.svs", b"x" * 2000)])),
        413,
        "the limit is 1000 bytes (assess.max_upload_bytes)",
    ),
    "chunked body over the limit": (
        dict(body=multipart([("slide", "s.svs", b"x" * 2000)]), declared=None),
        413,
        "the limit is 1000 bytes (assess.max_upload_bytes)",
    ),
    "field 'file'": (
        dict(body=multipart([("file", "s.svs", b"x" * 500)])),
        400,
        "unexpected form field(s) ['file']; expected the file in field 'slide'",
    ),
    "slide as text": (dict(body=multipart([("slide", None, b"abc")])), 400, "holds text, not a file"),
    "two slides": (
        dict(body=multipart([("slide", "a.svs", b"a" * 10), ("slide", "b.svs", b"b" * 10)])),
        400,
        "takes one",
    ),
    "no part": (dict(body=b"--XyZ--\r\n"), 400, "no 'slide' field in the form"),
    "cut before the closing boundary": (
        dict(body=multipart([("slide", "s.svs", b"x" * 100)])[:-30]),
        400,
        "ends before its closing boundary",
    ),
    "JSON body": (
        dict(body=b'{"upload_id": "0123"}', content_type="application/json"),
        415,
        "expected multipart/form-data",
    ),
    "GET": (dict(body=b"", method="GET"), 405, "curl -F slide=@slide.svs"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_the_guard_refuses_a_bad_slide_upload_and_leaves_nothing_on_disk(kind: str) -> None:
    before = spool_folders()
    arguments, status, message = REFUSALS[kind]
    got, answer, app, read = run_guard(**arguments)  # type: ignore[arg-type]
    assert got == status
    assert message in answer["error"]
    assert not app.calls
    assert spool_folders() == before
    if kind == "declared size over the endpoint's limit":
        assert read == 0  # refused on the header alone, before any byte of the body
    if kind == "field 'file'":
        # Refused at the end of the first part's headers (about 80 bytes), not after the 500 bytes of content.
        assert read * 7 < 100


def test_safe_filename() -> None:
    assert safe_filename("C:\\scans\\case 7.svs") == "case 7.svs"
    assert safe_filename("..") == "upload"
    assert safe_filename("a<b>|c.tif") == "a_b__c.tif"
    assert safe_filename("x" * 300 + ".ndpi").endswith(".ndpi")
    assert len(safe_filename("x" * 300 + ".ndpi")) == 120


def test_an_upload_is_taken_once_and_an_unknown_id_is_refused() -> None:
    with pytest.raises(KeyError):
        take_spooled("../../params.yaml")
    with pytest.raises(KeyError):
        take_spooled("0" * 32)


# ---------------------------------------------------------------------------------------------------------------
# A real server


@pytest.fixture(scope="module")
def assess_server(served: BentoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BentoServer]:
    """The session's model served from a project with small upload limits and a short bootstrap."""
    root = tmp_path_factory.mktemp("assess-serving")
    params = {
        "serving": {"prediction_log": "predictions.jsonl", "max_upload_bytes": TILE_LIMIT},
        "assess": {"max_upload_bytes": ASSESS_LIMIT, "bootstrap": 200, "batch_size": 8},
    }
    server = serve_project(root, served.root, served.version, params)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_test_slide(tmp_path_factory.mktemp("slides") / "case-7 slide.tif")
    assert path.stat().st_size < ASSESS_LIMIT
    return path


def submit(url: str, name: str, data: bytes, field: str = "slide") -> requests.Response:
    return requests.post(f"{url}/assess/submit", files={field: (name, data)}, timeout=60)


def wait_for(url: str, task_id: str) -> tuple[requests.Response, list[dict[str, Any]]]:
    """Poll status and progress until the task ends; return /assess/get and the progress entries seen."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        status = requests.get(f"{url}/assess/status", params={"task_id": task_id}, timeout=30).json()
        progress = requests.get(f"{url}/ui/assess/progress/{task_id}", timeout=30)
        if progress.status_code == 200:
            seen.append(progress.json())
        if status["status"] in ("completed", "failed"):
            break
        assert status["status"] == "in_progress", status
        assert time.monotonic() < deadline, f"the assessment did not finish in {TIMEOUT_S} s"
        time.sleep(0.3)
    return requests.get(f"{url}/assess/get", params={"task_id": task_id}, timeout=30), seen


def files_holding(root: Path, data: bytes) -> list[Path]:
    """Files under ``root`` holding a piece of ``data``, raw or base64-encoded (BentoML's task store)."""
    start = (len(data) // 2) // 3 * 3
    piece = data[start : start + 300]
    encoded = base64.b64encode(piece)
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            if piece in content or encoded in content:
                found.append(path)
    return found


@pytest.mark.integration
@pytest.mark.slow
def test_a_slide_is_assessed_with_progress_links_and_its_audit_record(assess_server: BentoServer, slide: Path) -> None:
    data = slide.read_bytes()
    response = submit(assess_server.url, slide.name, data)
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    result, seen = wait_for(assess_server.url, task_id)
    assert result.status_code == 200, result.text
    answer = result.json()

    # Every tissue cell is one tile; the glass around it is skipped on the thumbnail.
    counts = layout_counts(ASSESS_LAYOUT)
    tissue = sum(counts.values())
    cells = len(ASSESS_LAYOUT) * len(ASSESS_LAYOUT[0])
    assert answer["tiles"] == tissue
    assert answer["tiling"]["candidate_tiles"] == cells
    assert answer["tiling"]["glass_skipped_by_thumbnail"] == cells - tissue
    assert answer["tiling"]["glass_skipped_after_read"] == 0
    assert answer["tiling"]["tile_side_px"] == 256  # 1024 um at 4 um/px
    assert answer["input"]["mpp"] == 4.0
    assert answer["input"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert answer["name"] == slide.name

    # The necrosis figures agree with the tile counts they come from.
    per_class = answer["tiles_per_class"]
    assert set(per_class) == set(CLASSES)
    assert sum(per_class.values()) == tissue
    necrotic, viable = per_class["Non-Viable-Tumor"], per_class["Viable-Tumor"]
    assert answer["tumour_tiles"] == necrotic + viable
    if necrotic + viable:
        assert answer["necrosis_percent"] == pytest.approx(100 * necrotic / (necrotic + viable), abs=0.01)
        low, high = answer["necrosis_interval"]
        assert low <= answer["necrosis_percent"] <= high
        assert answer["response"]["category"] in ("good responder", "poor responder")
    else:
        assert answer["necrosis_percent"] is None
    assert answer["referred"]["tiles"] == tissue  # the test model refers every tile (below 0.99 confidence)
    # Every tile referred: counted all viable, then all necrotic, the referral bounds are the whole range.
    assert answer["interval"]["referral_bounds"] == [0.0, 100.0]
    assert answer["tumour_area_mm2"] == pytest.approx((necrotic + viable) * 1.024**2, abs=0.01)
    assert answer["model"]["version"] == assess_server.version
    assert "pathologist" in answer["disclaimer"]

    # Progress: tiles read out of the tiles kept, ending complete.
    assert seen, "no progress entry was ever served"
    assert seen[-1]["state"] == "completed"
    assert seen[-1]["done"] == seen[-1]["total"] == tissue
    assert {entry["state"] for entry in seen} <= {"queued", "opening", "tiles", "summarising", "completed"}

    # The links: a PNG map, parseable GeoJSON and CSV with one feature / row per tile, under /ui/assess/results.
    assert answer["result_id"] == task_id
    for key in ("overlay_url", "geojson_url", "csv_url", "json_url"):
        assert answer[key].startswith(f"/ui/assess/results/{task_id}/")
    overlay = requests.get(assess_server.url + answer["overlay_url"], timeout=30)
    assert overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).format == "PNG"
    geojson = requests.get(assess_server.url + answer["geojson_url"], timeout=30)
    assert "attachment" in geojson.headers["content-disposition"]
    features = geojson.json()["features"]
    assert len(features) == tissue
    assert {f["properties"]["classification"]["name"] for f in features} <= set(CLASSES)
    rows = list(csv.DictReader(io.StringIO(requests.get(assess_server.url + answer["csv_url"], timeout=30).text)))
    assert len(rows) == tissue
    stored = requests.get(assess_server.url + answer["json_url"], timeout=30).json()
    assert stored["request_id"] == answer["request_id"]

    # The audit record of the assessment.
    records = {r["request_id"]: r for r in read_prediction_log(assess_server.root / "predictions.jsonl")}
    record = records[answer["request_id"]]
    assert record["endpoint"] == "/assess"
    assert record["input_sha256"] == answer["input"]["sha256"]
    assert record["model"]["version"] == assess_server.version
    assert record["filename"] == slide.name
    assert record["assessment"]["tiles"] == answer["tiles"]
    assert record["assessment"]["necrosis_interval"] == answer["necrosis_interval"]

    # Nothing of the upload stays on the server's disk: no spool folder, no copy in BentoML's task database.
    assert not list((assess_server.root / "tmp").glob(f"{SPOOL_PREFIX}*"))
    assert (assess_server.root / "bentoml-home" / "task_result.db").exists()
    assert files_holding(assess_server.root, data) == []


@pytest.mark.integration
@pytest.mark.slow
def test_a_zip_of_tcia_tiles_is_assessed_by_the_synchronous_route(assess_server: BentoServer, tmp_path: Path) -> None:
    tiles = (
        sorted((SAMPLE / "images" / "Viable-Tumor").glob("*.jpg"))[:3]
        + sorted((SAMPLE / "images" / "Non-Viable-Tumor").glob("*.jpg"))[:3]
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, tile in enumerate(tiles):
            archive.write(tile, f"Case-7-S1-{1024 * (i % 3)}-{1024 * (i // 3)}.jpg")
    response = requests.post(
        f"{assess_server.url}/assess", files={"slide": ("case-7.zip", buffer.getvalue())}, timeout=120
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["input"]["kind"] == "tile-zip"
    assert answer["tiling"]["candidate_tiles"] == 6
    assert answer["tiles"] + answer["tiling"]["glass_skipped_after_read"] == 6
    assert len(answer["result_id"]) == 32
    assert requests.get(assess_server.url + answer["overlay_url"], timeout=30).status_code == 200
    assert not list((assess_server.root / "tmp").glob(f"{SPOOL_PREFIX}*"))


BAD_SLIDES = {
    "text file named .svs": ("notes.svs", b"Patient notes: not a slide at all.\n" * 20),
    "random bytes": ("noise.tif", bytes(range(256)) * 40),
    "empty file": ("empty.svs", b""),
}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_SLIDES))
def test_a_file_that_is_not_a_slide_fails_with_a_message_naming_it(assess_server: BentoServer, kind: str) -> None:
    name, data = BAD_SLIDES[kind]
    response = submit(assess_server.url, name, data)
    assert response.status_code == 200, response.text
    task_id = response.json()["task_id"]
    result, seen = wait_for(assess_server.url, task_id)
    status = requests.get(f"{assess_server.url}/assess/status", params={"task_id": task_id}, timeout=30).json()
    assert status["status"] == "failed"
    assert result.status_code == 400
    error = result.json()["error"]
    assert error.startswith(name)
    assert "expected" in error
    assert SPOOL_PREFIX not in error
    assert str(assess_server.root) not in error  # the server's folders are not shown to the client
    assert seen[-1]["state"] == "failed"
    assert seen[-1]["error"] == error
    records = [r for r in read_prediction_log(assess_server.root / "predictions.jsonl") if r.get("error") == error]
    assert records
    assert records[-1]["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert not list((assess_server.root / "tmp").glob(f"{SPOOL_PREFIX}*"))
    # A retry replays the upload id, but the upload is gone: a clear refusal, not a crash.
    retried = requests.post(f"{assess_server.url}/assess/retry", params={"task_id": task_id}, timeout=30).json()
    again, _ = wait_for(assess_server.url, retried["task_id"])
    assert again.status_code == 400
    assert "no longer kept" in again.json()["error"]
    log = assess_server.log()
    assert "Traceback" not in log


def post_declared(url: str, path: str, length: int) -> tuple[int, dict[str, Any]]:
    """POST with a declared Content-Length and no body: the guard must answer from the header alone."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "multipart/form-data; boundary=XyZ")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


@pytest.mark.integration
@pytest.mark.slow
def test_upload_limits_and_field_names(assess_server: BentoServer, slide: Path) -> None:
    url = assess_server.url
    # A declared size over assess.max_upload_bytes: 413 at once, without sending a byte of the body.
    status, answer = post_declared(url, "/assess/submit", 3 * 1024**3)
    assert status == 413
    assert f"the limit is {ASSESS_LIMIT} bytes (assess.max_upload_bytes)" in answer["error"]
    # Over the limit for real, and chunked (no Content-Length): counted as it streams.
    big = b"\0" * (ASSESS_LIMIT + 1000)
    response = requests.post(f"{url}/assess/submit", files={"slide": ("big.svs", big)}, timeout=60)
    assert response.status_code == 413
    assert "assess.max_upload_bytes" in response.json()["error"]

    def chunks() -> Iterator[bytes]:
        yield b'--XyZ\r\nContent-Disposition: form-data; name="slide"; filename="big.svs"\r\n\r\n'
        for _ in range(ASSESS_LIMIT // 65536 + 2):
            yield b"\0" * 65536

    response = requests.post(
        f"{url}/assess/submit",
        data=chunks(),
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
        timeout=60,
    )
    assert response.status_code == 413
    assert f"the limit is {ASSESS_LIMIT} bytes (assess.max_upload_bytes)" in response.json()["error"]
    # The tile endpoints keep serving.max_upload_bytes: the slide fits /assess but not /predict.
    assert TILE_LIMIT < slide.stat().st_size < ASSESS_LIMIT
    tile = requests.post(f"{url}/predict", files={"image": ("slide.tif", slide.read_bytes())}, timeout=60)
    assert tile.status_code == 413
    assert f"the limit is {TILE_LIMIT} bytes (serving.max_upload_bytes)" in tile.json()["error"]
    # A wrong field name: 400 naming the expected field.
    wrong = submit(url, slide.name, b"x" * 1000, field="file")
    assert wrong.status_code == 400
    assert "expected the file in field 'slide'" in wrong.json()["error"]
    assert requests.post(f"{url}/assess/submit", json={"upload_id": "0" * 32}, timeout=30).status_code == 415
    assert not list((assess_server.root / "tmp").glob(f"{SPOOL_PREFIX}*"))


@pytest.mark.integration
@pytest.mark.slow
def test_results_and_progress_urls_take_only_an_assessment_id(assess_server: BentoServer) -> None:
    url = assess_server.url
    (assess_server.root / "secret.txt").write_text("not for clients")
    for path in (
        "/ui/assess/results/..%2F..%2Fsecret.txt/overlay.png",
        "/ui/assess/results/../../secret.txt",
        f"/ui/assess/results/{'0' * 32}/overlay.png",
        f"/ui/assess/results/{'0' * 32}/..%2F..%2F..%2Fsecret.txt",
        f"/ui/assess/results/{'0' * 32}/params.yaml",
        "/ui/assess/progress/..%2Fsecret.txt",
        f"/ui/assess/progress/{'0' * 32}",
    ):
        response = requests.get(url + path, timeout=30)
        assert response.status_code == 404, path
        assert "not for clients" not in response.text
    page = requests.get(f"{url}/ui/assess", timeout=30)
    assert page.status_code == 200
    assert 'id="slide-input"' in page.text
