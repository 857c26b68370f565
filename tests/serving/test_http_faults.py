"""Serving under load and faults: real HTTP from misbehaving clients against a real ``bentoml serve`` (``served``).

A client that hangs up mid-upload, a client that trickles its body in, and a crowd of clients mixing good tiles with
every kind of bad body: the server must keep answering good tiles exactly as it does when idle (same label, same
probabilities), refuse each bad body with a 4xx whose JSON ``error`` names the problem, never answer 5xx, and leave
no temporary file of an upload behind. Requests are written by hand with ``http.client`` or a raw socket, so that
the bytes on the wire (a declared length that never arrives, a cut body, a lying content type) are exactly the fault.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from bento_server import BentoServer
from conftest import SAMPLE
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: One tile of each class: the good requests cycle through them.
GOOD_TILES = (
    SAMPLE / "images" / "Viable-Tumor" / "Case-48-P5-C20-15162-19423.jpg",
    SAMPLE / "images" / "Non-Tumor" / "P9-B12-15791-34183.jpg",
    SAMPLE / "images" / "Non-Viable-Tumor" / "Case-3-A12-16067-9053.jpg",
)
BOUNDARY = "faultsboundary7d3f"
FORM = f"multipart/form-data; boundary={BOUNDARY}"
#: What the test server's params.yaml allows (``bento_server.write_registry_project``).
MAX_UPLOAD_BYTES = 2_000_000
DISCONNECTED = "the client disconnected before the body was complete"
#: The guard streams a ``/assess`` upload into a folder with this prefix under the server's TMPDIR.
SPOOL_PREFIX = "bonetumor-upload-"


@dataclass(frozen=True)
class Reply:
    """One HTTP answer as the client read it."""

    status: int
    body: bytes

    def json(self) -> Any:
        """The body as JSON (fails the test with the body when it is not)."""
        try:
            return json.loads(self.body)
        except ValueError:
            pytest.fail(f"HTTP {self.status} answer is not JSON: {self.body[:300]!r}")


def multipart(field: str, filename: str | None, data: bytes, content_type: str = "image/jpeg") -> bytes:
    """A one-part ``multipart/form-data`` body with ``BOUNDARY`` (a text part when ``filename`` is None)."""
    disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
    if filename is not None:
        head += f"Content-Type: {content_type}\r\n"
    return (head + "\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def address(server: BentoServer) -> tuple[str, int]:
    """The server's (host, port)."""
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def send(
    server: BentoServer,
    body: bytes,
    content_type: str = FORM,
    path: str = "/predict",
    declared: int | None = None,
    chunks: int = 1,
    pause: float = 0.0,
) -> Reply:
    """POST ``body`` on a fresh connection, in ``chunks`` pieces ``pause`` s apart, with a declared length.

    Args:
        server: The server.
        body: The bytes sent after the headers.
        content_type: The ``Content-Type`` header.
        path: The request path.
        declared: The ``Content-Length`` header; default the body's true length.
        chunks: How many pieces the body is sent in.
        pause: Seconds to wait after each piece (a slow client).
    """
    host, port = address(server)
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.putrequest("POST", path)
        connection.putheader("Content-Type", content_type)
        connection.putheader("Content-Length", str(len(body) if declared is None else declared))
        connection.endheaders()
        size = -(-len(body) // chunks) if body else 0
        for start in range(0, len(body), max(size, 1)):
            connection.send(body[start : start + size])
            time.sleep(pause)
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


def post_tile(server: BentoServer, tile: Path) -> Reply:
    """A good ``/predict`` request of ``tile``."""
    return send(server, multipart("image", tile.name, tile.read_bytes()))


@pytest.fixture(scope="module")
def reference(served: BentoServer) -> dict[str, dict[str, Any]]:
    """Each good tile's answer from the idle server, one request at a time: what every later answer must equal."""
    answers = {}
    for tile in GOOD_TILES:
        reply = post_tile(served, tile)
        assert reply.status == 200, reply.body
        answers[tile.name] = reply.json()
    # The three tiles must not share one answer, or mixing up whose answer is whose would go unnoticed.
    assert len({json.dumps(a["probabilities"], sort_keys=True) for a in answers.values()}) == len(GOOD_TILES)
    return answers


def assert_matches(reply: Reply, tile: Path, reference: dict[str, dict[str, Any]]) -> None:
    """``reply`` is a 200 with exactly the reference label and probabilities of ``tile``."""
    assert reply.status == 200, f"{tile.name}: HTTP {reply.status}: {reply.body[:300]!r}"
    answer, expected = reply.json(), reference[tile.name]
    assert answer["label"] == expected["label"], tile.name
    assert answer["probabilities"] == expected["probabilities"], tile.name
    assert answer["input_sha256"] == expected["input_sha256"], tile.name


def entries(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` every 0.1 s for up to ``seconds``; return whether it came true."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# --------------------------------------------------------------------------------------------------------------
# A client that hangs up mid-upload


@pytest.mark.parametrize(
    ("path", "field", "repeat"),
    [
        ("/predict", "image", 1),  # held in memory by the upload guard until complete
        ("/assess/submit", "slide", 20),  # streamed to disk as it arrives: the case where a temp file could leak
    ],
)
def test_a_client_that_hangs_up_mid_upload_leaves_no_trace_and_the_next_tile_is_answered(
    served: BentoServer, reference: dict[str, dict[str, Any]], path: str, field: str, repeat: int
) -> None:
    tile = GOOD_TILES[0]
    body = multipart(field, tile.name, tile.read_bytes() * repeat)
    tmp = served.root / "tmp"  # the server's TMPDIR: BentoML's and the guard's spool folders
    before = entries(tmp)
    noticed = served.log().count(DISCONNECTED)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(address(served), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        if path == "/assess/submit":
            # Proves the check below can fail: the half upload is on disk while the client is still connected.
            spooling = wait_for(lambda: any(e.startswith(SPOOL_PREFIX) for e in entries(tmp) - before), 10)
            assert spooling, f"no {SPOOL_PREFIX}* folder appeared in {tmp} during the upload: {entries(tmp)}"
    # The socket is closed: the server must notice (not wait for the rest forever) and drop what it received.
    assert wait_for(lambda: served.log().count(DISCONNECTED) > noticed, 10), served.log()[-3000:]
    assert_matches(post_tile(served, tile), tile, reference)
    assert wait_for(lambda: entries(tmp) == before, 5), f"left in {tmp}: {sorted(entries(tmp) - before)}"


# --------------------------------------------------------------------------------------------------------------
# A client that trickles its body in


def test_a_slow_upload_is_answered_and_other_clients_are_served_meanwhile(
    served: BentoServer, reference: dict[str, dict[str, Any]]
) -> None:
    slow_tile, other_tiles = GOOD_TILES[0], GOOD_TILES[1:]
    stop = threading.Event()
    served_meanwhile: list[tuple[float, float, Path, Reply]] = []
    lock = threading.Lock()

    def normal_client(tile: Path) -> None:
        while not stop.is_set():
            started = time.monotonic()
            reply = post_tile(served, tile)
            with lock:
                served_meanwhile.append((started, time.monotonic(), tile, reply))

    others = [threading.Thread(target=normal_client, args=(tile,)) for tile in other_tiles]
    # 30 pieces 0.1 s apart: about 3 s for a ~25 KB upload, far under the service's 60 s timeout.
    body = multipart("image", slow_tile.name, slow_tile.read_bytes())
    began = time.monotonic()
    for thread in others:
        thread.start()
    try:
        host, port = address(served)
        connection = http.client.HTTPConnection(host, port, timeout=60)
        connection.putrequest("POST", "/predict")
        connection.putheader("Content-Type", FORM)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders()
        size = -(-len(body) // 30)
        for start in range(0, len(body), size):
            connection.send(body[start : start + size])
            time.sleep(0.1)
        last_byte = time.monotonic()
        response = connection.getresponse()
        slow = Reply(response.status, response.read())
        connection.close()
    finally:
        stop.set()
        for thread in others:
            thread.join(timeout=60)
    assert last_byte - began >= 2.5  # it really was slow
    assert_matches(slow, slow_tile, reference)
    for _, _, tile, reply in served_meanwhile:
        assert_matches(reply, tile, reference)
    # Requests that started and were answered while the slow body was still arriving: the slow client blocked no one.
    during = sum(1 for start, end, _, _ in served_meanwhile if start >= began and end <= last_byte)
    assert during >= 5, f"only {during} other requests answered during a {last_byte - began:.1f} s upload"


# --------------------------------------------------------------------------------------------------------------
# Good and bad bodies interleaved, from several clients at once


def png(size: int, seed: int = 0) -> bytes:
    """A PNG of noise (so it does not compress to nothing and a cut one is really cut)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


TILE_BYTES = GOOD_TILES[0].read_bytes()
NOISE_PNG = png(256)

#: A bad request: how to send it, the status expected and a phrase its ``error`` must contain.
BadRequest = tuple[Callable[[BentoServer], Reply], int, str]
BAD: dict[str, BadRequest] = {
    "not an image": (
        lambda s: send(s, multipart("image", "notes.txt", b"this is not an image", "text/plain")),
        400,
        "notes.txt: not a recognised image file",
    ),
    "truncated PNG": (
        lambda s: send(s, multipart("image", "cut.png", NOISE_PNG[: len(NOISE_PNG) // 2], "image/png")),
        400,
        "cut.png: corrupt or truncated PNG",
    ),
    "empty file": (lambda s: send(s, multipart("image", "empty.jpg", b"")), 400, "empty.jpg: empty file (0 bytes)"),
    "wrong field name": (
        lambda s: send(s, multipart("file", "tile.jpg", TILE_BYTES)),
        400,
        "unexpected form field(s) ['file']; expected the file in field 'image'",
    ),
    "text instead of a file": (
        lambda s: send(s, multipart("image", None, b"abc")),
        400,
        "field 'image' holds text, not a file",
    ),
    # Refused from the headers alone: the body is never sent, let alone read.
    "huge declared size": (
        lambda s: send(s, b"", declared=10**12),
        413,
        f"the request is {10**12} bytes; the limit is {MAX_UPLOAD_BYTES} bytes",
    ),
    "wrong content type": (
        lambda s: send(s, b"image=tile.jpg", content_type="text/plain"),
        415,
        "the body is text/plain; expected multipart/form-data",
    ),
    "JSON body": (
        lambda s: send(s, b'{"image": "aGVsbG8="}', content_type="application/json"),
        415,
        "expected multipart/form-data",
    ),
    "garbage multipart": (
        lambda s: send(s, bytes(range(256)) * 8),
        400,
        "the multipart body does not parse",
    ),
    "wrong boundary": (
        lambda s: send(s, multipart("image", "tile.jpg", TILE_BYTES), content_type="multipart/form-data; boundary=zz"),
        400,
        "the multipart body does not parse",
    ),
    # Once answered "image: Field required" (the form parser dropped the unfinished part): now named.
    "body cut before its closing boundary": (
        lambda s: send(s, multipart("image", "tile.jpg", TILE_BYTES)[: -len(BOUNDARY) - 6]),
        400,
        "the multipart body ends before its closing boundary",
    ),
    "multipart without a boundary": (
        lambda s: send(s, multipart("image", "tile.jpg", TILE_BYTES), content_type="multipart/form-data"),
        415,
        "without a boundary; expected multipart/form-data; boundary=",
    ),
}
REQUESTS = 200
CLIENTS = 4


def test_good_tiles_among_bad_bodies_from_several_clients_get_exact_answers_and_no_5xx(
    served: BentoServer, reference: dict[str, dict[str, Any]]
) -> None:
    kinds = list(BAD)
    # Every other request is good; the bad ones cycle through every kind (8 or 9 of each of 12 kinds).
    plan = [
        ("good", GOOD_TILES[(i // 2) % len(GOOD_TILES)]) if i % 2 == 0 else (kinds[(i // 2) % len(kinds)], None)
        for i in range(REQUESTS)
    ]

    def run(step: tuple[str, Path | None]) -> tuple[str, Path | None, Reply]:
        kind, tile = step
        reply = post_tile(served, tile) if tile is not None else BAD[kind][0](served)
        return kind, tile, reply

    log_start = len(served.log())  # the session's server also answered other test files: judge this test's lines
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = list(pool.map(run, plan))

    assert len(results) == REQUESTS
    server_errors = [(kind, r.status, r.body[:200]) for kind, _, r in results if r.status >= 500]
    assert not server_errors, server_errors
    for kind, tile, reply in results:
        if tile is not None:
            assert_matches(reply, tile, reference)
            continue
        _, status, phrase = BAD[kind]
        assert reply.status == status, f"{kind}: HTTP {reply.status}: {reply.body[:300]!r}"
        assert phrase in reply.json()["error"], f"{kind}: {reply.json()}"
    assert sum(1 for kind, _, _ in results if kind == "good") == REQUESTS // 2
    # Refusals are one WARNING line each, not an ERROR with a traceback.
    log = served.log()[log_start:]
    assert log.count("[WARNING]") >= REQUESTS // 2
    assert "Traceback" not in log
    assert "[ERROR]" not in log
