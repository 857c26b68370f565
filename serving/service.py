"""BentoML service: the registered champion for applications (``/predict``...) and clinicians (``/ui``).

Run from this folder: ``bentoml serve service:BoneTumorClassifier`` (``make serve`` does). The model is
``models:/<register.model_name>@<register.alias>`` from params.yaml, loaded from ``MLFLOW_TRACKING_URI`` or,
when unset, from the project's own MLflow database. ``BONETUMOR_PROJECT_DIR`` names the project folder (default:
this folder's parent), ``BONETUMOR_MODEL_ALIAS`` serves another alias or pins a version number.

Routes: ``POST /predict`` (field ``image``), ``POST /predict_batch`` (field ``images``, repeated),
``POST /explain`` (field ``image``, optional ``target``), ``GET|POST /model_info``, the whole-slide task
``POST /assess/submit`` (field ``slide``) with ``GET /assess/status?task_id=`` and ``GET /assess/get?task_id=``,
the pages at ``/ui/`` (tiles) and ``/ui/assess`` (slides), an assessment's progress at
``GET /ui/assess/progress/<task_id>`` and its files at ``GET /ui/assess/results/<task_id>/<file>``, and
BentoML's ``/livez``, ``/readyz`` (ready once the model is loaded) and ``/metrics``.

All logic is in the ``bonetumor`` package (:class:`bonetumor.serving.served.ServedModel`); this file only adapts
it to HTTP: it takes the upload as bytes, turns the package's errors into 4xx answers with the reason, writes
the prediction log and counts labels and referrals for Prometheus.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio
import bentoml
import yaml
from bentoml.exceptions import BentoMLException, NotFound
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import bonetumor.serving
from bonetumor.config import AssessConfig, ServingConfig, TrackingConfig
from bonetumor.errors import ConfigError, InvalidImageError
from bonetumor.runtime import absolute_tracking_uri, check_registry_store
from bonetumor.serving.audit import PredictionLog
from bonetumor.serving.http import SpooledUpload, UploadEndpoint, UploadGuard, take_spooled
from bonetumor.serving.progress import AssessProgress
from bonetumor.utils import sha256_file

if TYPE_CHECKING:
    from bonetumor.serving.served import ServedModel

log = logging.getLogger("bonetumor.service")

PROJECT_DIR = Path(os.environ.get("BONETUMOR_PROJECT_DIR", Path(__file__).resolve().parent.parent))
UI_DIR = Path(bonetumor.serving.__file__).with_name("ui")
_Section = TypeVar("_Section", ServingConfig, AssessConfig, TrackingConfig)


def _section(name: str, cls: type[_Section]) -> _Section:
    # Read when the service is defined, for the upload limits the guard enforces and the results folder the page
    # serves. One section only, so that `bentoml serve`'s supervising process does not import torch; the worker
    # validates the whole file.
    path = PROJECT_DIR / "params.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return cls(**(raw.get(name) or {}))
    except (TypeError, ValidationError) as exc:
        raise ConfigError(f"{path}: {name}: {exc}") from exc


def _serving_config() -> ServingConfig:
    return _section("serving", ServingConfig)


def _check_registry_reachable() -> str:
    """The registry's quick check, without MLflow (whose import costs the supervising process seconds and a GB)."""
    uri = absolute_tracking_uri(
        os.environ.get("MLFLOW_TRACKING_URI") or _section("tracking", TrackingConfig).uri, PROJECT_DIR
    )
    return check_registry_store(uri)


_ASSESS = _section("assess", AssessConfig)
#: Where each assessment's files are kept, one folder per task id.
RESULTS_DIR = PROJECT_DIR / _ASSESS.results_dir
#: An assessment's id: its BentoML task id (uuid4 hex). Anything else in a URL is refused (no path traversal).
ASSESS_ID = re.compile(r"[0-9a-f]{32}")
_SLIDE = UploadEndpoint(
    "slide",
    example="slide.svs",
    spool=True,
    max_bytes=_ASSESS.max_upload_bytes,
    limit_setting="assess.max_upload_bytes",
)
UPLOADS = {
    "/predict": UploadEndpoint("image"),
    "/predict_batch": UploadEndpoint("images", many=True),
    "/explain": UploadEndpoint("image", optional_fields=("target",)),
    "/assess": _SLIDE,
    "/assess/submit": _SLIDE,
}


def _take(upload: Path) -> bytes:
    """Read an upload that BentoML spooled to its request folder, and delete it: nothing of it stays on disk."""
    try:
        return upload.read_bytes()
    finally:
        upload.unlink(missing_ok=True)


def _name(upload: Path) -> str:
    # BentoML spools an upload with tempfile: "tmp" + 8 random characters + the client's file name, which is
    # what error messages should name.
    name = upload.name
    return name[11:] if name.startswith("tmp") and len(name) > 11 else name


def _without_paths(message: str, upload: SpooledUpload) -> str:
    # The package names the file it was given: the client should read its own file name, not the server's folder.
    return message.replace(str(upload.path), upload.filename).replace(str(upload.path.parent), "")


def _rejected(status: int, message: str, path: str) -> Any:
    # One line at WARNING, no traceback: a bad upload is the client's mistake, not the server's.
    log.warning("%s -> %d: %s", path, status, message)
    return JSONResponse({"error": message}, status_code=status)


class _ClientErrorsInOneLine(logging.Filter):
    """BentoML logs every refused request (a pydantic error, a 4xx) at ERROR with a traceback: make it one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        client_error = isinstance(exc, ValidationError) or (
            isinstance(exc, BentoMLException) and int(exc.error_code) < 500
        )
        if client_error:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            record.msg, record.args = f"{record.getMessage()}: client error: {first_line}", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


PROGRESS = AssessProgress()
#: Output file name to (media type, whether it downloads rather than shows).
RESULT_MEDIA = {
    "overlay.png": ("image/png", False),
    "assessment.json": ("application/json", False),
    "tiles.geojson": ("application/geo+json", True),
    "tiles.csv": ("text/csv", True),
}


async def _assess_page(request: Request) -> Response:
    return FileResponse(UI_DIR / "assess.html", media_type="text/html")


async def _assess_progress(request: Request) -> Response:
    task_id = request.path_params["task_id"]
    entry = PROGRESS.get(task_id) if ASSESS_ID.fullmatch(task_id) else None
    if entry is None:
        return JSONResponse({"error": f"no assessment {task_id!r} on this server; expected a task id"}, 404)
    return JSONResponse(entry, headers={"Cache-Control": "no-store"})


async def _assess_result(request: Request) -> Response:
    result_id, name = request.path_params["result_id"], request.path_params["name"]
    path = RESULTS_DIR / result_id / name
    if not ASSESS_ID.fullmatch(result_id) or name not in RESULT_MEDIA or not path.is_file():
        return JSONResponse({"error": "no such assessment file"}, 404)
    media, download = RESULT_MEDIA[name]
    if download:
        return FileResponse(path, media_type=media, filename=f"{result_id}-{name}")
    return FileResponse(path, media_type=media)


ui = Starlette(
    routes=[
        Route("/assess", _assess_page, methods=["GET"]),
        Route("/assess/progress/{task_id}", _assess_progress, methods=["GET"]),
        Route("/assess/results/{result_id}/{name}", _assess_result, methods=["GET"]),
        Mount("/", StaticFiles(directory=UI_DIR, html=True), name="ui"),
    ]
)


@bentoml.asgi_app(ui, path="/ui")
@bentoml.service(name="bone-tumor-classifier", traffic={"timeout": 60}, threads=_serving_config().api_threads)
class BoneTumorClassifier:
    """Classifies H&E tiles into Non-Tumor, Non-Viable-Tumor or Viable-Tumor, explains them, and serves the page."""

    def __init__(self) -> None:
        # Imported here, in the worker: torch, ONNX Runtime and MLflow take seconds to import, and `bentoml serve`
        # imports this module once more in its supervising process, which never loads a model.
        from bonetumor.registry.model_registry import open_served_model

        logging.getLogger("bentoml._internal.server.http_app").addFilter(_ClientErrorsInOneLine())

        self.holder, config = open_served_model(PROJECT_DIR / "params.yaml", os.environ.get("BONETUMOR_MODEL_ALIAS"))
        self.holder.start()
        serving = config.serving
        self.prediction_log = (
            PredictionLog(
                PROJECT_DIR / serving.prediction_log, serving.prediction_log_max_bytes, serving.prediction_log_backups
            )
            if serving.prediction_log
            else None
        )
        self.max_batch_files = serving.max_batch_files
        self.assess_config = config.assess
        # One assessment at a time, outside BentoML's request threads: a slide does not hold up /predict.
        self._assess_turn: anyio.CapacityLimiter | None = None
        self.answers = bentoml.metrics.Counter(
            name="bonetumor_answers",
            documentation="Tiles answered, by label, referral and the model version that answered",
            labelnames=["label", "referred", "version", "runtime"],
        )
        self.rejections = bentoml.metrics.Counter(
            name="bonetumor_rejected_uploads",
            documentation="Uploads refused with a 4xx by the service (not an image, too small...)",
            labelnames=["endpoint"],
        )

    @bentoml.on_deployment
    def check_registry_first() -> None:
        """Before any worker starts (once, in ``bentoml serve``'s own process): stop when the registry is unusable.

        A worker that fails to load is restarted by BentoML for ever, each time after importing torch and after
        MLflow's minutes of retries against a dead server; this check fails ``make serve`` in seconds instead, with
        exit status 1 and one line naming the tracking URI and what to do.
        """
        try:
            log.info("%s", _check_registry_reachable())
        except ConfigError as exc:
            raise SystemExit(f"bonetumor service: cannot start: {exc}") from exc

    def __is_ready__(self) -> bool:
        """Ready once a model is loaded (``__init__`` loads it before the worker takes requests)."""
        return self.holder.current is not None

    def _record(self, answer: dict[str, Any], endpoint: str, model: ServedModel) -> None:
        if "label" in answer:
            referred = str(answer["referral"]["refer"]).lower()
            self.answers.labels(answer["label"], referred, model.version, model.engine_name).inc()
        if self.prediction_log is not None:
            self.prediction_log.write({**answer, "endpoint": endpoint})
        answer.pop("drift_features", None)  # for the log only: the client gets the answer

    @bentoml.api
    def predict(self, image: Path) -> dict[str, Any]:
        """Classify one tile (multipart field ``image``: JPEG, PNG or TIFF, at least the model's minimum size).

        Returns ``label``, calibrated ``probabilities``, ``confidence``, ``referral`` (``refer``, ``reason``),
        ``tissue_fraction``, the audit fields ``request_id``, ``timestamp``, ``input_sha256``, and ``model``
        (name, version, MLflow run id and runtime of the version that answered). A bad upload gets a 4xx
        saying what was expected.
        """
        model = self.holder.current  # once per request: an alias move mid-request does not mix versions
        try:
            answer = model.answer(_take(image), source=_name(image))
        except InvalidImageError as exc:
            self.rejections.labels("/predict").inc()
            return _rejected(400, str(exc), "/predict")
        self._record(answer, "/predict", model)
        return answer

    @bentoml.api
    def predict_batch(self, images: list[Path]) -> dict[str, Any]:
        """Classify several tiles in one request (field ``images``, repeated) with one engine call.

        Returns ``results``: one entry per file, in order: an answer as ``/predict`` gives, or ``error`` (why
        the file was refused) with the file's audit fields. One bad file does not lose the others' answers.
        """
        if len(images) > self.max_batch_files:
            return _rejected(
                413,
                f"{len(images)} files; the limit is {self.max_batch_files} (serving.max_batch_files)",
                "/predict_batch",
            )
        model = self.holder.current
        results = model.answer_many([(_name(path), _take(path)) for path in images])
        for result in results:
            if "error" in result:
                self.rejections.labels("/predict_batch").inc()
            self._record(result, "/predict_batch", model)
        return {"results": results, "model": model.model_fields}

    @bentoml.api
    def explain(self, image: Path, target: str | None = None) -> dict[str, Any]:
        """Grad-CAM of a tile for its predicted class, or for ``target`` (a class name), over the same crops.

        Returns the ``/predict`` answer plus ``target``, ``heatmap`` (rows of values in [0, 1] at the tile size),
        ``heatmap_size``, ``heatmap_png`` (base64 PNG in jet colours) and ``overlay_png`` (base64 PNG of the
        heatmap blended on the tile as the model saw it).
        """
        model = self.holder.current
        try:
            answer = model.explain(_take(image), source=_name(image), target=target or None)
        except (InvalidImageError, ConfigError) as exc:
            self.rejections.labels("/explain").inc()
            return _rejected(400, str(exc), "/explain")
        logged = {k: v for k, v in answer.items() if not k.startswith("heatmap") and k != "overlay_png"}
        self._record(logged, "/explain", model)
        answer.pop("drift_features", None)
        return answer

    @bentoml.task
    async def assess(self, upload_id: str, ctx: bentoml.Context) -> dict[str, Any]:
        """Assess a whole slide: percent necrosis with its interval, the response category, the map and exports.

        Send the slide as multipart field ``slide`` (``curl -F slide=@slide.svs http://HOST/assess/submit``):
        a whole-slide image OpenSlide reads, a pyramidal TIFF, a plain JPEG/PNG/TIFF, or a .zip of one slide's
        TCIA tiles named ``<slide>-<x>-<y>.jpg``, up to ``assess.max_upload_bytes``. The upload guard streams it
        to a private temporary folder and passes this method only its ``upload_id``; the folder is deleted when
        the assessment ends, whatever happens. Poll ``GET /assess/status?task_id=`` (and, for tiles read,
        ``GET /ui/assess/progress/<task_id>``), then ``GET /assess/get?task_id=``.

        Returns the summary of :func:`bonetumor.slide.assess.assess_slide` (``necrosis_percent``,
        ``necrosis_interval``, ``response``, ``tiles_per_class``, ``referred``, ``tumour_area_mm2``, ``model``,
        ``input`` with its sha256, ``request_id``, ``timestamp``...) plus ``result_id`` (the task id) and
        ``overlay_url``, ``geojson_url``, ``csv_url``, ``json_url`` under ``/ui/assess/results/<result_id>/``.
        An input that is not a readable slide ends the task as ``failed``, and ``/assess/get`` answers 400 with
        ``error`` naming the file and what was expected.
        """
        task_id = getattr(ctx.request.state, "task_id", None)  # None on the synchronous POST /assess
        result_id = task_id if isinstance(task_id, str) and ASSESS_ID.fullmatch(task_id) else uuid.uuid4().hex
        try:
            upload = take_spooled(upload_id)
        except KeyError:
            # A retry (POST /assess/retry) replays the upload id, but an upload is read once and deleted.
            message = "the upload is no longer kept (each upload is assessed once, then deleted); upload it again"
            ctx.response.status_code = 400
            return _rejected(400, message, "/assess")
        PROGRESS.start(result_id, upload.filename)
        finished = False
        try:
            if self._assess_turn is None:
                self._assess_turn = anyio.CapacityLimiter(1)
            async with self._assess_turn:
                answer = await anyio.to_thread.run_sync(self._assess_upload, upload, result_id)
            finished = True
        except InvalidImageError as exc:
            message = _without_paths(str(exc), upload)
            PROGRESS.update(result_id, "failed", error=message)
            self.rejections.labels("/assess").inc()
            ctx.response.status_code = 400
            return _rejected(400, message, "/assess")
        finally:
            upload.remove()
            if not finished and (PROGRESS.get(result_id) or {}).get("state") != "failed":
                # Anything else (a bug, a cancelled request) propagates; the page must not wait forever.
                PROGRESS.update(result_id, "failed", error="an unexpected error; see the server log")
        PROGRESS.update(result_id, "completed")
        return answer

    def _assess_upload(self, upload: SpooledUpload, result_id: str) -> dict[str, Any]:
        """Run one assessment in a worker thread; log it; on a bad input, log the refusal and raise."""
        from bonetumor.slide.assess import assess_slide

        model = self.holder.current  # once: an alias move mid-slide does not mix versions
        out_dir = RESULTS_DIR / result_id
        PROGRESS.update(result_id, "opening")
        finished = False
        try:
            assessment = assess_slide(
                upload.path,
                model,
                self.assess_config,
                out_dir,
                name=upload.filename,
                progress=False,
                on_progress=lambda done, total: PROGRESS.tiles(result_id, done, total),
            )
            finished = True
        except InvalidImageError as exc:
            if self.prediction_log is not None:
                self.prediction_log.write(
                    {
                        "request_id": uuid.uuid4().hex,
                        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
                        "input_sha256": sha256_file(upload.path),
                        "endpoint": "/assess",
                        "filename": upload.filename,
                        "error": _without_paths(str(exc), upload),
                    }
                )
            raise
        finally:
            if not finished:  # half-written outputs of a failed assessment are never linked
                shutil.rmtree(out_dir, ignore_errors=True)
        summary = assessment.summary
        links = {
            f"{kind}_url": f"/ui/assess/results/{result_id}/{path.name}" for kind, path in assessment.files.items()
        }
        if self.prediction_log is not None:
            self.prediction_log.write(
                {
                    "request_id": summary["request_id"],
                    "timestamp": summary["timestamp"],
                    "input_sha256": summary["input"]["sha256"],
                    "model": summary["model"],
                    "endpoint": "/assess",
                    "filename": summary["name"],
                    "assessment": {
                        key: summary[key]
                        for key in (
                            "tiles",
                            "tiles_per_class",
                            "necrosis_percent",
                            "necrosis_interval",
                            "tumour_area_mm2",
                        )
                    }
                    | {"referred_share": summary["referred"]["share"], "response": summary["response"]["category"]},
                }
            )
        return {**summary, "result_id": result_id, **links}

    @bentoml.api
    def model_info(self) -> dict[str, Any]:
        """The served model: name, version, run id, training date, runtime and why, and input checks.

        Also its preprocessing, referral rule and provenance (data version, git commit, params hash, MLflow run
        ids), and the last check of where the alias points. Answers ``GET`` too.
        """
        return self.holder.current.info() | {"alias_check": self.holder.last_check}

    @bentoml.api
    def model_card(self) -> str:
        """The served version's model card, as Markdown. Answers ``GET`` too.

        Intended use, data, metrics with intervals beside the baseline, calibration and referral, limitations,
        changes since the previous champion. A version registered before model cards answers 404 with the
        command that writes one.
        """
        model = self.holder.current
        if model.card is None:
            raise NotFound(
                f"{model.name} version {model.version} has no model card (registered before model cards, or its "
                f"card did not download: see the service log); `bonetumor model-card {model.version} --log` "
                "writes and logs one"
            )
        return model.card[0]


# The decorators made the class a bentoml Service, which mypy cannot see.
cast(Any, BoneTumorClassifier).add_asgi_middleware(
    UploadGuard,
    endpoints=UPLOADS,
    max_bytes=_serving_config().max_upload_bytes,
    get_as_post=("/model_info", "/model_card"),
)
