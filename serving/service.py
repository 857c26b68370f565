"""BentoML service: the registered champion behind ``POST /predict``.

Run from this folder: ``bentoml serve service:BoneTumorClassifier`` (``make serve`` does). The model is
``models:/<register.model_name>@<register.alias>`` from params.yaml, loaded from ``MLFLOW_TRACKING_URI`` or,
when unset, from the project's own MLflow database. ``BONETUMOR_PROJECT_DIR`` names the project folder (default:
this folder's parent), ``BONETUMOR_MODEL_ALIAS`` serves another alias or a version number.

All logic is in the ``bonetumor`` package; this file only adapts it to HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import InvalidArgument

from bonetumor.errors import InvalidImageError
from bonetumor.registry.model_registry import load_configured_predictor

#: Largest accepted upload. TCIA tiles are 1024 px JPEGs of well under 1 MB; whole-slide images do not belong here.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
PROJECT_DIR = Path(os.environ.get("BONETUMOR_PROJECT_DIR", Path(__file__).resolve().parent.parent))


@bentoml.service(name="bone-tumor-classifier", traffic={"timeout": 60})
class BoneTumorClassifier:
    """Classifies one H&E tile per request into Non-Tumor, Non-Viable-Tumor or Viable-Tumor."""

    def __init__(self) -> None:
        # Resolved once at start-up: every answer names the exact registered version that produced it.
        self.predictor = load_configured_predictor(PROJECT_DIR / "params.yaml", os.environ.get("BONETUMOR_MODEL_ALIAS"))

    @bentoml.api
    def predict(self, image: Path) -> dict[str, Any]:
        """Classify an uploaded tile (multipart form field ``image``: JPEG, PNG or TIFF).

        Returns ``label``, ``probabilities`` (class to probability) and ``model`` (registered name and version).
        An upload that is not a decodable image gets HTTP 400 saying why.
        """
        size = image.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            raise InvalidArgument(f"upload is {size} bytes; the limit is {MAX_UPLOAD_BYTES} bytes (one tile)")
        try:
            return self.predictor.predict_bytes(image.read_bytes(), source="upload")
        except InvalidImageError as exc:
            raise InvalidArgument(str(exc)) from exc

    @bentoml.api
    def model_info(self) -> dict[str, Any]:
        """The served model: name and version, architecture, classes, preprocessing, referral rule and provenance.

        Provenance (data version, git commit, params hash, MLflow run ids) lets an auditor trace any answer.
        """
        meta = self.predictor.metadata
        return {
            "name": self.predictor.name,
            "version": self.predictor.version,
            "arch": meta.arch,
            "classes": list(meta.classes),
            "tile_size": meta.tile_size,
            "input_size": meta.input_size,
            "test_time_views": meta.views.to_dict() | {"count": meta.views.count},
            "init": meta.provenance.get("init", "unknown (registered before bonetumor recorded it)"),
            "mean": list(meta.mean),
            "std": list(meta.std),
            "provenance": meta.provenance,
            "versions": meta.versions,
            "stain_normalization": None if meta.stain is None else meta.stain.get("method"),
            "referral": meta.referral,
        }
