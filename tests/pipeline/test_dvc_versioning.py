"""The data set under DVC, for real: add, push to a local remote, clone, pull, byte-identical tiles, versions."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import SAMPLE, venv_env

from bonetumor.registry.tracking import dvc_data_version

pytestmark = pytest.mark.integration


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def git(args: list[str], cwd: Path) -> None:
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd)


def checksums(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """A git + DVC repository holding a copy of the sample tiles under data/raw/sample."""
    root = tmp_path / "project"
    shutil.copytree(SAMPLE / "images", root / "data" / "raw" / "sample")
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    return root


def test_add_push_clone_pull_gives_byte_identical_tiles(dvc_project: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    run(["dvc", "add", "data/raw/sample"], dvc_project)
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], dvc_project)
    git(["add", "-A"], dvc_project)
    git(["commit", "-qm", "data v1"], dvc_project)
    run(["dvc", "push"], dvc_project)
    assert any(remote.rglob("*")), "push wrote nothing to the remote"
    # The tiles themselves are not in git: only the .dvc pointer is.
    tracked = run(["git", "ls-files"], dvc_project).stdout.split()
    assert "data/raw/sample.dvc" in tracked
    assert not [name for name in tracked if name.startswith("data/raw/sample/")]

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(dvc_project), str(clone)], tmp_path)
    assert not (clone / "data" / "raw" / "sample").exists()
    run(["dvc", "pull"], clone)
    assert checksums(clone / "data" / "raw" / "sample") == checksums(SAMPLE / "images")

    # The md5 the clone reports is the one recorded in the pointer file the runs are tagged with.
    recorded = yaml.safe_load((dvc_project / "data" / "raw" / "sample.dvc").read_text())["outs"][0]["md5"]
    version = dvc_data_version("data/raw/sample", clone)
    assert version == {"md5": recorded, "recorded_in": "data/raw/sample.dvc"}
    # A class sub-folder as data.source resolves to the tracked folder above it.
    inner = dvc_data_version("data/raw/sample/Non-Tumor", clone)
    assert inner["md5"] == recorded
    assert inner["recorded_in"] == "data/raw/sample.dvc (Non-Tumor inside it)"


def test_changed_data_is_a_new_version_and_the_old_one_comes_back(dvc_project: Path, tmp_path: Path) -> None:
    run(["dvc", "add", "data/raw/sample"], dvc_project)
    git(["add", "-A"], dvc_project)
    git(["commit", "-qm", "data v1"], dvc_project)
    first = dvc_data_version("data/raw/sample", dvc_project)["md5"]
    before = checksums(dvc_project / "data" / "raw" / "sample")

    dropped = next((dvc_project / "data" / "raw" / "sample" / "Viable-Tumor").iterdir())
    dropped.unlink()
    run(["dvc", "add", "data/raw/sample"], dvc_project)
    second = dvc_data_version("data/raw/sample", dvc_project)["md5"]
    assert second != first
    git(["add", "-A"], dvc_project)
    git(["commit", "-qm", "data v2"], dvc_project)

    # Going back to the first commit and checking out its data restores every tile.
    git(["checkout", "-q", "HEAD~1"], dvc_project)
    run(["dvc", "checkout"], dvc_project)
    assert checksums(dvc_project / "data" / "raw" / "sample") == before
    assert dvc_data_version("data/raw/sample", dvc_project)["md5"] == first


def test_untracked_data_says_so(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert dvc_data_version("data", tmp_path) == {"md5": "untracked", "recorded_in": ""}
