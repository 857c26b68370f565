"""A real `mlflow server` that dies in the middle of training: a clear error, no lost steps, no run left RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from conftest import copy_repository, free_port, tiny_params, venv_env
from mlflow.tracking import MlflowClient

from bonetumor.registry.tracking import INTERRUPTED_TAG

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@contextmanager
def mlflow_server(project: Path, port: int) -> Iterator[str]:
    """``mlflow server`` on the project's sqlite database, on loopback; stopped (the whole group) on exit."""
    server = subprocess.Popen(
        [
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{project / 'mlflow.db'}",
            "--artifacts-destination",
            str(project / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=project,
        env=venv_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, "mlflow server exited"
            try:
                if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield uri
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_a_tracking_server_that_dies_mid_training_costs_no_steps(tmp_path: Path) -> None:
    overrides = tiny_params()
    overrides["train"].update({"steps": 4, "eval_every": 1, "checkpoint": True, "architectures": ["resnet50"]})
    overrides["balance"]["enabled"] = False
    project = copy_repository(tmp_path / "project", overrides)
    upstream = subprocess.run(
        ["dvc", "repro", "balance", "augment"], cwd=project, env=venv_env(), capture_output=True, text=True
    )
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    port = free_port()
    marker = tmp_path / "paused"
    # MLflow's own retries, shortened: by default it retries 7 times with backoff (minutes) before giving up.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    with mlflow_server(project, port) as uri:
        env = venv_env(
            MLFLOW_TRACKING_URI=uri,
            BONETUMOR_FAULT="pause:15@fit-step#3",
            BONETUMOR_FAULT_MARKER=str(marker),
            **quick,
        )
        train = subprocess.Popen(
            ["bonetumor", "train"], cwd=project, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert train.poll() is None, train.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
    # The server is gone while the fit sleeps between its steps 2 and 3.
    _, stderr = train.communicate(timeout=300)
    assert train.returncode == 1, stderr[-3000:]
    assert f"error: the MLflow tracking store {uri} failed during this stage" in stderr, stderr[-3000:]
    assert "training resumes from its checkpoints" in stderr
    assert "Traceback" not in stderr.split("error: the MLflow tracking store")[-1]
    checkpoints = list((project / "outputs" / ".train.checkpoints").rglob("checkpoint.pt"))
    assert checkpoints, "the steps trained before the outage were not kept"
    assert not (project / "outputs" / "train").exists()  # no half-written output

    with mlflow_server(project, port) as uri:
        again = subprocess.run(
            ["bonetumor", "train"],
            cwd=project,
            env=venv_env(MLFLOW_TRACKING_URI=uri, **quick),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert again.returncode == 0, again.stderr[-4000:]
        resumed = [line for line in again.stderr.splitlines() if "checkpoint" in line]
        # The server died before step 3; step 3 was still checkpointed (the checkpoint is written before the
        # step's metrics are logged), so not even the step that met the outage is lost. Its metrics, and the
        # earlier steps', are replayed into the new run.
        assert any("resnet50 fold 1/2: resuming after step 3 from checkpoint" in line for line in resumed), resumed
        client = MlflowClient(uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'")
        closed = client.search_runs(experiments, filter_string="attributes.status = 'FAILED'")
        # The runs of the process that lost its server could not be closed by it; the rerun closed them.
        assert closed
        assert all(INTERRUPTED_TAG in run.data.tags for run in closed)
    assert (project / "outputs" / "train" / "runs.json").is_file()
