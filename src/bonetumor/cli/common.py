"""What every command shares: default paths, the ``--params`` option, and the clean exit on expected errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from bonetumor.config import Config, load_config
from bonetumor.errors import BoneTumorError

#: Default locations, the same as dvc.yaml's.
OUT = Path("outputs")
MANIFEST = OUT / "ingest" / "manifest.csv"
FOLDS = OUT / "split" / "folds.json"
POLICY = OUT / "augment" / "policy.json"
TILES = OUT / "validate" / "tiles.csv"

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params.yaml; its folder is the project folder.")]


def stage_config(params: Path) -> tuple[Config, Path]:
    """Load params.yaml and return it with its folder, the project folder."""
    return load_config(params), params.resolve().parent


def _tracking_errors() -> tuple[type[BaseException], ...]:
    """The errors of an MLflow store that fails mid-stage (imported only when an error is being handled)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException,)


def run_stage(func: Callable[[], object]) -> None:
    """Call a stage, turning expected errors (ours, and a tracking store failing mid-stage) into a clean exit."""
    try:
        func()
    except BoneTumorError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from exc
    except _tracking_errors() as exc:
        import mlflow

        # MLflow has already retried with backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, about 4 min).
        message = str(exc).splitlines()[0][:600]
        typer.secho(
            f"error: the MLflow tracking store {mlflow.get_tracking_uri()} failed during this stage: {message}\n"
            "Nothing finished is lost: completed stages keep their outputs, and training resumes from its "
            "checkpoints. Check the server (or MLFLOW_TRACKING_URI / tracking.uri), then rerun (make pipeline).",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1) from exc
