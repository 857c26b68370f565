"""Process set-up shared by every entry point (CLI, Kubeflow components), and the preflight checks of a run.

Telemetry off, readable logs, and the checks of the environment a run needs (weights, tracking store) that
``bonetumor check`` makes before a pipeline. Kept free of heavy imports (no mlflow, no torch at module level) so
that calling it costs nothing. The checks live here rather than in ``training``/``registry`` because no stage
runs them: those folders are DVC deps, and a preflight helper must not make the trained models stale.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from pathlib import Path

from bonetumor.errors import ConfigError, RegistryUnavailableError, WeightsUnavailableError

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


def absolute_tracking_uri(uri: str, base_dir: str | Path) -> str:
    """Return ``uri`` with a relative ``sqlite:///`` path made absolute against ``base_dir`` (the project folder).

    So every stage, and the service, whatever its working folder, uses the same database.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((Path(base_dir) / uri[len(prefix) :]).resolve())
    return uri


def check_weights_setting(arch: str, weights: str) -> str:
    """Check ``train.weights`` for one architecture without loading anything (the pipeline's preflight).

    Returns:
        What training will start from.

    Raises:
        ConfigError: Unknown architecture.
        WeightsUnavailableError: ``imagenet`` without the file in TORCH_HOME, or a path that does not exist.
    """
    from bonetumor.training.models import ARCHITECTURES, imagenet_weights_path

    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"train.architectures: unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}"
        )
    if weights == "none":
        return f"{arch}: random initialisation (train.weights: none)"
    if weights == "imagenet":
        path = imagenet_weights_path(arch)
        if not path.is_file():
            raise WeightsUnavailableError(
                f"train.weights=imagenet: no ImageNet weights for {arch} at {path}; run `bonetumor weights fetch "
                f"{arch}` where there is internet and copy the file there, or set train.weights: auto"
            )
        return f"{arch}: ImageNet weights {path}"
    if weights != "auto":
        path = Path(weights.replace("{arch}", arch))
        if not path.is_file():
            raise WeightsUnavailableError(
                f"train.weights={weights!r}: {path} does not exist; expected a state-dict file for {arch}"
            )
        return f"{arch}: weights from {path}"
    path = imagenet_weights_path(arch)
    if path.is_file():
        return f"{arch}: ImageNet weights {path} (train.weights: auto)"
    return f"{arch}: no ImageNet file at {path}; train.weights=auto downloads it, else trains from random init"


def check_tracking_store(uri: str, timeout: float = 5.0) -> str:
    """Check, in seconds and without creating anything, that the tracking store can be used before a run starts.

    * ``sqlite:///`` - the folder exists and is writable, and when the database exists no other process holds its
      write lock at this moment (a second pipeline mid-write; one between writes is not seen);
    * ``http(s)://`` - the server answers ``/health``, and an API call with the credentials MLflow's client would
      send (:func:`tracking_credentials`) is not refused (``/health`` is open even on a ``basic-auth`` server);
    * anything else (``file:``, ``databricks``) is left to MLflow.

    Args:
        uri: The resolved tracking URI (:func:`resolve_tracking_uri`).
        timeout: Seconds to wait for a lock or a server.

    Returns:
        What was checked, for the log.

    Raises:
        ConfigError: The store cannot be used, or the server refused the credentials (one line naming the URI,
            the HTTP status and the variables to set; never the password).
    """
    import urllib.error
    import urllib.request

    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
            raise ConfigError(f"tracking store {uri}: folder {path.parent} is missing or not writable")
        if not path.exists():
            return f"tracking store {uri}: new sqlite database (created by the first stage)"
        try:
            connection = sqlite3.connect(path, timeout=timeout)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.rollback()
            finally:
                connection.close()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise ConfigError(f"tracking store {uri}: cannot write to {path} ({exc})") from exc
            raise ConfigError(
                f"tracking store {uri}: another process holds the lock on {path.name} ({exc}); another run "
                "(make pipeline, dvc repro, mlflow ui writing) is writing to it. Wait for it to finish, or point "
                "tracking.uri / MLFLOW_TRACKING_URI elsewhere"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"tracking store {uri}: {path} is not a readable sqlite database ({exc})") from exc
        return f"tracking store {uri}: sqlite database writable, not locked"
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310 (http(s) only, checked)
                status = response.status
        except urllib.error.HTTPError as exc:  # a server answered, with an error
            raise ConfigError(
                f"tracking server {uri}: {health} answered HTTP {exc.code}; expected 200 (a wrong URL, or a proxy "
                "or an authentication in front of it?)"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(
                f"tracking server {uri} is not reachable ({reason}); start it (mlflow server ...) or set "
                "MLFLOW_TRACKING_URI / tracking.uri to a running one"
            ) from exc
        if status != 200:
            raise ConfigError(f"tracking server {uri}: {health} answered HTTP {status}; expected 200")
        return f"tracking server {uri}: healthy, {_check_credentials(uri, timeout)}"
    return f"tracking store {uri}: not checked (MLflow handles this scheme)"


#: The variables MLflow's client reads for a tracking server's HTTP basic authentication (``mlflow server
#: --app-name basic-auth``); MLFLOW_TRACKING_TOKEN sends a bearer token instead.
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
#: An endpoint every authenticated user may call (basic-auth filters the answer by permission), and cheap.
AUTH_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
#: Least seconds to wait for it: a server checks a password it has not cached by hashing it (PBKDF2), which takes
#: seconds on a busy machine.
AUTH_PROBE_TIMEOUT = 20.0


def tracking_credentials() -> tuple[str | None, str | None]:
    """The user name and password MLflow's client would send, found as it finds them.

    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, each else from the ``[mlflow]`` section of
    ``~/.mlflow/credentials`` (``mlflow.utils.credentials.read_mlflow_creds``, read here without importing MLflow).
    """
    import configparser

    from_file: dict[str, str] = {}
    path = Path("~/.mlflow/credentials").expanduser()
    if path.is_file():
        parser = configparser.ConfigParser()
        parser.read(path)
        if parser.has_section("mlflow"):
            from_file = dict(parser["mlflow"])
    username, password = (os.environ.get(name) or from_file.get(name.lower()) for name in CREDENTIAL_VARIABLES)
    return username, password


def credentials_refused(uri: str, status: int) -> str:
    """The one-line message for a tracking server that answered HTTP ``status`` (401 or 403) to a request.

    It names the user, never the password.
    """
    username, password = tracking_credentials()
    if username and password:
        sent = f"user {username!r}"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        sent = "the token in MLFLOW_TRACKING_TOKEN"
    else:
        sent = "no credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD unset)"
    if status == 403:
        why = f"HTTP 403 Forbidden: {sent} may not do this; its admin grants the permission, or use another account"
    else:
        why = f"HTTP {status} Unauthorized: wrong or missing user name or password; sent {sent}"
    return (
        f"tracking server {uri} refused the credentials ({why}); set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to an account of that server (docs/mlflow-server.md)"
    )


def _check_credentials(uri: str, timeout: float) -> str:
    """Make one authenticated request, with the credentials MLflow would send; return what was accepted.

    ``/health`` is open on an authenticating server, so only a real API call shows refused credentials.
    """
    import base64
    import urllib.error
    import urllib.request

    if os.environ.get("MLFLOW_TRACKING_AUTH") or os.environ.get("MLFLOW_TRACKING_AWS_SIGV4", "").lower() == "true":
        return "credentials not checked (MLFLOW_TRACKING_AUTH / MLFLOW_TRACKING_AWS_SIGV4 plug-in)"
    username, password = tracking_credentials()
    headers: dict[str, str] = {}
    accepted = "no credentials needed"
    if username and password:
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
        accepted = f"credentials of user {username!r} accepted"
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        accepted = "token accepted"
    request = urllib.request.Request(uri.rstrip("/") + AUTH_PROBE, headers=headers)  # noqa: S310 (http(s) only)
    try:
        with urllib.request.urlopen(request, timeout=max(timeout, AUTH_PROBE_TIMEOUT)):  # noqa: S310 (http(s) only)
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(credentials_refused(uri, exc.code)) from exc
        raise ConfigError(
            f"tracking server {uri}: {AUTH_PROBE} answered HTTP {exc.code}; expected 200 (an MLflow server whose "
            "backend store fails, or not an MLflow server?)"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ConfigError(f"tracking server {uri}: {AUTH_PROBE} failed ({getattr(exc, 'reason', exc)})") from exc
    return accepted


#: What to do when there is no model to serve.
MAKE_A_MODEL = (
    "run `make pipeline` to train and register a model, or set MLFLOW_TRACKING_URI (or tracking.uri in "
    "params.yaml) to the store that holds it"
)


def check_registry_store(uri: str, timeout: float = 5.0) -> str:
    """Check, in seconds and without creating anything, that the registry's tracking store can be read.

    Asked first, MLflow's client retries a dead server for minutes and, for a sqlite URI, creates an empty
    database where there is none, then reports the model as missing; a service must fail at once and say why.

    * ``http(s)://`` - the server answers ``/health`` (:func:`check_tracking_store`);
    * ``sqlite:///`` - the database file exists, opens read-only and holds MLflow's registry tables (a pipeline
      writing to it meanwhile is fine: serving only reads);
    * anything else is left to MLflow.

    Args:
        uri: The resolved tracking URI (:func:`bonetumor.registry.tracking.resolve_tracking_uri`).
        timeout: Seconds to wait for the server or for a lock.

    Returns:
        What was checked, for the log.

    Raises:
        RegistryUnavailableError: The store cannot be used; the message names the URI and what to do.
    """
    if uri.startswith(("http://", "https://")):
        try:
            return check_tracking_store(uri, timeout)
        except ConfigError as exc:
            raise RegistryUnavailableError(str(exc)) from exc
    if not uri.startswith("sqlite:///"):
        return f"tracking store {uri}: not checked (MLflow handles this scheme)"
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.is_file():
        raise RegistryUnavailableError(
            f"tracking store {uri}: the MLflow database does not exist at {path}; {MAKE_A_MODEL}"
        )
    try:
        # Read-only, so that checking never creates or changes the database.
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
        try:
            registry = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'registered_models'"
            ).fetchone()
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:  # not a database, unreadable, or locked for longer than the timeout
        raise RegistryUnavailableError(
            f"tracking store {uri}: {path} cannot be read as an sqlite database ({exc}); {MAKE_A_MODEL}"
        ) from exc
    if registry is None:
        raise RegistryUnavailableError(
            f"tracking store {uri}: {path} holds no MLflow model registry (no registered_models table); {MAKE_A_MODEL}"
        )
    return f"tracking store {uri}: sqlite database with a model registry"
