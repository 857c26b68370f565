"""A service whose registry cannot be used stops at start-up, in seconds, saying which URI and what to do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port, venv_env
from mlflow.tracking import MlflowClient

from bonetumor.errors import ModelNotFoundError, RegistryUnavailableError
from bonetumor.registry.model_registry import open_served_model, resolve_version

#: Seconds a start-up against an unusable registry may take at most (MLflow's own retries take minutes).
FAIL_WITHIN = 10.0


def project(root: Path, uri: str = "sqlite:///mlflow.db") -> Path:
    """A project folder whose params.yaml points the registry at ``uri``; returns params.yaml."""
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"uri": uri}}))
    return params


def dead_uri() -> str:
    """An http URI on loopback where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def test_a_dead_tracking_server_fails_open_served_model_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = dead_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as caught:
        open_served_model(project(tmp_path))
    assert time.monotonic() - started < FAIL_WITHIN
    message = str(caught.value)
    assert f"tracking server {uri} is not reachable" in message
    assert "start it (mlflow server ...) or set MLFLOW_TRACKING_URI" in message


def test_a_missing_sqlite_database_fails_open_served_model_and_is_not_created(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(RegistryUnavailableError) as caught:
        open_served_model(project(tmp_path))
    assert time.monotonic() - started < FAIL_WITHIN
    assert str(caught.value) == (
        f"tracking store sqlite:///{tmp_path}/mlflow.db: the MLflow database does not exist at {tmp_path}/mlflow.db; "
        "run `make pipeline` to train and register a model, or set MLFLOW_TRACKING_URI (or tracking.uri in "
        "params.yaml) to the store that holds it"
    )
    # MLflow, asked first, would have created an empty database and then reported the model as missing.
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no MLflow model registry (no registered_models table)"),
        (b"this is not a database" * 100, "cannot be read as an sqlite database (file is not a database)"),
    ],
    ids=["empty file", "not sqlite"],
)
def test_a_database_file_without_a_registry_is_refused_unchanged(tmp_path: Path, content: bytes, message: str) -> None:
    database = tmp_path / "mlflow.db"
    database.write_bytes(content)
    with pytest.raises(RegistryUnavailableError, match="run `make pipeline`") as caught:
        open_served_model(project(tmp_path))
    assert f"tracking store sqlite:///{database}: {database} {message}" in str(caught.value)
    assert database.read_bytes() == content


def test_an_empty_registry_is_a_missing_model_not_an_unreachable_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_registered_models()  # creates MLflow's tables, registers nothing
    missing = re.escape(f"no model version bone-tumor-classifier@champion at {uri}; run `make pipeline`")
    with pytest.raises(ModelNotFoundError, match=missing):
        open_served_model(project(tmp_path))


def test_resolve_version_says_the_store_did_not_answer_rather_than_that_the_model_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow

    uri = dead_uri()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries take minutes
    mlflow.set_tracking_uri(uri)
    with pytest.raises(RegistryUnavailableError) as caught:
        resolve_version("m", "champion")
    message = str(caught.value)
    assert message.startswith(f"tracking store {uri} did not answer the lookup of m@champion (INTERNAL_ERROR: ")
    assert "Connection refused" in message
    assert message.endswith("or set MLFLOW_TRACKING_URI to one that is")
    assert "make pipeline" not in message


def serve(root: Path, **env: str) -> tuple[int | None, float, str]:
    """Run ``bentoml serve`` of the service on the project at ``root``; return its exit status, seconds, output."""
    (root / "tmp").mkdir(exist_ok=True)
    started = time.monotonic()
    process = subprocess.Popen(
        ["bentoml", "serve", "service:BoneTumorClassifier", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO / "serving",
        env=venv_env(
            BONETUMOR_PROJECT_DIR=str(root),
            BENTOML_HOME=str(root / "bentoml-home"),
            TMPDIR=str(root / "tmp"),
            **env,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        # Still running: the check did not stop it. Stop the server (and the workers it started) and report.
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        return None, time.monotonic() - started, output.decode(errors="replace")
    return process.returncode, time.monotonic() - started, output.decode(errors="replace")


@pytest.mark.integration
@pytest.mark.parametrize("store", ["dead http server", "missing sqlite database"])
def test_bentoml_serve_exits_at_once_naming_the_unusable_store_and_what_to_do(tmp_path: Path, store: str) -> None:
    project(tmp_path)
    if store == "dead http server":
        uri = dead_uri()
        status, seconds, output = serve(tmp_path, MLFLOW_TRACKING_URI=uri)
        expected = (
            f"bonetumor service: cannot start: tracking server {uri} is not reachable ([Errno 111] Connection "
            "refused); start it (mlflow server ...) or set MLFLOW_TRACKING_URI / tracking.uri to a running one"
        )
    else:
        status, seconds, output = serve(tmp_path)
        expected = (
            f"bonetumor service: cannot start: tracking store sqlite:///{tmp_path}/mlflow.db: the MLflow database "
            f"does not exist at {tmp_path}/mlflow.db; run `make pipeline` to train and register a model, or set "
            "MLFLOW_TRACKING_URI (or tracking.uri in params.yaml) to the store that holds it"
        )
    assert status not in (None, 0), f"bentoml serve did not exit with an error:\n{output[-3000:]}"
    # Before any worker imported torch or MLflow: seconds, where a worker retrying a dead server took minutes.
    assert seconds < 30, output[-3000:]
    assert expected in output.splitlines(), output[-3000:]
    assert "Traceback" not in output
    assert not (tmp_path / "mlflow.db").exists()
