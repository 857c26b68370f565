"""Audit fields of every served answer, and the prediction log that keeps them.

Each answer carries a request id, a UTC timestamp and the sha256 of the uploaded bytes, beside the model's
registered name, version and MLflow run id; the prediction log (JSON lines, one per answer, never the image)
records the same plus the label, confidence and referral, so an auditor can go from any answer to the model
that gave it (``bonetumor lineage``) and a drift monitor can read what was served. The log rotates by size with
the standard library's :class:`logging.handlers.RotatingFileHandler`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from datetime import UTC, datetime
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

#: Fields of an answer that the log keeps (besides the request's audit fields).
LOGGED_FIELDS = (
    "label",
    "confidence",
    "referral",
    "model",
    "tissue_fraction",
    "endpoint",
    "filename",
    "error",
    "assessment",  # /assess: tiles, tiles per class, percent necrosis and its interval, tumour area
)


def audit_fields(data: bytes) -> dict[str, str]:
    """Return a new request id, the UTC time now (ISO 8601) and the sha256 of the uploaded bytes."""
    return {
        "request_id": uuid.uuid4().hex,
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "input_sha256": hashlib.sha256(data).hexdigest(),
    }


class PredictionLog:
    """Appends one JSON line per answer to a size-rotated file; thread-safe.

    Args:
        path: The log file (parent folders are created).
        max_bytes: Size at which the file is rotated to ``<path>.1`` (older ones shift up).
        backups: How many rotated files are kept.
    """

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # RotatingFileHandler with backupCount=0 never rotates; keep at least one old file so max_bytes holds.
        self._handler = RotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=max(backups, 1), delay=True)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._lock = threading.Lock()

    def write(self, answer: dict[str, Any]) -> None:
        """Log the audit fields and the outcome of one answer (no image bytes, no probabilities per pixel)."""
        record: dict[str, Any] = {k: answer[k] for k in ("request_id", "timestamp", "input_sha256") if k in answer}
        record |= {k: answer[k] for k in LOGGED_FIELDS if k in answer}
        if isinstance(answer.get("drift_features"), dict):
            # Colour/stain statistics and the projected embedding: what `bonetumor drift` compares.
            record |= {k: answer["drift_features"][k] for k in ("stats", "embedding") if k in answer["drift_features"]}
        if "probabilities" in answer:
            record["probabilities"] = {k: round(float(v), 6) for k, v in answer["probabilities"].items()}
        line = logging.LogRecord("bonetumor.predictions", logging.INFO, "", 0, json.dumps(record), None, None)
        with self._lock:
            self._handler.emit(line)

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            self._handler.close()


def read_prediction_log(path: str | Path) -> list[dict[str, Any]]:
    """Read every record of a prediction log and its rotated files, oldest first.

    Raises:
        FileNotFoundError: Neither the log nor a rotated file exists.
    """
    path = Path(path)
    files = sorted(
        path.parent.glob(f"{path.name}.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0
    )
    files = [f for f in files if f.suffix[1:].isdigit()] + ([path] if path.exists() else [])
    if not files:
        raise FileNotFoundError(f"no prediction log at {path} (serving.prediction_log)")
    records: list[dict[str, Any]] = []
    for file in files:
        records.extend(json.loads(line) for line in file.read_text().splitlines() if line.strip())
    return records
