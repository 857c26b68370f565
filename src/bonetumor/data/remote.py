"""One data version of the tiles, fetched from a DVC remote where there is no git checkout (a Kubeflow pod).

A data version is the DVC md5 of the tiles folder (``<md5>.dir``), as its ``.dvc`` file or ``dvc.lock`` records
it. The pod holds no repository, so the fetch builds a throw-away DVC project without git (``dvc init
--no-scm``), writes a ``.dvc`` file naming that md5, and pulls it from the remote: DVC checks every file's hash
on the way, so the tiles are exactly the version asked for. The remote's credentials come from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, and ``AWS_ENDPOINT_URL`` for MinIO or another S3 endpoint),
which the pipeline fills from a Kubernetes Secret, never from a pipeline parameter.

DVC is run as a command, not imported: the package imports no orchestration framework.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bonetumor.errors import ConfigError, DatasetError

#: What a folder's DVC md5 looks like.
DATA_VERSION_PATTERN = re.compile(r"^[0-9a-f]{32}\.dir$")
#: The endpoint of an S3-compatible store (MinIO, moto), read by DVC's ``endpointurl``.
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
#: How long one DVC command may take.
DVC_TIMEOUT_S = 3600


def _dvc(args: list[str], cwd: Path, what: str) -> None:
    """Run one DVC command in ``cwd``; fail naming ``what`` with the end of DVC's own message."""
    try:
        result = subprocess.run(
            ["dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=DVC_TIMEOUT_S, check=False
        )
    except FileNotFoundError as exc:
        raise DatasetError("the `dvc` command is not installed; expected dvc[s3] in the image") from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DatasetError(f"{what} failed (dvc {' '.join(args[:2])}): " + " | ".join(tail))


def pull_data_version(data_version: str, remote: str, out_dir: str | Path) -> int:
    """Pull the tiles folder of ``data_version`` from the DVC remote ``remote`` into ``out_dir``.

    Args:
        data_version: The folder's DVC md5, ``<32 hex digits>.dir``.
        remote: The remote's URL (``s3://bucket/path``, or a local folder).
        out_dir: Where the tiles go (created; must not exist or be empty).

    Returns:
        The number of files pulled.

    Raises:
        ConfigError: ``data_version`` is not a DVC folder md5.
        DatasetError: DVC cannot reach the remote, or the remote lacks that version.
    """
    if not DATA_VERSION_PATTERN.match(data_version):
        raise ConfigError(
            f"data version {data_version!r} is not a DVC folder md5; expected 32 hex digits and '.dir', as the "
            "tiles folder's .dvc file or dvc.lock records it (md5: ...)"
        )
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="bonetumor-dvc-") as tmp:
        project = Path(tmp)
        _dvc(["init", "--no-scm", "-q"], project, "creating a DVC project without git")
        _dvc(["remote", "add", "-d", "origin", remote], project, f"adding the DVC remote {remote}")
        if os.environ.get(ENDPOINT_ENV) and remote.startswith("s3://"):
            endpoint = os.environ[ENDPOINT_ENV]
            _dvc(["remote", "modify", "origin", "endpointurl", endpoint], project, f"setting the endpoint {endpoint}")
        spec = {"outs": [{"md5": data_version, "path": "tiles", "hash": "md5"}]}
        (project / "tiles.dvc").write_text(yaml.safe_dump(spec), encoding="utf-8")
        _dvc(["pull", "-q", "tiles.dvc"], project, f"pulling data version {data_version} from {remote}")
        files = [p for p in (project / "tiles").rglob("*") if p.is_file()]
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            if any(out_dir.iterdir()):
                raise DatasetError(f"{out_dir} is not empty; expected an empty folder for the pulled tiles")
            out_dir.rmdir()
        shutil.copytree(project / "tiles", out_dir)
    return len(files)


def fetch_data_version(data_version: str, remote: str, source_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the tiles of a run into ``out_dir``: ``data_version`` from ``remote``, else a copy of ``source_dir``.

    Args:
        data_version: The tiles folder's DVC md5 (required with a remote; recorded either way).
        remote: The DVC remote's URL; empty to copy ``source_dir`` (the tiles baked into the image).
        source_dir: The local tiles folder used without a remote.
        out_dir: Output folder: one sub-folder per class.

    Returns:
        ``data_version``, ``source`` (the remote or the folder) and ``files`` (how many).

    Raises:
        ConfigError: A remote without a valid data version.
        DatasetError: The remote or ``source_dir`` cannot give the tiles.
    """
    if remote:
        files = pull_data_version(data_version, remote, out_dir)
        return {"data_version": data_version, "source": remote, "files": files}
    source = Path(source_dir)
    if not source.is_dir():
        raise DatasetError(f"tiles folder {source} not found; expected class sub-folders (or pass a DVC remote)")
    shutil.copytree(source, out_dir, dirs_exist_ok=True)
    files = sum(1 for p in Path(out_dir).rglob("*") if p.is_file())
    return {"data_version": data_version, "source": str(source), "files": files}
