"""Process set-up shared by every entry point (CLI, Kubeflow components): telemetry off, readable logs.

Kept free of heavy imports (no mlflow, no torch) so that calling it costs nothing.
"""

from __future__ import annotations

import logging
import os
import sys

#: Environment switches that keep the tools from phoning home (set only when the user has not chosen).
TELEMETRY_OFF: dict[str, str] = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    # Not telemetry, but noise: per-file download progress bars in stage logs.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

#: Libraries whose INFO messages drown the pipeline's own progress lines.
NOISY_LOGGERS = ("alembic", "mlflow", "great_expectations", "matplotlib", "PIL", "urllib3", "httpx")


def disable_telemetry() -> None:
    """Turn off MLflow, BentoML and DVC telemetry for this process and its children, unless set otherwise."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


def configure_process(verbose: bool = False) -> None:
    """Switch telemetry off and log progress lines (time, level, module, message) to stderr."""
    disable_telemetry()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
