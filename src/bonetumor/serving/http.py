"""HTTP hygiene in front of the service: every malformed request gets a 4xx that says what was expected.

BentoML turns a wrong multipart field into an HTTP 500 (its form decoder fails on it), a JSON body to an upload
endpoint into a pydantic traceback, and ``GET /model_info`` into a bare 405. :class:`UploadGuard` is a plain
ASGI middleware that checks an upload request before BentoML parses it: the method, the content type, the size,
and the form's field names, read from the part headers only (the parts' bytes stay in memory, nothing is written
to disk). A request that passes is replayed to BentoML unchanged. Refusals are logged as one WARNING line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class UploadEndpoint:
    """What one upload endpoint accepts.

    Attributes:
        files: The file field and whether it may repeat (``images`` of ``/predict_batch``).
        many: Whether the file field may appear more than once.
        optional_fields: Text fields it also accepts (``target`` of ``/explain``).
    """

    files: str
    many: bool = False
    optional_fields: tuple[str, ...] = ()

    def usage(self, path: str) -> str:
        """How to call it, for error messages."""
        extra = "".join(f" [-F {name}=...]" for name in self.optional_fields)
        files = f"-F {self.files}=@tile1.jpg -F {self.files}=@tile2.jpg" if self.many else f"-F {self.files}=@tile.jpg"
        return f"POST {path} as multipart/form-data: curl {files}{extra} http://HOST{path}"


class RequestRejectedError(Exception):
    """A request the guard refuses, with the HTTP status and the message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def form_fields(body: bytes, content_type: str) -> list[tuple[str, bool]]:
    """Return the ``(name, is_file)`` of every part of a multipart body, reading part headers only.

    Raises:
        RequestRejectedError: The body is not ``multipart/form-data`` with a boundary, or does not parse.
    """
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise RequestRejectedError(
            415, f"the body is {content_type or 'of no declared type'}; expected multipart/form-data"
        )
    parts: list[tuple[str, bool]] = []
    header: dict[str, bytes] = {"field": b"", "value": b""}
    disposition: list[bytes] = []

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        if header["field"].lower() == b"content-disposition":
            disposition.append(header["value"])
        header["field"], header["value"] = b"", b""

    def on_headers_finished() -> None:
        _, params = parse_options_header(disposition[-1] if disposition else b"")
        parts.append((params.get(b"name", b"").decode("utf-8", "replace"), b"filename" in params))
        disposition.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestRejectedError(400, f"the multipart body does not parse ({exc})") from exc
    return parts


def check_fields(parts: list[tuple[str, bool]], endpoint: UploadEndpoint, path: str) -> None:
    """Refuse a form whose fields are not the endpoint's: unknown, missing, repeated or of the wrong kind.

    Raises:
        RequestRejectedError: With status 400 and what was expected.
    """
    usage = endpoint.usage(path)
    allowed = {endpoint.files, *endpoint.optional_fields}
    unknown = sorted({name for name, _ in parts} - allowed)
    if unknown:
        raise RequestRejectedError(
            400, f"unexpected form field(s) {unknown}; expected the file in field {endpoint.files!r}. {usage}"
        )
    files = [is_file for name, is_file in parts if name == endpoint.files]
    if not files:
        raise RequestRejectedError(400, f"no {endpoint.files!r} field in the form. {usage}")
    if not all(files):
        raise RequestRejectedError(400, f"field {endpoint.files!r} holds text, not a file. {usage}")
    if len(files) > 1 and not endpoint.many:
        raise RequestRejectedError(400, f"{len(files)} files in field {endpoint.files!r}; {path} takes one. {usage}")
    for name in endpoint.optional_fields:
        if sum(1 for n, _ in parts if n == name) > 1:
            raise RequestRejectedError(400, f"field {name!r} given more than once. {usage}")


class UploadGuard:
    """ASGI middleware: refuse malformed upload requests with a 4xx and a message, answer ``GET`` info routes.

    Args:
        app: The application behind it (BentoML's).
        endpoints: Upload paths and what they accept.
        max_bytes: Largest accepted request body.
        get_as_post: Paths whose ``GET`` is served as ``POST`` with an empty JSON body (``/model_info``).
    """

    def __init__(
        self,
        app: ASGIApp,
        endpoints: Mapping[str, UploadEndpoint],
        max_bytes: int,
        get_as_post: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.endpoints = dict(endpoints)
        self.max_bytes = max_bytes
        self.get_as_post = get_as_post

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check an HTTP request to an upload endpoint, then pass it on (replaying its body) or refuse it."""
        path = scope.get("path", "")
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if path in self.get_as_post and scope["method"] == "GET":
            await self.app(_as_post(scope), _replay(b"{}", receive), send)
            return
        endpoint = self.endpoints.get(path)
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        try:
            body = await self._checked_body(scope, receive, endpoint, path)
        except RequestRejectedError as exc:
            log.warning("%s %s -> %d: %s", scope["method"], path, exc.status, exc.message)
            await _send_json(send, exc.status, {"error": exc.message})
            return
        await self.app(scope, _replay(body, receive), send)

    async def _checked_body(self, scope: Scope, receive: Receive, endpoint: UploadEndpoint, path: str) -> bytes:
        if scope["method"] != "POST":
            raise RequestRejectedError(405, f"{scope['method']} is not accepted here. {endpoint.usage(path)}")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise RequestRejectedError(413, f"the request is {declared} bytes; the limit is {self.max_bytes} bytes")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRejectedError(400, "the client disconnected before the body was complete")
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise RequestRejectedError(413, f"the request is over the limit of {self.max_bytes} bytes")
            if not message.get("more_body", False):
                break
        check_fields(form_fields(bytes(body), headers.get("content-type", "")), endpoint, path)
        return bytes(body)


def _as_post(scope: Scope) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    return {
        **scope,
        "method": "POST",
        "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", b"2")],
    }


def _replay(body: bytes, upstream: Receive | None = None) -> Receive:
    """A ``receive`` that hands the buffered body over once, then waits on the real connection (disconnects)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await upstream() if upstream is not None else {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
