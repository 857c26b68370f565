"""A data version pulled from a DVC remote on S3 where there is no git checkout (a Kubeflow pod's fetch_data).

The remote is moto's S3 server on loopback; the tiles are pushed to it by a real ``dvc push`` from a git
project, then pulled by their md5 alone into a folder outside any repository, and compared byte for byte.
"""

from __future__ import annotations

import filecmp
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, venv_env

from bonetumor.data.remote import fetch_data_version
from bonetumor.errors import ConfigError, DatasetError

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BUCKET = "bonetumor-dvc"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on loopback, with an empty bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_boto_keys()).create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"]}


@pytest.fixture(scope="module")
def pushed(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The sample tiles `dvc add`ed and pushed to the bucket from a git project: their md5 and folder."""
    project = tmp_path_factory.mktemp("dvc-project")
    env = venv_env(**KEYS)
    shutil.copytree(SAMPLE / "images", project / "images")
    remote = f"s3://{BUCKET}/store"
    for command in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "remote", "add", "-d", "storage", remote],
        ["dvc", "remote", "modify", "storage", "endpointurl", s3_endpoint],
        ["dvc", "add", "-q", "images"],
        ["dvc", "push", "-q"],
    ):
        subprocess.run(command, cwd=project, env=env, check=True, capture_output=True, timeout=300)
    md5 = yaml.safe_load((project / "images.dvc").read_text(encoding="utf-8"))["outs"][0]["md5"]
    return str(md5), project / "images"


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The pod's environment: the S3 keys (a Secret there) and the endpoint (the ConfigMap there)."""
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("PATH", venv_env()["PATH"])
    return f"s3://{BUCKET}/store"


def test_a_data_version_comes_back_byte_identical_without_git(
    pushed: tuple[str, Path], s3_env: str, tmp_path: Path
) -> None:
    md5, original = pushed
    out = tmp_path / "pod" / "tiles"  # no .git anywhere above it
    result = fetch_data_version(md5, s3_env, "", out)
    assert result == {"data_version": md5, "source": s3_env, "files": 30}
    comparison = filecmp.dircmp(original, out)
    assert sorted(comparison.common_dirs) == ["Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor"]
    for name in comparison.common_dirs:
        sub = comparison.subdirs[name]
        assert (sub.left_only, sub.right_only, sub.diff_files) == ([], [], []), name
        _, mismatch, errors = filecmp.cmpfiles(original / name, out / name, sub.common_files, shallow=False)
        assert (mismatch, errors) == ([], []), name


def test_a_version_the_remote_lacks_is_named(s3_env: str, tmp_path: Path) -> None:
    missing = "0123456789abcdef0123456789abcdef.dir"
    with pytest.raises(DatasetError, match=re.escape(f"pulling data version {missing} from {s3_env}")):
        fetch_data_version(missing, s3_env, "", tmp_path / "tiles")
    assert not (tmp_path / "tiles").exists()


@pytest.mark.parametrize("version", ["", "d7026205", "D7026205D7026205D7026205D7026205.dir", "../etc.dir"])
def test_a_malformed_data_version_is_refused_before_dvc_runs(version: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("not a DVC folder md5; expected 32 hex digits and '.dir'")):
        fetch_data_version(version, "s3://bucket/store", "", tmp_path / "tiles")


def test_without_a_remote_the_image_tiles_are_copied(tmp_path: Path) -> None:
    result = fetch_data_version("", "", SAMPLE / "images", tmp_path / "tiles")
    assert result["files"] == 30
    with pytest.raises(DatasetError, match="not found; expected class sub-folders"):
        fetch_data_version("", "", tmp_path / "nowhere", tmp_path / "other")
