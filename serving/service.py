"""BentoML service: the registered champion for applications (``/predict``...) and clinicians (``/ui``).

Run from this folder: ``bentoml serve service:BoneTumorClassifier`` (``make serve`` does). The model is
``models:/<register.model_name>@<register.alias>`` from params.yaml, loaded from ``MLFLOW_TRACKING_URI`` or,
when unset, from the project's own MLflow database. ``BONETUMOR_PROJECT_DIR`` names the project folder (default:
this folder's parent), ``BONETUMOR_MODEL_ALIAS`` serves another alias or pins a version number.

Routes: ``POST /predict`` (field ``image``), ``POST /predict_batch`` (field ``images``, repeated),
``POST /explain`` (field ``image``, optional ``target``), ``GET|POST /model_info``, the page at ``/ui/``, and
BentoML's ``/livez``, ``/readyz`` (ready once the model is loaded) and ``/metrics``.

All logic is in the ``bonetumor`` package (:class:`bonetumor.serving.served.ServedModel`); this file only adapts
it to HTTP: it takes the upload as bytes, turns the package's errors into 4xx answers with the reason, writes
the prediction log and counts labels and referrals for Prometheus.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import bentoml
import yaml
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

import bonetumor.serving
from bonetumor.config import ServingConfig
from bonetumor.errors import ConfigError, InvalidImageError
from bonetumor.serving.audit import PredictionLog
from bonetumor.serving.http import UploadEndpoint, UploadGuard

if TYPE_CHECKING:
    from bonetumor.serving.served import ServedModel

log = logging.getLogger("bonetumor.service")

PROJECT_DIR = Path(os.environ.get("BONETUMOR_PROJECT_DIR", Path(__file__).resolve().parent.parent))
UI_DIR = Path(bonetumor.serving.__file__).with_name("ui")
UPLOADS = {
    "/predict": UploadEndpoint("image"),
    "/predict_batch": UploadEndpoint("images", many=True),
    "/explain": UploadEndpoint("image", optional_fields=("target",)),
}


def _serving_config() -> ServingConfig:
    # Read when the service is defined, for the upload limit the guard enforces. Only the serving section, so
    # that `bentoml serve`'s supervising process does not import torch; the worker validates the whole file.
    path = PROJECT_DIR / "params.yaml"
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return ServingConfig(**(raw.get("serving") or {}))
    except (TypeError, ValidationError) as exc:
        raise ConfigError(f"{path}: serving: {exc}") from exc


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


ui = Starlette(routes=[Mount("/", StaticFiles(directory=UI_DIR, html=True), name="ui")])


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

    def __is_ready__(self) -> bool:
        """Ready once a model is loaded (``__init__`` loads it before the worker takes requests)."""
        return self.holder.current is not None

    def _record(self, answer: dict[str, Any], endpoint: str, model: ServedModel) -> None:
        if "label" in answer:
            referred = str(answer["referral"]["refer"]).lower()
            self.answers.labels(answer["label"], referred, model.version, model.engine_name).inc()
        if self.prediction_log is not None:
            self.prediction_log.write({**answer, "endpoint": endpoint})

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
        self._record(
            {k: v for k, v in answer.items() if not k.startswith("heatmap") and k != "overlay_png"}, "/explain", model
        )
        return answer

    @bentoml.api
    def model_info(self) -> dict[str, Any]:
        """The served model: name, version, run id, training date, runtime and why, and input checks.

        Also its preprocessing, referral rule and provenance (data version, git commit, params hash, MLflow run
        ids), and the last check of where the alias points. Answers ``GET`` too.
        """
        return self.holder.current.info() | {"alias_check": self.holder.last_check}


# The decorators made the class a bentoml Service, which mypy cannot see.
cast(Any, BoneTumorClassifier).add_asgi_middleware(
    UploadGuard, endpoints=UPLOADS, max_bytes=_serving_config().max_upload_bytes, get_as_post=("/model_info",)
)
