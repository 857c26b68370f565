"""A production-shaped MLflow tracking server on loopback: PostgreSQL, S3 (moto) and basic-auth.

``mlflow_stack(root)`` starts, and on exit stops and removes:

* moto in server mode (a real S3 HTTP API) with one bucket;
* a fresh PostgreSQL database on the local server (``POSTGRES``, trust auth), the backend store;
* ``mlflow server --app-name basic-auth`` on that database, proxying artifacts to ``s3://<bucket>/mlartifacts``
  (``--serve-artifacts``), so clients need no S3 credentials; its user database is sqlite under ``root``.

docs/mlflow-server.md describes the same set-up for production.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import free_port, venv_env

#: The local PostgreSQL server (trust auth): one fresh database per stack.
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
#: The same for MLflow: SQLAlchemy 2.1 reads a plain ``postgresql://`` as psycopg 3, the project ships psycopg2.
BACKEND_STORE = "postgresql+psycopg2://postgres@127.0.0.1:5432"
ADMIN = "admin"
#: moto accepts any key; MLflow's server (boto3) needs some.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
#: What a client of a --serve-artifacts server must not need (removed from the clients' environment).
S3_VARIABLES = (*S3_KEYS, "AWS_SESSION_TOKEN", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL")


@dataclass
class MlflowStack:
    """A running stack: the server's URL, the bucket and database behind it, and the admin's password."""

    url: str
    s3_endpoint: str
    bucket: str
    database: str
    admin_password: str
    log_path: Path
    users: dict[str, str] = field(default_factory=dict)

    def client_env(self, user: str, password: str | None = None, **extra: str) -> dict[str, str]:
        """A subprocess environment with ``user``'s credentials and no S3 variables (the server proxies artifacts).

        The tracking URI is the caller's choice (params' ``tracking.uri``, or ``MLFLOW_TRACKING_URI`` in ``extra``).
        """
        env = venv_env(
            MLFLOW_TRACKING_USERNAME=user,
            MLFLOW_TRACKING_PASSWORD=self.users[user] if password is None else password,
            **extra,
        )
        for name in S3_VARIABLES:
            env.pop(name, None)
        return env

    def create_user(self, user: str) -> str:
        """Create a (non-admin) user with a random password, as the admin does; return the password."""
        password = secrets.token_urlsafe(16)
        response = requests.post(
            f"{self.url}/api/2.0/mlflow/users/create",
            json={"username": user, "password": password},
            auth=(ADMIN, self.admin_password),
            timeout=30,
        )
        assert response.status_code == 200, response.text
        self.users[user] = password
        return password

    def s3_keys(self) -> list[str]:
        """Every object key in the bucket."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1", **_boto_keys())
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys

    def sql(self, query: str, *args: object) -> list[tuple[Any, ...]]:
        """Rows of ``query`` (``%s`` placeholders for ``args``) in the backend store's PostgreSQL database."""
        import psycopg2

        connection = psycopg2.connect(f"{POSTGRES}/{self.database}")
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, args)
                return list(cursor.fetchall())
        finally:
            connection.close()

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace")


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_KEYS["AWS_SECRET_ACCESS_KEY"],
    }


def _admin_sql(statement: str) -> None:
    import psycopg2

    connection = psycopg2.connect(f"{POSTGRES}/postgres")
    try:
        connection.autocommit = True  # CREATE / DROP DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute(statement)
    finally:
        connection.close()


@contextmanager
def _moto(bucket: str) -> Iterator[str]:
    """moto's S3 on a free loopback port, holding ``bucket``; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    # moto's werkzeug server logs every request at INFO, which pytest would capture and print on a failure.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_boto_keys()).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


@contextmanager
def _database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; dropped (connections and all) afterwards."""
    name = f"bonetumor_mlflow_{uuid.uuid4().hex[:12]}"
    _admin_sql(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        _admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def write_auth_config(path: Path, admin_password: str, database_uri: str) -> Path:
    """The basic-auth ini (``MLFLOW_AUTH_CONFIG_PATH``): admin password, user store, default permission."""
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        f"admin_username = {ADMIN}\n"
        f"admin_password = {admin_password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request otherwise re-hashes the password (PBKDF2), a real cost for a chatty training client.
        "auth_cache_ttl_seconds = 300\n"
    )
    path.chmod(0o600)
    return path


@contextmanager
def mlflow_stack(root: Path, port: int | None = None, timeout: float = 180) -> Iterator[MlflowStack]:
    """Run the stack (see the module's docstring) with its files under ``root``; stop and remove it on exit.

    Args:
        root: Folder of the server's files (its log, the basic-auth ini and user database).
        port: The server's port on 127.0.0.1 (default: a free one).
        timeout: Seconds to wait for ``/health`` (the first start creates the schema).
    """
    root.mkdir(parents=True, exist_ok=True)
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    admin_password = secrets.token_urlsafe(16)
    auth_ini = write_auth_config(root / "basic_auth.ini", admin_password, f"sqlite:///{root / 'basic_auth.db'}")
    with _moto(bucket) as s3_endpoint, _database() as database:
        port = port or free_port()
        log_path = root / "mlflow-server.log"
        with log_path.open("w") as log:
            server = subprocess.Popen(
                [
                    "mlflow",
                    "server",
                    "--app-name",
                    "basic-auth",
                    "--backend-store-uri",
                    f"{BACKEND_STORE}/{database}",
                    "--artifacts-destination",
                    f"s3://{bucket}/mlartifacts",
                    "--serve-artifacts",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                cwd=root,
                env=venv_env(
                    MLFLOW_S3_ENDPOINT_URL=s3_endpoint,
                    MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
                    MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
                    # No job runner processes (GenAI scorers, trace archival): nothing here uses them.
                    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                    **S3_KEYS,
                ),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stack = MlflowStack(f"http://127.0.0.1:{port}", s3_endpoint, bucket, database, admin_password, log_path)
        stack.users[ADMIN] = admin_password
        try:
            _wait_healthy(stack, server, timeout)
            yield stack
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_healthy(stack: MlflowStack, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited ({server.returncode}):\n{stack.log()[-4000:]}")
        try:
            if requests.get(f"{stack.url}/health", timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not answer /health in {timeout:.0f} s:\n{stack.log()[-4000:]}")
        time.sleep(0.5)
