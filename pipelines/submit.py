"""Submit the compiled training pipeline to a Kubeflow Pipelines endpoint, as one run.

Usage::

    python -m pipelines.submit --host http://localhost:8080 [--experiment NAME] [--params params.yaml]
        [--data-version MD5.dir] [--dvc-remote s3://bucket/dvc] [--source-dir /app/data/sample/images]
        [--mlflow-tracking-uri http://mlflow:5000] [--namespace NS] [--package pipelines/training_pipeline.yaml]
        [--token-file FILE] [--service-account SA] [--no-cache]

``bonetumor pipeline submit`` runs the same. Everything that can be checked here is checked before the cluster
is called: params.yaml (:func:`bonetumor.config.load_config`; the resolved config, every section with its
defaults filled in, becomes the run's ``params``, so the run does not depend on the defaults of the package in the
image), the data version, and that the compiled package takes the run's arguments.

The run's ``data_version`` is the DVC md5 of the tiles folder (``data.source``): ``--data-version``, else what
the folder's ``.dvc`` file records (``outs[0].md5``), else the md5 ``dvc.lock``'s ingest stage recorded for it.
The run's name carries the git commit of the project (``-dirty`` with uncommitted changes, ``nogit`` without git)
and the data version: ``bonetumor-<commit>-data-<md5[:8]>-<UTC time>``.

A host that cannot be reached or refuses the credentials gives one line on stderr and exit status 1. The host is
asked once (its health endpoint, a short timeout) before ``kfp.Client`` is built: the client asks it too, but
retries five times, 5 s apart, logging a traceback each time. A bearer token comes from ``--token-file``, else
from the file ``KF_PIPELINES_SA_TOKEN_PATH`` names, else from the ServiceAccount token KFP projects into pods
(``/var/run/secrets/kubeflow/pipelines/token``), when one of them exists; it is sent as
``kfp.Client(existing_token=...)`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bonetumor.config import load_config
from bonetumor.data.remote import DATA_VERSION_PATTERN
from bonetumor.errors import ConfigError
from pipelines.training_pipeline import DEFAULT_MLFLOW_TRACKING_URI, DEFAULT_SOURCE_DIR, PIPELINE_NAME, run_params

if TYPE_CHECKING:
    import kfp

ROOT = Path(__file__).resolve().parent.parent
#: The committed, compiled pipeline (pipelines.compile writes it).
PIPELINE_YAML = ROOT / "pipelines" / "training_pipeline.yaml"
#: The KFP endpoint when --host is not given (kfp's own variable).
HOST_ENV = "KF_PIPELINES_ENDPOINT"
#: The file holding a bearer token (kfp's own variable), and where KFP projects a ServiceAccount token in pods.
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # noqa: S105  (a variable name, not a secret)
POD_TOKEN_PATH = Path("/var/run/secrets/kubeflow/pipelines/token")
#: Seconds the health check waits for the host (connect and read each).
PROBE_TIMEOUT_S = 10.0
#: What a run's or a recurring run's name starts with.
NAME_PREFIX = "bonetumor"
HEALTHZ_PATH = "/apis/v2beta1/healthz"
PORT_FORWARD_HINT = "kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80, then --host http://localhost:8080"


class SubmitError(Exception):
    """Something the user can fix stops the submission; the message is one line saying what and how."""


@dataclass(frozen=True)
class DataVersion:
    """The DVC md5 of the tiles folder, and where it was read."""

    md5: str
    origin: str


@dataclass(frozen=True)
class RunRequest:
    """What a run (or every run of a schedule) is sent: its arguments, and what they were made from."""

    arguments: dict[str, Any]
    data_version: DataVersion
    commit: str
    params_file: Path

    def describe(self) -> list[str]:
        """Return the lines that tell the user what the run will train, from what."""
        remote = self.arguments["dvc_remote"]
        source = f"pulled from the DVC remote {remote}" if remote else f"in the image at {self.arguments['source_dir']}"
        dirty = " (uncommitted changes in the working tree)" if self.commit.endswith("-dirty") else ""
        return [
            f"params: {self.params_file} is valid; the resolved config is the run's params",
            f"data version: {self.data_version.md5} (from {self.data_version.origin}); tiles {source}",
            f"commit: {self.commit}{dirty}",
            f"MLflow in the pods: {self.arguments['mlflow_tracking_uri']}",
        ]


def _relative(path: Path, project: Path) -> str:
    try:
        return path.relative_to(project).as_posix()
    except ValueError:
        return str(path)


def _md5_from_dvc_file(dvc_file: Path) -> str | None:
    """``outs[0].md5`` of a ``.dvc`` file, or None when it records none."""
    try:
        spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"cannot read {dvc_file}: {' '.join(str(exc).split())}") from exc
    outs = spec.get("outs") if isinstance(spec, dict) else None
    first = outs[0] if isinstance(outs, list) and outs and isinstance(outs[0], dict) else {}
    md5 = first.get("md5")
    return str(md5) if md5 else None


def _md5_from_lock(lock: Path, folder: str) -> str | None:
    """The md5 ``dvc.lock``'s ingest stage recorded for its dependency ``folder``, or None."""
    try:
        spec = yaml.safe_load(lock.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"cannot read {lock}: {' '.join(str(exc).split())}") from exc
    stages = spec.get("stages") if isinstance(spec, dict) else None
    ingest = stages.get("ingest") if isinstance(stages, dict) else None
    deps = ingest.get("deps") if isinstance(ingest, dict) else None
    for dep in deps if isinstance(deps, list) else []:
        if isinstance(dep, dict) and os.path.normpath(str(dep.get("path", ""))) == os.path.normpath(folder):
            md5 = dep.get("md5")
            return str(md5) if md5 else None
    return None


def read_data_version(source: str, project: Path) -> DataVersion:
    """Find the DVC md5 of the tiles folder: its ``.dvc`` file first, then ``dvc.lock``'s ingest stage.

    Args:
        source: The tiles folder (``data.source``), relative to ``project`` or absolute.
        project: The project folder (holds params.yaml and dvc.lock).

    Returns:
        The md5 (``<32 hex digits>.dir``) and the file it was read from.

    Raises:
        SubmitError: Neither file records it, or it is not a folder md5.
    """
    folder = Path(source) if Path(source).is_absolute() else project / source
    name = _relative(folder, project)
    dvc_file = folder.with_name(f"{folder.name}.dvc")
    lock = project / "dvc.lock"
    found: DataVersion | None = None
    if dvc_file.is_file() and (md5 := _md5_from_dvc_file(dvc_file)):
        found = DataVersion(md5, _relative(dvc_file, project))
    elif lock.is_file() and (md5 := _md5_from_lock(lock, name)):
        found = DataVersion(md5, "dvc.lock, stage ingest: the data of the last `dvc repro`")
    if found is None:
        raise SubmitError(
            f"no data version for {name}: neither {_relative(dvc_file, project)} nor dvc.lock's ingest stage "
            f"records its md5; run `dvc add {name}` (and commit the .dvc file) or `dvc repro ingest`, "
            "or pass --data-version <md5>.dir"
        )
    return check_data_version(found)


def check_data_version(version: DataVersion) -> DataVersion:
    """Return ``version`` when it is a DVC folder md5.

    Raises:
        SubmitError: It is not ``<32 hex digits>.dir``.
    """
    if not DATA_VERSION_PATTERN.match(version.md5):
        raise SubmitError(
            f"data version {version.md5!r} (from {version.origin}) is not a DVC folder md5: expected 32 hex "
            "digits and '.dir', as a folder's .dvc file records it"
        )
    return version


def git_commit(project: Path) -> str:
    """Return the short commit of ``project``, with ``-dirty`` when ``git status`` shows changes; ``nogit`` without.

    Args:
        project: A folder inside the git working tree.
    """
    git = shutil.which("git")
    if git is None:
        return "nogit"
    try:
        sha = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        status = subprocess.run(
            [git, "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return "nogit"
    if not sha:
        return "nogit"
    return f"{sha}-dirty" if status.strip() else sha


def run_name(commit: str, data_version: str, when: datetime | None = None, prefix: str = NAME_PREFIX) -> str:
    """Name a run (or a recurring run) after what it trains: ``<prefix>-<commit>-data-<md5[:8]>[-<UTC time>]``.

    Args:
        commit: From :func:`git_commit`.
        data_version: The tiles folder's DVC md5.
        when: The time to add (UTC, to the second); None adds none.
        prefix: The name's start.
    """
    stamp = f"-{when.astimezone(UTC):%Y%m%dT%H%M%SZ}" if when else ""
    return f"{prefix}-{commit}-data-{data_version[:8]}{stamp}"


def prepare_run(
    params_file: str | Path,
    source_dir: str = DEFAULT_SOURCE_DIR,
    mlflow_tracking_uri: str = DEFAULT_MLFLOW_TRACKING_URI,
    data_version: str | None = None,
    dvc_remote: str = "",
) -> RunRequest:
    """Validate params.yaml, find the data version and the commit, and build the run's arguments.

    Nothing here calls the cluster.

    Args:
        params_file: The params.yaml to send; its folder is the project folder.
        source_dir: Tiles folder in the image, as the pods see it (used without a DVC remote).
        mlflow_tracking_uri: MLflow tracking URI, as the pods see it.
        data_version: The tiles folder's DVC md5; None reads it (:func:`read_data_version`).
        dvc_remote: DVC remote the pods pull the data version from (``s3://...``); empty uses ``source_dir``.

    Returns:
        The request: arguments ``data_version``, ``dvc_remote``, ``source_dir``, ``params``,
        ``mlflow_tracking_uri``, and the data version's origin and the commit.

    Raises:
        bonetumor.errors.ConfigError: params.yaml is missing or invalid.
        SubmitError: No valid data version, or a remote that is not a URL.
    """
    params_file = Path(params_file)
    config = load_config(params_file)
    project = params_file.resolve().parent
    if dvc_remote and "://" not in dvc_remote:
        raise SubmitError(f"--dvc-remote {dvc_remote!r} is not a URL; expected e.g. s3://bucket/dvc")
    if data_version:
        version = check_data_version(DataVersion(data_version, "--data-version"))
    else:
        version = read_data_version(config.data.source, project)
    arguments = {
        "data_version": version.md5,
        "dvc_remote": dvc_remote,
        "source_dir": source_dir,
        "params": run_params(config),  # KFP parameters hold no None: data_import (unused there) is left out
        "mlflow_tracking_uri": mlflow_tracking_uri,
    }
    return RunRequest(arguments, version, git_commit(project), params_file)


def build_arguments(
    params_file: str | Path,
    source_dir: str = DEFAULT_SOURCE_DIR,
    mlflow_tracking_uri: str = DEFAULT_MLFLOW_TRACKING_URI,
    data_version: str | None = None,
    dvc_remote: str = "",
) -> dict[str, Any]:
    """Validate params.yaml and build the pipeline's run arguments (:func:`prepare_run`'s ``arguments``).

    Args:
        params_file: The params.yaml to send.
        source_dir: Folder of class sub-folders, as seen from the pipeline's pods.
        mlflow_tracking_uri: MLflow tracking URI, as seen from the pipeline's pods.
        data_version: The tiles folder's DVC md5; None reads it from its ``.dvc`` file or dvc.lock.
        dvc_remote: DVC remote to pull the data from; empty: the tiles of ``source_dir`` in the image.

    Returns:
        The ``arguments`` of the run: ``data_version``, ``dvc_remote``, ``source_dir``, ``params`` and
        ``mlflow_tracking_uri``.

    Raises:
        bonetumor.errors.ConfigError: params.yaml is missing or invalid.
        SubmitError: No valid data version.
    """
    return prepare_run(params_file, source_dir, mlflow_tracking_uri, data_version, dvc_remote).arguments


def check_package(package: str | Path, arguments: dict[str, Any]) -> list[str]:
    """Check that the compiled pipeline exists and takes every run argument; return its tasks' images.

    Args:
        package: The compiled pipeline (YAML).
        arguments: The run's arguments.

    Raises:
        SubmitError: The file is missing, is not a compiled pipeline, or lacks a parameter (an older compile).
    """
    path = Path(package)
    if not path.is_file():
        raise SubmitError(f"{path} not found; compile it: bonetumor pipeline compile (python -m pipelines.compile)")
    try:
        first = next(iter(yaml.safe_load_all(path.read_text(encoding="utf-8"))), None)
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"cannot read {path} as a compiled pipeline: {' '.join(str(exc).split())}") from exc
    spec: dict[str, Any] = first if isinstance(first, dict) else {}
    root = spec.get("root")
    if not isinstance(root, dict) or "pipelineInfo" not in spec:
        raise SubmitError(f"{path} is not a compiled KFP pipeline (no pipelineInfo/root); compile it again")
    parameters = (root.get("inputDefinitions") or {}).get("parameters") or {}
    missing = sorted(set(arguments) - set(parameters))
    if missing:
        raise SubmitError(
            f"{path} takes no parameter {', '.join(missing)}: it was compiled from an older pipeline; "
            "compile it again (bonetumor pipeline compile)"
        )
    executors = (spec.get("deploymentSpec") or {}).get("executors") or {}
    return sorted({str(e.get("container", {}).get("image")) for e in executors.values() if isinstance(e, dict)})


def normalise_host(host: str) -> str:
    """Return the KFP endpoint without a trailing slash.

    Raises:
        SubmitError: It has no http:// or https:// scheme.
    """
    if not host.startswith(("http://", "https://")):
        raise SubmitError(f"--host {host!r} needs its scheme: e.g. http://{host.split('://')[-1].rstrip('/')}")
    return host.rstrip("/")


def read_token(token_file: str | Path | None) -> str | None:
    """Return the bearer token of ``token_file``, of ``$KF_PIPELINES_SA_TOKEN_PATH``, or of the pod's KFP token.

    Args:
        token_file: A file holding the token; None looks at the variable, then at the pod's path.

    Returns:
        The token, or None when no file is named and the pod's path does not exist.

    Raises:
        SubmitError: The named file cannot be read or is empty.
    """
    path = token_file or os.environ.get(TOKEN_PATH_ENV) or (POD_TOKEN_PATH if POD_TOKEN_PATH.is_file() else None)
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SubmitError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise SubmitError(f"the token file {path} is empty")
    return token


def _why(exc: BaseException) -> str:
    """A short reason of a network error: connection refused, name not resolved, timed out, or its message."""
    import urllib3

    reason: BaseException = exc
    while isinstance(reason, urllib3.exceptions.MaxRetryError) and reason.reason is not None:
        reason = reason.reason
    text = " ".join(str(reason).split())
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(reason, urllib3.exceptions.NameResolutionError) or "resolve" in text.lower():
        return "host name not resolved"
    if isinstance(reason, (urllib3.exceptions.TimeoutError, TimeoutError)) or "timed out" in text.lower():
        return f"no answer within {PROBE_TIMEOUT_S:.0f} s"
    return text[:200] or type(reason).__name__


def unreachable_message(host: str, why: str) -> str:
    """The one line for a host that does not answer."""
    return (
        f"cannot reach the Kubeflow Pipelines API at {host} ({why}): check the URL and the port "
        f"(for a cluster: {PORT_FORWARD_HINT})"
    )


def unauthorised_message(host: str, status: int | str, namespace: str | None = None) -> str:
    """The one line for a host that refuses the credentials (401, 403, or a redirect to a login page)."""
    where = f" in namespace {namespace}" if namespace else ""
    return (
        f"unauthorised: the Kubeflow Pipelines API at {host} refused the request ({status}): pass a bearer token "
        f"with --token-file FILE, or set {TOKEN_PATH_ENV} to a file holding one (in Python: "
        f"kfp.Client(existing_token=...)); on a multi-user KFP the token's identity also needs RBAC{where} "
        "(infra/k8s/base/pipelines/rbac.yaml)"
    )


def _api_message(host: str, exc: Any, namespace: str | None) -> str:
    """The one line for a kfp_server_api.ApiException."""
    status = int(exc.status or 0)
    if status == 0:
        return unreachable_message(host, " ".join(str(exc.reason or "no answer").split())[:200])
    if status in (401, 403):
        return unauthorised_message(host, f"HTTP {status} {exc.reason or ''}".strip(), namespace)
    if 300 <= status < 400:
        location = (exc.headers or {}).get("Location", "elsewhere")
        return unauthorised_message(host, f"HTTP {status}, redirected to {location}, a login page", namespace)
    if status == 404:
        return (
            f"{host} has no Kubeflow Pipelines v2 API (HTTP 404): check that --host is the KFP API or UI service "
            f"of a KFP >= 2.0 (for a cluster: {PORT_FORWARD_HINT})"
        )
    try:
        body = json.loads(exc.body or "{}")
        detail = (body.get("message") or body.get("error") or "") if isinstance(body, dict) else body
    except (TypeError, ValueError):
        detail = str(exc.body or "")
    detail = " ".join(str(detail).split())[:300]
    return f"the Kubeflow Pipelines API at {host} answered HTTP {status} {exc.reason or ''}: {detail}".rstrip(": ")


@contextmanager
def host_errors(host: str, namespace: str | None = None) -> Iterator[None]:
    """Turn what a dead, unreachable or unauthorising host raises into a :class:`SubmitError`.

    Covers kfp_server_api.ApiException (status 0: no answer; 401/403: unauthorised; any other HTTP error), urllib3
    errors (MaxRetryError: refused, not resolved, timed out), requests' connection errors and timeouts, and
    ``TimeoutError`` (``kfp.Client`` gives up on the health endpoint after 5 tries).

    Args:
        host: The endpoint, for the message.
        namespace: The Kubernetes namespace, for the message.
    """
    import kfp_server_api
    import requests
    import urllib3

    unreachable = (
        urllib3.exceptions.HTTPError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        TimeoutError,
        ConnectionError,
    )
    try:
        yield
    except kfp_server_api.ApiException as exc:
        raise SubmitError(_api_message(host, exc, namespace)) from exc
    except unreachable as exc:
        raise SubmitError(unreachable_message(host, _why(exc))) from exc


def probe(host: str, token: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Ask the host's health endpoint once, without following redirects (a login page is unauthorised).

    Args:
        host: The KFP endpoint.
        token: Bearer token, or None.
        timeout_s: Seconds to wait for the connection, and again for the answer.

    Raises:
        kfp_server_api.ApiException, urllib3.exceptions.HTTPError: What :func:`host_errors` translates.
        SubmitError: The host answers, but not as the KFP API.
    """
    import kfp_server_api
    import urllib3

    config = kfp_server_api.Configuration(host=host)
    # One retry of a failed connection; a redirect is returned (and refused below), not followed.
    config.retries = urllib3.util.Retry(total=2, connect=1, read=0, redirect=0, raise_on_redirect=False)
    if token:
        config.api_key["authorization"] = token
        config.api_key_prefix["authorization"] = "Bearer"
    with kfp_server_api.ApiClient(config) as api_client:
        response = kfp_server_api.HealthzServiceApi(api_client).healthz_service_get_healthz(
            _request_timeout=(timeout_s, timeout_s), _preload_content=False
        )
    try:
        answer = json.loads(response.data or b"")
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        kind = response.headers.get("Content-Type", "no content type")
        raise SubmitError(
            f"{host} answered {HEALTHZ_PATH} with {kind}, not the Kubeflow Pipelines API's JSON: check that --host "
            "is the KFP API (KFP >= 2.0); a login page means an auth proxy wants a token (--token-file FILE)"
        )


def connect(host: str, namespace: str | None = None, token_file: str | Path | None = None) -> kfp.Client:
    """Check the host answers and accepts the credentials, then build the ``kfp.Client``.

    Args:
        host: The KFP endpoint (http:// or https://).
        namespace: Kubernetes namespace (multi-user KFP); None for a standalone KFP.
        token_file: File holding a bearer token (:func:`read_token`).

    Returns:
        The client.

    Raises:
        SubmitError: The host is unreachable, refuses the credentials, or is not a KFP API.
    """
    import kfp

    host = normalise_host(host)
    token = read_token(token_file)
    with host_errors(host, namespace):
        probe(host, token)
        with warnings.catch_warnings():
            # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later versions."
            warnings.simplefilter("ignore", FutureWarning)
            return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of what a run is sent and where, shared by submit and schedule."""
    host = os.environ.get(HOST_ENV)
    parser.add_argument(
        "--host", default=host, required=not host, help=f"KFP API endpoint, e.g. http://localhost:8080 (${HOST_ENV})"
    )
    parser.add_argument("--experiment", default=PIPELINE_NAME, help=f"KFP experiment (default: {PIPELINE_NAME})")
    parser.add_argument("--params", default="params.yaml", help="params file to send (default: params.yaml)")
    parser.add_argument(
        "--data-version", default=None, help="tiles folder's DVC md5 (default: its .dvc file, else dvc.lock)"
    )
    parser.add_argument("--dvc-remote", default="", help="DVC remote the pods pull the data from (default: none)")
    parser.add_argument(
        "--source-dir", default=DEFAULT_SOURCE_DIR, help=f"tiles folder in the image (default: {DEFAULT_SOURCE_DIR})"
    )
    parser.add_argument(
        "--mlflow-tracking-uri",
        default=DEFAULT_MLFLOW_TRACKING_URI,
        help="MLflow URI in the pods (default: in-cluster)",
    )
    parser.add_argument("--namespace", default=None, help="Kubernetes namespace (multi-user KFP only)")
    parser.add_argument("--package", default=str(PIPELINE_YAML), help="compiled pipeline (default: the committed YAML)")
    parser.add_argument("--token-file", default=None, help=f"file holding a bearer token (default: ${TOKEN_PATH_ENV})")
    parser.add_argument("--service-account", default=None, help="Kubernetes ServiceAccount of the run's pods")
    parser.add_argument(
        "--no-cache", action="store_true", help="run every task anew (default: the compiled caching settings)"
    )


def prepare_from_args(args: argparse.Namespace) -> tuple[RunRequest, list[str]]:
    """Build the run request from parsed options and check the package against it (no network).

    Returns:
        The request and the package's images.

    Raises:
        bonetumor.errors.ConfigError: params.yaml is missing or invalid.
        SubmitError: No valid data version, or a package that does not fit.
    """
    request = prepare_run(args.params, args.source_dir, args.mlflow_tracking_uri, args.data_version, args.dvc_remote)
    return request, check_package(args.package, request.arguments)


def fail(exc: Exception) -> int:
    """Print ``exc`` as one ``error:`` line on stderr; return the exit status 1."""
    print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
    return 1


def submit(args: argparse.Namespace) -> None:
    """Create one run of the pipeline from parsed options, printing what was sent.

    Raises:
        bonetumor.errors.ConfigError: params.yaml is missing or invalid.
        SubmitError: Anything else the user can fix (data version, package, host, credentials).
    """
    request, images = prepare_from_args(args)
    name = run_name(request.commit, request.data_version.md5, datetime.now(UTC))
    client = connect(args.host, args.namespace, args.token_file)
    with host_errors(normalise_host(args.host), args.namespace):
        result = client.create_run_from_pipeline_package(
            args.package,
            arguments=request.arguments,
            run_name=name,
            experiment_name=args.experiment,
            namespace=args.namespace,
            enable_caching=False if args.no_cache else None,
            service_account=args.service_account,
        )
    for line in request.describe():
        print(line)
    print(f"image: {', '.join(images)}")
    print(f"submitted run {result.run_id} ({name}) to {args.host} (experiment {args.experiment})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.submit``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 when the run was created; 1 with one ``error:`` line on stderr otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    add_run_options(parser)
    args = parser.parse_args(argv)
    try:
        submit(args)
    except (ConfigError, SubmitError) as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
