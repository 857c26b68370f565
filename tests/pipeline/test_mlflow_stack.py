"""MLflow as a real server: the pipeline and the service against PostgreSQL, S3 (moto) and basic-auth.

One module fixture starts the stack (``mlflow_stack``: a fresh PostgreSQL database as the backend store, moto's S3
as the artifact store behind ``--serve-artifacts``, basic-auth with its own admin password), creates a
``pipeline`` and a read-only ``serving`` user, runs ``dvc repro`` with tiny params whose ``tracking.uri`` is the
server, as ``pipeline``, and serves ``@champion`` with ``bentoml serve``, as ``serving``. Neither has S3
credentials: the server proxies every artifact. The tests read the result through the server, the bucket and the
database, and check that the preflight accepts the right password, and that a wrong one stops the preflight, a
stage and the service with one line naming the server and what to set. The preflight and the stage run in this
process (``bonetumor`` through typer's runner: the same code and exit status, without a torch import per
command); the service is a real ``bentoml serve``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from bento_server import BentoServer
from conftest import CLASSES, REPO, SAMPLE, copy_repository, free_port, tiny_params, venv_env
from mlflow_stack import MlflowStack, mlflow_stack
from typer.testing import CliRunner, Result

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: test_kfp_pipeline's tiny run (one architecture, the gate opened, so the run ends with a champion), without
#: Grad-CAM galleries and ONNX exports: seconds each that this test does not look at.
TINY = tiny_params(
    train={"architectures": ["resnet50"]},
    evaluate={"gradcam_per_class": 0},
    register={"require_beats_baseline": False, "export_onnx": False},
    referral={"max_error": 1.0, "target_recall": 0.0, "confidence": 0.5},
)
N_FOLDS = 2  # tiny_params' split.n_folds
MODEL_NAME = "bone-tumor-classifier"
WRONG_PASSWORD = "not-the-password-0451"  # noqa: S105 (a wrong password, on purpose)
TILE = sorted((SAMPLE / "images" / "Viable-Tumor").glob("*.jpg"))[0]


@dataclass
class StackRun:
    """The stack, the project the pipeline ran in, and what the run left."""

    stack: MlflowStack
    project: Path
    repro: subprocess.CompletedProcess[str]
    champion: dict[str, Any]
    runs: dict[str, Any]
    server: BentoServer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRun]:
    root = tmp_path_factory.mktemp("mlflow-stack")
    port = free_port()
    project = copy_repository(root / "project", {**TINY, "tracking": {"uri": f"http://127.0.0.1:{port}"}})
    # The stages before balance never talk to MLflow (the GANs and the ablation log runs): they run while the stack
    # starts.
    upstream_log = root / "upstream.log"
    with upstream_log.open("w") as log:
        upstream = subprocess.Popen(
            ["dvc", "repro", "augment", "split"],
            cwd=project,
            env=venv_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with mlflow_stack(root / "stack", port) as stack:
            stack.create_user("pipeline")
            stack.create_user("serving")  # the ini's default_permission READ is all it gets
            assert upstream.wait(timeout=900) == 0, upstream_log.read_text()[-3000:]
            env = stack.client_env("pipeline")
            repro = subprocess.run(["dvc", "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=900)
            assert repro.returncode == 0, f"{repro.stdout[-3000:]}\n{repro.stderr[-3000:]}\n{stack.log()[-2000:]}"
            champion = json.loads((project / "outputs" / "register" / "champion.json").read_text())
            runs = json.loads((project / "outputs" / "train" / "runs.json").read_text())
            (project / "tmp").mkdir()
            serving = stack.client_env("serving", MLFLOW_TRACKING_URI=stack.url)
            server = BentoServer.start(project, str(champion["version"]), **_only_mlflow(serving))
            try:
                yield StackRun(stack, project, repro, champion, runs, server)
            finally:
                server.stop()
    finally:
        if upstream.poll() is None:  # the stack failed to start: stop DVC and its stage
            os.killpg(upstream.pid, signal.SIGKILL)
            upstream.wait()


def _bonetumor(run: StackRun, monkeypatch: pytest.MonkeyPatch, password: str, *args: str) -> Result:
    """``bonetumor ARGS`` in the project, in this process, as the pipeline user with ``password``."""
    from bonetumor.cli.main import app

    monkeypatch.chdir(run.project)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return CliRunner().invoke(app, list(args))


def _only_mlflow(env: dict[str, str]) -> dict[str, str]:
    """The MLflow variables of ``env`` (BentoServer.start adds the rest)."""
    return {key: value for key, value in env.items() if key.startswith("MLFLOW_TRACKING_")}


@pytest.fixture
def client(run: StackRun, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An MlflowClient of the server, as the pipeline user."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", run.stack.users["pipeline"])
    return MlflowClient(tracking_uri=run.stack.url, registry_uri=run.stack.url)


def test_the_preflight_accepts_the_pipeline_users_credentials(run: StackRun, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _bonetumor(run, monkeypatch, run.stack.users["pipeline"], "check")
    assert result.exit_code == 0, result.output
    assert f"tracking server {run.stack.url}: healthy, credentials of user 'pipeline' accepted" in result.output


def test_the_cv_parent_runs_hold_one_nested_run_per_fold(run: StackRun, client: Any) -> None:
    experiment = client.get_experiment_by_name("bone-tumor")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # proxied by the server
    parent = client.get_run(run.runs["architectures"]["resnet50"]["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("cv-")
    folds = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(folds) >= N_FOLDS
    assert all(fold.info.status == "FINISHED" for fold in folds)


def test_the_artifacts_are_in_the_bucket_and_nowhere_local(run: StackRun, client: Any) -> None:
    keys = run.stack.s3_keys()
    assert keys
    assert all(key.startswith("mlartifacts/") for key in keys)
    parent = run.runs["architectures"]["resnet50"]["run_id"]
    assert any(f"/{parent}/artifacts/" in key for key in keys)
    version = client.get_model_version(MODEL_NAME, str(run.champion["version"]))
    model_id = version.model_id or version.source.rsplit("/", 1)[-1]
    assert any(model_id in key for key in keys), version.source  # the registered model's files
    assert not (run.project / "mlartifacts").exists()
    assert not (run.project / "mlflow.db").exists()


def test_the_champion_alias_points_at_the_registered_version(run: StackRun, client: Any) -> None:
    assert run.champion["model_name"] == MODEL_NAME
    assert run.champion["alias"] == "champion"
    version = client.get_model_version_by_alias(MODEL_NAME, run.champion["alias"])
    assert str(version.version) == str(run.champion["version"])
    assert version.run_id == run.champion["run_id"]


def test_the_backend_store_is_the_postgres_database(run: StackRun, client: Any) -> None:
    experiment = client.get_experiment_by_name("bone-tumor")
    tracked = {r.info.run_id for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    stored = {row[0] for row in run.stack.sql("SELECT run_uuid FROM runs WHERE lifecycle_stage = 'active'")}
    assert tracked == stored
    assert run.runs["architectures"]["resnet50"]["run_id"] in stored
    versions = run.stack.sql("SELECT version FROM model_versions WHERE name = %s", MODEL_NAME)
    assert (int(run.champion["version"]),) in versions


def test_the_service_serves_the_champion_from_the_server(run: StackRun) -> None:
    assert requests.get(f"{run.server.url}/readyz", timeout=10).status_code == 200
    response = requests.post(
        f"{run.server.url}/predict", files={"image": (TILE.name, TILE.read_bytes(), "image/jpeg")}, timeout=60
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] in CLASSES
    assert answer["model"]["name"] == MODEL_NAME
    assert answer["model"]["version"] == str(run.champion["version"])


def test_lineage_traces_an_answer_through_the_server(run: StackRun, monkeypatch: pytest.MonkeyPatch) -> None:
    response = requests.post(
        f"{run.server.url}/predict", files={"image": (TILE.name, TILE.read_bytes(), "image/jpeg")}, timeout=60
    )
    request_id = response.json()["request_id"]
    result = _bonetumor(run, monkeypatch, run.stack.users["pipeline"], "lineage", request_id, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tracking_uri"] == run.stack.url
    assert doc["answer"]["request_id"] == request_id
    assert doc["model_version"]["version"] == str(run.champion["version"])
    assert doc["refit_run"]["run_id"] == run.champion["run_id"]
    assert doc["cv_run"]["run_id"] == run.champion["cv_run_id"]
    assert len(doc["fold_runs"]) >= N_FOLDS
    assert doc["data"]["restore"]["restorable"] is True
    assert doc["validation"]["data_docs"].startswith("mlflow-artifacts:/")
    # Who registered it: the MLflow user of the pipeline, not the OS user.
    [event] = doc["model_version"]["alias_history"]
    assert (event["action"], event["alias"], event["user"]) == ("register", "champion", "pipeline")


def _refused(output: str, uri: str) -> str:
    """The one error line of a command that met refused credentials (asserting it is clean and password-free)."""
    assert "Traceback" not in output, output[-3000:]
    assert WRONG_PASSWORD not in output
    lines = [line for line in output.splitlines() if "refused the credentials" in line]
    assert len(lines) == 1, output[-3000:]
    line = lines[0]
    assert f"tracking server {uri} refused the credentials (HTTP 401 Unauthorized" in line
    assert "user 'pipeline'" in line
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in line
    return line


def test_a_wrong_password_stops_the_preflight_in_one_line(run: StackRun, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _bonetumor(run, monkeypatch, WRONG_PASSWORD, "check")
    assert result.exit_code == 1
    _refused(result.output, run.stack.url)


def test_a_wrong_password_stops_a_stage_in_one_line(run: StackRun, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _bonetumor(run, monkeypatch, WRONG_PASSWORD, "train")
    assert result.exit_code == 1
    assert _refused(result.output, run.stack.url).startswith("error: tracking server")
    assert (run.project / "outputs" / "train" / "runs.json").is_file()  # the last good outputs are kept


def test_a_wrong_password_stops_the_service_before_it_loads_anything(run: StackRun) -> None:
    env = run.stack.client_env("pipeline", WRONG_PASSWORD)
    env.update(
        MLFLOW_TRACKING_URI=run.stack.url,
        BONETUMOR_PROJECT_DIR=str(run.project),
        BENTOML_HOME=str(run.project / "bentoml-home"),
    )
    result = subprocess.run(
        ["bentoml", "serve", "service:BoneTumorClassifier", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO / "serving",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "bonetumor service: cannot start: tracking server" in _refused(result.stdout + result.stderr, run.stack.url)


def test_no_password_reaches_a_log(run: StackRun) -> None:
    passwords = run.stack.users.values()
    logs = {
        "dvc repro": run.repro.stdout + run.repro.stderr,
        "bentoml serve": run.server.log(),
        "mlflow server": run.stack.log(),
    }
    for name, text in logs.items():
        assert not [p for p in passwords if p in text], f"a password in the {name} output"
