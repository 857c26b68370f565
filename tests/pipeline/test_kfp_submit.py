"""Submitting and scheduling the Kubeflow pipeline, without a cluster.

What is checked before the cluster is called (the data version from the tiles folder's ``.dvc`` file or
``dvc.lock``, params.yaml, the cron, the package), the names runs get (commit, ``-dirty``, data version), and the
one-line errors of a dead host and of a host that refuses the credentials: through the real ``bonetumor pipeline``
CLI for the dead host, in-process against a tiny loopback ``http.server`` for the rest. ``bonetumor pipeline
compile --image`` is checked on the YAML it writes.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, free_port, venv_env
from typer.testing import CliRunner

from bonetumor.cli.main import app

# The adapters live beside the package, in the repository root (the CLI runs them there as `python -m`).
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))
submit_module = importlib.import_module("pipelines.submit")
schedule_module = importlib.import_module("pipelines.schedule")
SubmitError = submit_module.SubmitError
build_arguments = submit_module.build_arguments
check_package = submit_module.check_package
git_commit = submit_module.git_commit
prepare_run = submit_module.prepare_run
run_name = submit_module.run_name

MD5 = "0123456789abcdef0123456789abcdef.dir"
LOCK_MD5 = "fedcba9876543210fedcba9876543210.dir"


def _project(root: Path, params: dict[str, Any] | None = None, dvc_file: bool = True, lock: bool = False) -> Path:
    """A project folder: params.yaml, and the tiles folder's data/sample/images.dvc and/or dvc.lock."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params or {}))
    (root / "data" / "sample" / "images").mkdir(parents=True)
    if dvc_file:
        spec = {"outs": [{"md5": MD5, "size": 874714, "nfiles": 30, "hash": "md5", "path": "images"}]}
        (root / "data" / "sample" / "images.dvc").write_text(yaml.safe_dump(spec))
    if lock:
        dep = {"path": "data/sample/images", "hash": "md5", "md5": LOCK_MD5, "nfiles": 30}
        (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"ingest": {"deps": [dep]}}}))
    return root


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


# --- the run's arguments: nothing here calls a cluster -------------------------------------------------------


def test_the_data_version_comes_from_the_tiles_folders_dvc_file(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", lock=True)  # the .dvc file wins over dvc.lock
    request = prepare_run(project / "params.yaml", "/app/tiles", "http://mlflow:5000", dvc_remote="s3://b/dvc")
    assert request.data_version.md5 == MD5
    assert request.data_version.origin == "data/sample/images.dvc"
    assert any("data/sample/images.dvc" in line for line in request.describe())  # the output says which
    arguments = build_arguments(project / "params.yaml", "/app/tiles", "http://mlflow:5000", dvc_remote="s3://b/dvc")
    assert set(arguments) == {"data_version", "dvc_remote", "source_dir", "params", "mlflow_tracking_uri"}
    assert arguments["data_version"] == MD5
    assert arguments["dvc_remote"] == "s3://b/dvc"
    assert arguments["source_dir"] == "/app/tiles"
    assert arguments["params"]["train"]["steps"] > 0  # the resolved config, defaults filled in
    assert arguments["params"]["data"]["source"] == "data/sample/images"


def test_without_a_dvc_file_the_data_version_comes_from_dvc_lock(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", dvc_file=False, lock=True)
    request = prepare_run(project / "params.yaml")
    assert request.data_version.md5 == LOCK_MD5
    assert request.data_version.origin.startswith("dvc.lock")
    # The project's own: its tiles are in git, dvc.lock's ingest stage records their md5.
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    recorded = next(d["md5"] for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/sample/images")
    assert build_arguments(REPO / "params.yaml")["data_version"] == recorded


def test_no_data_version_anywhere_is_a_clear_error(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", dvc_file=False)
    with pytest.raises(SubmitError, match=r"no data version for data/sample/images: .*dvc add data/sample/images"):
        build_arguments(project / "params.yaml")
    with pytest.raises(SubmitError, match="is not a DVC folder md5"):
        build_arguments(project / "params.yaml", data_version="abc")


@pytest.mark.parametrize("module", [submit_module, schedule_module])
def test_a_typo_in_params_fails_before_any_network_call(
    tmp_path: Path, module: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _project(tmp_path / "p", {"train": {"stpes": 3}})

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cluster was called")

    monkeypatch.setattr(module, "connect", no_network)
    argv = ["--host", "http://127.0.0.1:9", "--params", str(project / "params.yaml")]
    assert module.main([*argv, "--cron", "0 0 2 * * 1"] if module is schedule_module else argv) == 1
    err = capsys.readouterr().err
    assert "train.stpes" in err
    assert len(err.strip().splitlines()) == 1


def test_a_package_compiled_without_the_runs_parameters_is_refused(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"pipelineInfo": {"name": "x"}, "root": {"inputDefinitions": {"parameters": {}}}}))
    with pytest.raises(SubmitError, match=r"takes no parameter data_version, .*compile it again"):
        check_package(old, build_arguments(_project(tmp_path / "p") / "params.yaml"))


def test_run_names_carry_the_commit_and_the_data_version(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "nogit"
    _git(tmp_path, "init", "-q")
    (tmp_path / "f.txt").write_text("a")
    _git(tmp_path, "add", "f.txt")
    _git(tmp_path, "commit", "-qm", "c")
    sha = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert git_commit(tmp_path) == sha
    (tmp_path / "f.txt").write_text("b")
    assert git_commit(tmp_path) == f"{sha}-dirty"

    when = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert run_name(f"{sha}-dirty", MD5, when) == f"bonetumor-{sha}-dirty-data-01234567-20250304T050607Z"
    assert run_name("nogit", MD5, prefix="weekly") == "weekly-nogit-data-01234567"
    name = run_name(git_commit(REPO), build_arguments(REPO / "params.yaml")["data_version"], datetime.now(UTC))
    assert re.fullmatch(r"bonetumor-([0-9a-f]{4,40}(-dirty)?|nogit)-data-[0-9a-f]{8}-\d{8}T\d{6}Z", name)


def test_a_five_field_cron_is_refused_naming_the_six_field_form(capsys: pytest.CaptureFixture[str]) -> None:
    assert schedule_module.main(["--host", "http://127.0.0.1:9", "--cron", "0 2 * * 1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "has 5 fields" in err
    assert "6 fields, seconds first" in err
    assert "'0 0 2 * * 1'" in err
    assert schedule_module.check_cron(" 0  0 2 * * 1 ") == "0 0 2 * * 1"
    with pytest.raises(SubmitError, match="has 7 fields"):
        schedule_module.check_cron("0 0 2 * * 1 2025")


# --- hosts that cannot be used -------------------------------------------------------------------------------


def test_a_dead_host_is_one_line_and_exit_1_through_the_cli(tmp_path: Path) -> None:
    host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    commands = {
        "submit": ["bonetumor", "pipeline", "submit", "--host", host],
        "schedule": ["bonetumor", "pipeline", "schedule", "--host", host, "--cron", "0 0 2 * * 1"],
    }
    # Both at once: each process spends most of its time importing (torch, kfp).
    running = {
        name: subprocess.Popen(
            args, cwd=REPO, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in commands.items()
    }
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 1, (name, out, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert f"cannot reach the Kubeflow Pipelines API at {host} (connection refused)" in err
        assert "port-forward" in err
        assert "Traceback" not in err + out


Answer = Callable[[str, str], tuple[int, dict[str, Any]]]


class _Api:
    """A loopback HTTP server: ``answer(method, path)`` gives each request's status and JSON body."""

    def __init__(self, answer: Answer) -> None:
        #: Method, path, Authorization header and JSON body of every request.
        self.requests: list[tuple[str, str, str | None, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                sent = json.loads(self.rfile.read(length)) if length else None
                api.requests.append((self.command, self.path, self.headers.get("Authorization"), sent))
                code, body = answer(self.command, self.path)
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def serve_api() -> Iterator[Callable[[Answer], _Api]]:
    """Start loopback API servers; stop them after the test."""
    started: list[_Api] = []

    def start(answer: Answer) -> _Api:
        started.append(_Api(answer))
        return started[-1]

    yield start
    for api in started:
        api.server.shutdown()
        api.server.server_close()


HEALTHY = (200, {"multi_user": False})
REFUSED = (403, {"error": "forbidden", "message": "forbidden", "code": 7})


def _kfp(method: str, path: str) -> tuple[int, dict[str, Any]]:
    """Just enough of the KFP v2beta1 API for one run and one recurring run."""
    if path.startswith("/apis/v2beta1/healthz"):
        return HEALTHY
    if path.startswith("/apis/v2beta1/experiments") and method == "GET":
        return 200, {"experiments": [{"experiment_id": "e1", "display_name": "bonetumor-training"}], "total_size": 1}
    if path == "/apis/v2beta1/runs":
        return 200, {"run_id": "r1"}
    if path == "/apis/v2beta1/recurringruns":
        return 200, {"recurring_run_id": "j1"}
    return 404, {"error": "not found"}


@pytest.mark.parametrize("module", [submit_module, schedule_module])
def test_an_unauthorised_host_is_one_line_naming_the_token(
    module: Any, serve_api: Callable[[Answer], _Api], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    api_401 = serve_api(lambda method, path: (401, {"error": "unauthorized"}))
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    argv = ["--host", api_401.url, "--params", str(REPO / "params.yaml"), "--token-file", str(token)]
    assert module.main([*argv, "--cron", "0 0 2 * * 1"] if module is schedule_module else argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: unauthorised: the Kubeflow Pipelines API at {api_401.url} refused")
    assert "HTTP 401" in err
    assert "--token-file" in err
    assert "existing_token" in err
    assert "KF_PIPELINES_SA_TOKEN_PATH" in err
    assert "Traceback" not in captured.out + captured.err
    assert [r[2] for r in api_401.requests] == ["Bearer s3cret"]  # asked once, with the token, no retries


def test_a_refusal_after_the_health_check_is_one_line_too(
    serve_api: Callable[[Answer], _Api], capsys: pytest.CaptureFixture[str]
) -> None:
    api_403_after_healthz = serve_api(lambda method, path: HEALTHY if "healthz" in path else REFUSED)
    argv = ["--host", api_403_after_healthz.url, "--params", str(REPO / "params.yaml"), "--namespace", "bonetumor"]
    assert submit_module.main(argv) == 1  # the client is built; creating the experiment is refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "unauthorised" in err
    assert "HTTP 403" in err
    assert "in namespace bonetumor" in err
    assert len(api_403_after_healthz.requests) >= 2  # the health check, then the refused call


def test_what_a_run_and_a_recurring_run_send(
    serve_api: Callable[[Answer], _Api], capsys: pytest.CaptureFixture[str]
) -> None:
    api = serve_api(_kfp)
    argv = ["--host", api.url, "--params", str(REPO / "params.yaml")]
    assert submit_module.main(argv) == 0
    assert schedule_module.main([*argv, "--cron", "0 0 2 * * 1", "--max-concurrency", "2", "--name", "weekly"]) == 0
    out = capsys.readouterr().out
    posted = {path: body for method, path, _, body in api.requests if method == "POST"}
    version = build_arguments(REPO / "params.yaml")["data_version"]
    commit = git_commit(REPO)
    run, job = posted["/apis/v2beta1/runs"], posted["/apis/v2beta1/recurringruns"]
    for sent in (run, job):
        parameters = sent["runtime_config"]["parameters"]
        assert set(parameters) == {"data_version", "dvc_remote", "source_dir", "params", "mlflow_tracking_uri"}
        assert parameters["data_version"] == version
        assert parameters["params"]["train"]["architectures"]
    assert re.fullmatch(rf"bonetumor-{commit}-data-{version[:8]}-\d{{8}}T\d{{6}}Z", run["display_name"])
    assert job["display_name"] == f"weekly-{commit}-data-{version[:8]}"
    assert job["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * 1"}}
    assert int(job["max_concurrency"]) == 2
    assert job["no_catchup"] is True
    assert f"data version: {version} (from dvc.lock" in out  # says where the version came from
    assert f"submitted run r1 ({run['display_name']})" in out
    assert f"scheduled recurring run j1 ({job['display_name']})" in out


def test_a_host_without_its_scheme_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert submit_module.main(["--host", "localhost:8080", "--params", str(REPO / "params.yaml")]) == 1
    assert "needs its scheme: e.g. http://localhost:8080" in capsys.readouterr().err


# --- the CLI adapter -----------------------------------------------------------------------------------------


def test_the_cli_needs_the_project_folder(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["pipeline", "submit", "--host", "http://x", "--project", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path} has no pipelines/ folder" in result.output
    assert "--project DIR" in result.output


def test_compile_through_the_cli_puts_the_image_in_every_executor(tmp_path: Path) -> None:
    image = "registry.example/bt:1.2"
    completed = subprocess.run(
        ["bonetumor", "pipeline", "compile", "--image", image, "--output", "tmp/p.yaml", "--project", str(REPO)],
        cwd=tmp_path,  # --output is relative to where the command runs, not to the project
        env=venv_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    spec = next(yaml.safe_load_all((tmp_path / "tmp" / "p.yaml").read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert executors
    assert {name: e["container"]["image"] for name, e in executors.items()} == dict.fromkeys(executors, image)
