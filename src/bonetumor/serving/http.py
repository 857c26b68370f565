"""HTTP hygiene in front of the service: every malformed request gets a 4xx that says what was expected.

BentoML turns a wrong multipart field into an HTTP 500 (its form decoder fails on it), a JSON body to an upload
endpoint into a pydantic traceback, and ``GET /model_info`` into a bare 405. :class:`UploadGuard` is a plain
ASGI middleware that checks an upload request before BentoML parses it: the method, the content type, the size,
and the form's field names, read from the part headers only (the parts' bytes stay in memory, nothing is written
to disk). A request that passes is replayed to BentoML unchanged. Refusals are logged as one WARNING line.

A *spooled* endpoint (``/assess``: whole slides, up to gigabytes) is handled differently, because BentoML's task
submit (``POST /assess/submit``) reads the whole body into memory and stores it, base64-encoded, in its task
database for 24 hours. The guard refuses a declared ``Content-Length`` over the endpoint's limit before reading
anything, then parses the form as it arrives, checking each part's field name as its headers end and writing the
file part's bytes straight to a private temporary folder (counting them, so a chunked body over the limit is
refused too). BentoML then gets a small JSON body ``{"upload_id": "<hex>"}`` instead of the file; the task takes
the file with :func:`take_spooled` and removes it. Whatever happens downstream, the guard removes the folder once
BentoML has finished with the request, which for a task includes running it: in BentoML 1.4 the local task
runner runs a submitted task as a background task of the submit response, inside the ASGI call.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

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
        example: The example file name in the usage line.
        spool: Stream the file to a private temporary folder and hand BentoML ``{"upload_id": ...}`` instead of
            the form (see the module docstring). Takes one file and no other field.
        max_bytes: Largest request body here; None = the guard's limit.
        limit_setting: The setting that sets ``max_bytes``, named in the 413 message.
    """

    files: str
    many: bool = False
    optional_fields: tuple[str, ...] = ()
    example: str = "tile.jpg"
    spool: bool = False
    max_bytes: int | None = None
    limit_setting: str = "serving.max_upload_bytes"

    def __post_init__(self) -> None:
        if self.spool and (self.many or self.optional_fields):
            raise ValueError("a spooled upload endpoint takes exactly one file and no other field")

    def usage(self, path: str) -> str:
        """How to call it, for error messages."""
        extra = "".join(f" [-F {name}=...]" for name in self.optional_fields)
        stem, dot, suffix = self.example.rpartition(".")
        files = (
            f"-F {self.files}=@{stem}1{dot}{suffix} -F {self.files}=@{stem}2{dot}{suffix}"
            if self.many
            else f"-F {self.files}=@{self.example}"
        )
        return f"POST {path} as multipart/form-data: curl {files}{extra} http://HOST{path}"


class RequestRejectedError(Exception):
    """A request the guard refuses, with the HTTP status and the message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type.

    Raises:
        RequestRejectedError: 415, the body is of another type or has no boundary.
    """
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data":
        raise RequestRejectedError(
            415, f"the body is {content_type or 'of no declared type'}; expected multipart/form-data"
        )
    if not boundary:
        raise RequestRejectedError(
            415, f"the body is {content_type} without a boundary; expected multipart/form-data; boundary=..."
        )
    return bytes(boundary)


def form_fields(body: bytes, content_type: str) -> list[tuple[str, bool]]:
    """Return the ``(name, is_file)`` of every part of a multipart body, reading part headers only.

    Raises:
        RequestRejectedError: The body is not ``multipart/form-data`` with a boundary, does not parse, or ends
            before its closing boundary.
    """
    boundary = multipart_boundary(content_type)
    parts: list[tuple[str, bool]] = []
    header: dict[str, bytes] = {"field": b"", "value": b""}
    disposition: list[bytes] = []
    ended: list[bool] = []

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
            "on_end": lambda: ended.append(True),
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestRejectedError(400, f"the multipart body does not parse ({exc})") from exc
    if parts and not ended:
        # The form parser downstream would drop the unfinished part and report its field as missing.
        raise RequestRejectedError(400, "the multipart body ends before its closing boundary (incomplete upload)")
    return parts


def check_fields(parts: list[tuple[str, bool]], endpoint: UploadEndpoint, path: str, complete: bool = True) -> None:
    """Refuse a form whose fields are not the endpoint's: unknown, missing, repeated or of the wrong kind.

    Args:
        parts: ``(name, is_file)`` of the parts so far.
        endpoint: What the endpoint accepts.
        path: The request path, for the usage line.
        complete: Whether every part is in ``parts``; False checks a form still arriving (no "missing" check).

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
    if not files and complete:
        raise RequestRejectedError(400, f"no {endpoint.files!r} field in the form. {usage}")
    if not all(files):
        raise RequestRejectedError(400, f"field {endpoint.files!r} holds text, not a file. {usage}")
    if len(files) > 1 and not endpoint.many:
        raise RequestRejectedError(400, f"{len(files)} files in field {endpoint.files!r}; {path} takes one. {usage}")
    for name in endpoint.optional_fields:
        if sum(1 for n, _ in parts if n == name) > 1:
            raise RequestRejectedError(400, f"field {name!r} given more than once. {usage}")


#: Prefix of the private folder each spooled upload gets (under ``TMPDIR``).
SPOOL_PREFIX = "bonetumor-upload-"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


def safe_filename(name: str) -> str:
    """The client's file name reduced to a safe base name: no folders, no odd characters, the suffix kept."""
    base = re.split(r"[\\/]", name)[-1]
    base = re.sub(r"[^\w.+()\- ]", "_", base).strip(" .")
    if len(base) > 120:
        suffix = Path(base).suffix[:16]
        base = base[: 120 - len(suffix)] + suffix
    return base or "upload"


@dataclass(frozen=True)
class SpooledUpload:
    """An upload the guard wrote to its own temporary folder.

    Attributes:
        upload_id: The id BentoML gets instead of the file.
        path: The file (alone in its folder).
        filename: The client's file name, made safe (:func:`safe_filename`).
        size: Bytes.
    """

    upload_id: str
    path: Path
    filename: str
    size: int

    def remove(self) -> None:
        """Delete the file and its folder (no error if already gone)."""
        shutil.rmtree(self.path.parent, ignore_errors=True)


_spooled: dict[str, SpooledUpload] = {}
_spooled_lock = threading.Lock()


def take_spooled(upload_id: str) -> SpooledUpload:
    """Hand over a spooled upload, once: the taker reads it and calls :meth:`SpooledUpload.remove`.

    Raises:
        KeyError: No such upload in this process (unknown, already taken, or its request is over).
    """
    if not _UPLOAD_ID.fullmatch(upload_id):
        raise KeyError(upload_id)
    with _spooled_lock:
        return _spooled.pop(upload_id)


def _register(upload: SpooledUpload) -> None:
    with _spooled_lock:
        _spooled[upload.upload_id] = upload


def _forget(upload: SpooledUpload) -> None:
    with _spooled_lock:
        _spooled.pop(upload.upload_id, None)
    upload.remove()


class _SpoolingForm:
    """Parses a multipart form as it arrives: field names checked part by part, the file written to disk."""

    def __init__(self, boundary: bytes, endpoint: UploadEndpoint, path: str) -> None:
        self.endpoint = endpoint
        self.path = path
        self.parts: list[tuple[str, bool]] = []
        self.folder: Path | None = None
        self.file_path: Path | None = None
        self.filename = ""
        self.size = 0
        self.ended = False
        self._handle: IO[bytes] | None = None
        self._header: dict[str, bytes] = {"field": b"", "value": b""}
        self._disposition: list[bytes] = []
        self._parser = MultipartParser(
            boundary,
            {
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header["field"] += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header["value"] += data[start:end]

    def _on_header_end(self) -> None:
        if self._header["field"].lower() == b"content-disposition":
            self._disposition.append(self._header["value"])
        self._header["field"], self._header["value"] = b"", b""

    def _on_headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition[-1] if self._disposition else b"")
        self._disposition.clear()
        name = params.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in params
        self.parts.append((name, is_file))
        check_fields(self.parts, self.endpoint, self.path, complete=False)  # refuse at the first wrong part
        if name == self.endpoint.files and is_file:
            self.filename = safe_filename(params.get(b"filename", b"").decode("utf-8", "replace"))
            self.folder = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX))
            self.file_path = self.folder / self.filename
            self._handle = self.file_path.open("xb")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._handle is not None:
            self._handle.write(data[start:end])
            self.size += end - start

    def _on_part_end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _on_end(self) -> None:
        self.ended = True

    def write(self, chunk: bytes) -> None:
        """Parse the next bytes of the body.

        Raises:
            RequestRejectedError: A wrong field (400), or a body that does not parse (400).
        """
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise RequestRejectedError(400, f"the multipart body does not parse ({exc})") from exc

    def finish(self) -> SpooledUpload:
        """Check the complete form and return the spooled file.

        Raises:
            RequestRejectedError: A missing field, or a body cut before its closing boundary (400).
        """
        check_fields(self.parts, self.endpoint, self.path)
        if not self.ended or self.file_path is None:
            raise RequestRejectedError(400, "the multipart body ends before its closing boundary (incomplete upload)")
        return SpooledUpload(uuid.uuid4().hex, self.file_path, self.filename, self.size)

    def discard(self) -> None:
        """Close and delete whatever was written."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class UploadGuard:
    """ASGI middleware: refuse malformed upload requests with a 4xx and a message, answer ``GET`` info routes.

    Args:
        app: The application behind it (BentoML's).
        endpoints: Upload paths and what they accept.
        max_bytes: Largest accepted request body, where the endpoint sets no ``max_bytes`` of its own.
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
        if endpoint.spool:
            await self._spooled(scope, receive, send, endpoint, path)
            return
        try:
            body = await self._checked_body(scope, receive, endpoint, path)
        except RequestRejectedError as exc:
            await _refuse(send, scope, path, exc)
            return
        await self.app(scope, _replay(body, receive), send)

    def _headers(self, scope: Scope, endpoint: UploadEndpoint, path: str) -> tuple[dict[str, str], int]:
        """The request's headers and the endpoint's limit; refuse a wrong method or a declared size over it."""
        if scope["method"] != "POST":
            raise RequestRejectedError(405, f"{scope['method']} is not accepted here. {endpoint.usage(path)}")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        limit = endpoint.max_bytes if endpoint.max_bytes is not None else self.max_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestRejectedError(
                413, f"the request is {declared} bytes; the limit is {limit} bytes ({endpoint.limit_setting})"
            )
        return headers, limit

    async def _checked_body(self, scope: Scope, receive: Receive, endpoint: UploadEndpoint, path: str) -> bytes:
        headers, limit = self._headers(scope, endpoint, path)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRejectedError(400, "the client disconnected before the body was complete")
            body += message.get("body", b"")
            if len(body) > limit:
                raise _over_limit(limit, endpoint)
            if not message.get("more_body", False):
                break
        check_fields(form_fields(bytes(body), headers.get("content-type", "")), endpoint, path)
        return bytes(body)

    async def _spooled(self, scope: Scope, receive: Receive, send: Send, endpoint: UploadEndpoint, path: str) -> None:
        """Stream the upload to disk, pass BentoML its id as JSON, and delete the file when BentoML is done."""
        try:
            upload = await self._spool(scope, receive, endpoint, path)
        except RequestRejectedError as exc:
            await _refuse(send, scope, path, exc)
            return
        _register(upload)
        body = json.dumps({"upload_id": upload.upload_id}).encode()
        try:
            await self.app(_as_json(scope, body), _replay(body, receive), send)
        finally:
            _forget(upload)  # the task has run by now (BentoML runs it as the submit's background task)

    async def _spool(self, scope: Scope, receive: Receive, endpoint: UploadEndpoint, path: str) -> SpooledUpload:
        headers, limit = self._headers(scope, endpoint, path)
        form = _SpoolingForm(multipart_boundary(headers.get("content-type", "")), endpoint, path)
        received = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise RequestRejectedError(400, "the client disconnected before the body was complete")
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise _over_limit(limit, endpoint)
                form.write(chunk)
                if not message.get("more_body", False):
                    break
            return form.finish()
        except BaseException:
            form.discard()
            raise


def _over_limit(limit: int, endpoint: UploadEndpoint) -> RequestRejectedError:
    return RequestRejectedError(
        413, f"the request is over the limit; the limit is {limit} bytes ({endpoint.limit_setting})"
    )


async def _refuse(send: Send, scope: Scope, path: str, exc: RequestRejectedError) -> None:
    log.warning("%s %s -> %d: %s", scope["method"], path, exc.status, exc.message)
    await _send_json(send, exc.status, {"error": exc.message})


def _as_json(scope: Scope, body: bytes) -> Scope:
    """The request as a ``POST`` of ``body`` as JSON (the spooled upload's id instead of the form)."""
    dropped = (b"content-type", b"content-length", b"transfer-encoding")
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in dropped]
    return {
        **scope,
        "headers": [*headers, (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }


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
