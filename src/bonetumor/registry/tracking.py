"""MLflow set-up and the provenance every run carries.

Every run is tagged with the git commit, the data version (SHA-256 of the data set manifest, which itself
holds every tile's SHA-256 and label), the hash of the params it used and the package version, so an auditor
can walk from a served prediction to the model version, its run, the data and the code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import psutil
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bonetumor import __version__
from bonetumor.config import Config, TrackingConfig
from bonetumor.data.manifest import read_manifest
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.runtime import absolute_tracking_uri, credentials_refused, disable_telemetry
from bonetumor.utils import git_commit

TAG_PREFIX = "bonetumor."
#: Run tags naming the process that owns a run (see :func:`process_tags`).
HOST_TAG, PID_TAG, PID_STARTED_TAG = f"{TAG_PREFIX}host", f"{TAG_PREFIX}pid", f"{TAG_PREFIX}pid_started"
#: Run tag set on a run whose process was killed, when the next run marks it FAILED.
INTERRUPTED_TAG = f"{TAG_PREFIX}interrupted"
#: Most RUNNING runs looked at per experiment (more would mean something other than kills is wrong).
MAX_RUNS_CHECKED = 1000

log = logging.getLogger(__name__)


def resolve_tracking_uri(config: TrackingConfig, base_dir: str | Path) -> str:
    """Return the tracking URI to use: ``MLFLOW_TRACKING_URI`` if set, else params' ``tracking.uri``.

    A relative ``sqlite:///`` path is made absolute against ``base_dir`` (the project folder), so every stage,
    whatever its working folder, writes to the same database.
    """
    return absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or config.uri, base_dir)


def configure_tracking(config: TrackingConfig, base_dir: str | Path) -> str:
    """Point MLflow at the tracking URI (see :func:`resolve_tracking_uri`) without touching experiments.

    Returns:
        The tracking URI in use.
    """
    disable_telemetry()
    uri = resolve_tracking_uri(config, base_dir)
    mlflow.set_tracking_uri(uri)
    return uri


def setup_mlflow(config: TrackingConfig, base_dir: str | Path) -> str:
    """Point MLflow at the tracking URI and make sure the experiment exists.

    For a local sqlite store, artifacts go to ``mlartifacts/`` beside the database file (not MLflow's default
    of the current working folder), so stages run from any folder share them.

    Returns:
        The experiment id.

    Raises:
        ConfigError: The tracking server refused the credentials (HTTP 401 or 403), in one line.
    """
    uri = configure_tracking(config, base_dir)
    try:
        experiment = mlflow.get_experiment_by_name(config.experiment)
        if experiment is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            experiment_id = mlflow.create_experiment(config.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
    except MlflowException as exc:
        raise_if_refused(exc, uri)
        raise
    mlflow.set_experiment(experiment_id=experiment_id)
    close_interrupted_runs(str(experiment_id))
    return str(experiment_id)


def raise_if_refused(exc: MlflowException, uri: str) -> None:
    """Turn a tracking server's refusal of the credentials (HTTP 401 or 403) into a one-line error.

    MLflow's own message is the endpoint and the server's HTML or text answer; this one names the URI, the
    status and the variables to set (:func:`bonetumor.runtime.credentials_refused`), never the password.

    Raises:
        ConfigError: ``exc`` is an HTTP 401 or 403; otherwise nothing is raised.
    """
    status = exc.get_http_status_code()
    if status in (401, 403):
        raise ConfigError(credentials_refused(uri, status)) from exc


def process_tags() -> dict[str, str]:
    """Return the tags that name the process owning a run: host, pid and the process's start time.

    :func:`close_interrupted_runs` reads them to tell a run whose process was killed from one still going.
    """
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PID_STARTED_TAG: f"{psutil.Process().create_time():.3f}",
    }


def _process_alive(pid: int, started: str) -> bool:
    """Whether process ``pid`` exists and is the one that started at ``started`` (a reused pid is not)."""
    try:
        process = psutil.Process(pid)
        created = process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    if process.status() == psutil.STATUS_ZOMBIE:
        return False
    try:
        return abs(created - float(started)) < 1.0
    except ValueError:
        return True  # no usable start time: a live process with that pid may be the owner, leave its run alone


def close_interrupted_runs(experiment_id: str) -> list[str]:
    """Mark FAILED the runs of ``experiment_id`` that a killed process left RUNNING, and say so on each.

    A SIGKILL, an OOM kill or a power cut gives the process no chance to close its runs, so MLflow would show
    them RUNNING forever. Only runs owned (:func:`process_tags`) by a process of this host that no longer exists
    are closed: a run of a live process, of another host (a cluster pod) or without owner tags is left alone.

    Returns:
        The ids of the runs it closed.
    """
    client = MlflowClient()
    host = socket.gethostname()
    closed = []
    try:
        running = client.search_runs(
            [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=MAX_RUNS_CHECKED
        )
    except MlflowException as exc:
        log.warning("cannot look for interrupted runs in experiment %s: %s", experiment_id, exc)
        return []
    for run in running:
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) != host or not pid.isdigit() or _process_alive(int(pid), tags.get(PID_STARTED_TAG, "")):
            continue
        when = datetime.now(UTC).isoformat(timespec="seconds")
        client.set_tag(
            run.info.run_id,
            INTERRUPTED_TAG,
            f"process {pid} on {host} ended without closing this run (killed); marked FAILED at {when} by the "
            f"next run (process {os.getpid()}). A rerun resumes the work from its checkpoints in new runs.",
        )
        client.set_terminated(run.info.run_id, status="FAILED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("marked %d run(s) of killed processes FAILED: %s", len(closed), closed)
    return closed


def data_version(manifest_path: str | Path) -> str:
    """Return the data version: a SHA-256 over the sorted (tile sha256, label, case, slide) rows of the manifest.

    File paths are left out on purpose: the same tiles ingested from another folder, or copied into a Kubeflow
    artifact, are the same data and get the same version.
    """
    manifest = read_manifest(manifest_path)
    rows = sorted(
        zip(
            manifest["sha256"].astype(str),
            manifest["label"].astype(str),
            manifest["case"].astype(str),
            manifest["slide"].astype(str),
            strict=True,
        )
    )
    return hashlib.sha256("\n".join(",".join(row) for row in rows).encode()).hexdigest()


def dvc_data_version(source: str | Path, project_dir: str | Path) -> dict[str, str]:
    """Return the DVC version of the data source: the md5 DVC recorded for it, and where it was recorded.

    Looked up, in order, in a ``.dvc`` file tracking the source or a folder above it (``dvc add``, as
    ``bonetumor data import`` does) and in ``dvc.lock``'s ingest stage (``dvc repro`` records its data dependency).
    Only the YAML files are read: the package does not import DVC.

    Args:
        source: The data source folder (``data.source``; relative paths are relative to ``project_dir``).
        project_dir: The DVC project folder.

    Returns:
        ``{"md5": ..., "recorded_in": ...}``; md5 ``untracked`` when DVC knows nothing of the source.
    """
    project = Path(project_dir).resolve()
    path = Path(source)
    path = (path if path.is_absolute() else project / path).resolve()
    for candidate in (path, *path.parents):
        if project not in candidate.parents:
            break  # only .dvc files inside the project describe it
        dvc_file = candidate.with_name(candidate.name + ".dvc")
        if dvc_file.is_file():
            md5 = _first_md5(yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}, "outs", None)
            if md5:
                suffix = "" if candidate == path else f" ({path.relative_to(candidate).as_posix()} inside it)"
                return {"md5": md5, "recorded_in": f"{dvc_file.relative_to(project).as_posix()}{suffix}"}
    lock = project / "dvc.lock"
    if lock.is_file() and project in (path, *path.parents):
        stage = ((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}).get("ingest") or {}
        md5 = _first_md5(stage, "deps", path.relative_to(project).as_posix())
        if md5:
            return {"md5": md5, "recorded_in": "dvc.lock (stage ingest)"}
    return {"md5": "untracked", "recorded_in": ""}


def _first_md5(document: dict[str, Any], key: str, path: str | None) -> str:
    for entry in document.get(key) or []:
        if isinstance(entry, dict) and (path is None or entry.get("path") == path) and entry.get("md5"):
            return str(entry["md5"])
    return ""


def log_step_metrics(stats: dict[str, float]) -> None:
    """Log one evaluation's metrics to the active MLflow run, with its optimiser step as the MLflow step."""
    mlflow.log_metrics({k: v for k, v in stats.items() if k != "step"}, step=int(stats["step"]))


def provenance_tags(config: Config, manifest_path: str | Path, code_dir: str | Path | None = None) -> dict[str, str]:
    """Return the tags that tie a run to code, data and params.

    Two data versions: ``data_version`` hashes the tiles' content and labels (the same wherever they live), and
    ``dvc_data_md5`` is DVC's md5 of the source folder (``dvc add`` / ``dvc.lock``), which ``dvc checkout`` of
    that commit restores.
    """
    commit = git_commit(code_dir)
    dvc = dvc_data_version(config.data.source, code_dir or Path.cwd())
    return {
        f"{TAG_PREFIX}data_source": config.data.source,
        f"{TAG_PREFIX}dvc_data_md5": dvc["md5"],
        f"{TAG_PREFIX}dvc_data_recorded_in": dvc["recorded_in"],
        f"{TAG_PREFIX}git_commit": commit,
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
        f"{TAG_PREFIX}data_version": data_version(manifest_path),
        f"{TAG_PREFIX}params_hash": config.section_hash(),
        f"{TAG_PREFIX}package_version": __version__,
    }


def flatten_params(config: Config, sections: Iterable[str]) -> dict[str, Any]:
    """Flatten the given config sections into ``section.field`` MLflow params (lists joined by commas)."""
    data = config.to_dict()
    flat: dict[str, Any] = {}
    for section in sections:
        for key, value in data[section].items():
            flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def require_run(run_id: str, what: str) -> None:
    """Check that an MLflow run exists on the current tracking server.

    Raises:
        ArtifactError: The run is unknown (for example, a different tracking URI than the stage that made it).
    """
    try:
        mlflow.get_run(run_id)
    except MlflowException as exc:
        raise ArtifactError(
            f"{what}: MLflow run {run_id} not found at {mlflow.get_tracking_uri()}; every stage must use the same "
            "tracking URI (params tracking.uri or MLFLOW_TRACKING_URI). Rerun the stage that made it."
        ) from exc
