"""The restore commands a registration records really bring back the registered tiles, byte for byte.

Real git and DVC repositories: the data changes after registration, then the printed commands run in a shell.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from conftest import SAMPLE, venv_env

from bonetumor.registry.lineage import LINEAGE_DIR, write_lineage_record
from bonetumor.registry.restore import restore_record

pytestmark = pytest.mark.integration

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def sh(command: str, cwd: Path, **env: str) -> str:
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=venv_env(**env), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def project_with_tiles(root: Path, dvc: bool) -> Path:
    """A git repository whose data/tiles holds 6 real tiles, committed to git or tracked by a .dvc file."""
    tiles = root / "data" / "tiles"
    for label in ("Non-Tumor", "Viable-Tumor"):
        for source in sorted((SAMPLE / "images" / label).glob("*.jpg"))[:3]:
            (tiles / label).mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tiles / label / source.name)
    sh("git init -q", root)
    if dvc:
        sh("dvc init -q && dvc config core.analytics false && dvc add -q data/tiles", root)
    sh(f"{' '.join(GIT)} add -A && {' '.join(GIT)} commit -qm data", root)
    return root


def change_the_data(root: Path, dvc: bool) -> None:
    """What happens after a registration: a tile is replaced, one is removed, one is added, and it is committed."""
    tiles = root / "data" / "tiles"
    first, second = sorted(tiles.rglob("*.jpg"))[:2]
    first.write_bytes(second.read_bytes())
    second.unlink()
    shutil.copy2(next((SAMPLE / "images" / "Non-Viable-Tumor").glob("*.jpg")), tiles / "Non-Tumor" / "new.jpg")
    add = "dvc add -q data/tiles && " if dvc else ""
    sh(f"{add}{' '.join(GIT)} add -A && {' '.join(GIT)} commit -qm 'new data'", root)


def run_commands(commands: tuple[str, ...], root: Path, **env: str) -> None:
    for command in commands:
        sh(command, root, **env)


def test_git_tracked_tiles_are_restored_from_the_recorded_commit(tmp_path: Path) -> None:
    root = project_with_tiles(tmp_path, dvc=False)
    registered = digests(root / "data" / "tiles")
    record = restore_record("data/tiles", root)
    assert record.tracked_by == "git"
    assert record.restorable, record
    assert not record.dirty
    change_the_data(root, dvc=False)
    assert digests(root / "data" / "tiles") != registered
    run_commands(record.commands, root)
    restored = digests(root / "data" / "tiles")
    # git checkout <commit> -- path restores the committed files; a file added later stays, so it is named here.
    assert {k: v for k, v in restored.items() if k != "Non-Tumor/new.jpg"} == registered


def test_dvc_tracked_tiles_are_restored_by_dvc_checkout_at_the_recorded_commit(tmp_path: Path) -> None:
    root = project_with_tiles(tmp_path, dvc=True)
    registered = digests(root / "data" / "tiles")
    record = restore_record("data/tiles", root)
    assert (record.tracked_by, record.dvc_file, record.restorable) == ("dvc", "data/tiles.dvc", True), record
    assert record.dvc_md5.endswith(".dir")
    change_the_data(root, dvc=True)
    assert digests(root / "data" / "tiles") != registered
    run_commands(record.commands, root)
    assert digests(root / "data" / "tiles") == registered  # dvc checkout also removes the file added later


def test_an_uncommitted_dvc_file_restores_from_the_copy_logged_with_the_model(tmp_path: Path) -> None:
    root = project_with_tiles(tmp_path / "project", dvc=True)
    change_the_data(root, dvc=True)  # a committed state that is not the one registered below
    tiles = root / "data" / "tiles"
    late = sorted((SAMPLE / "images" / "Non-Tumor").glob("*.jpg"))[-1]
    shutil.copy2(late, tiles / "Viable-Tumor" / "late.jpg")
    sh("dvc add -q data/tiles", root)  # tracked by DVC, but the new .dvc file is not committed
    registered = digests(tiles)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("restore")
    with mlflow.start_run() as run:
        record = restore_record("data/tiles", root, run.info.run_id)
        assert not record.restorable
        assert "data/tiles.dvc was not committed as registered" in record.reason
        manifest = tmp_path / "manifest.csv"
        manifest.write_text("file,label\n")
        folds = tmp_path / "folds.json"
        folds.write_text("{}")
        lineage = write_lineage_record(
            tmp_path / "lineage",
            restore=record,
            manifest_path=manifest,
            tiles={},
            folds_path=folds,
            params={},
            libraries={},
            project_dir=root,
        )
        mlflow.log_artifacts(str(lineage), LINEAGE_DIR)
    sh(f"{' '.join(GIT)} checkout -q -- data/tiles.dvc && dvc checkout -q data/tiles", root)  # back to the commit
    assert digests(tiles) != registered
    run_commands(record.commands, root, MLFLOW_TRACKING_URI=uri)
    assert digests(tiles) == registered


def test_untracked_or_uncommitted_tiles_are_recorded_as_not_restorable(tmp_path: Path) -> None:
    root = project_with_tiles(tmp_path / "project", dvc=False)
    (root / "data" / "tiles" / "Non-Tumor" / "extra.jpg").write_bytes(b"not committed")
    record = restore_record("data/tiles", root)
    assert not record.restorable
    assert "1 file(s) under data/tiles differed from commit" in record.reason
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data").mkdir()
    record = restore_record("data", outside)
    assert record.tracked_by == "untracked"
    assert not record.restorable
    assert "not a git checkout" in record.reason
