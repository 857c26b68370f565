"""Where a registered model's data can be restored from: recorded at registration, printed by ``bonetumor lineage``.

The tiles a model was trained on are named two ways: the data version (a SHA-256 over every tile's content hash
and label, :func:`bonetumor.registry.tracking.data_version`) and DVC's md5 of the data source. Which commands bring
those exact bytes back depends on who tracks the source:

* ``dvc`` -- a ``.dvc`` file (``bonetumor data import`` runs ``dvc add``): the file at the recorded commit names the
  content, and ``dvc checkout`` (``dvc pull`` where the local cache lacks it) writes it back. The ``.dvc`` file's
  content is also logged with the model (``lineage/<name>.dvc``), so it restores even where the commit is gone or
  the file was not committed.
* ``git`` -- files committed to git (the built-in sample): ``git checkout <commit> -- <source>``.

Registration never refuses: a data source with uncommitted or untracked files is recorded as not restorable from
the commit (``restorable: false`` with why), the version is tagged so, and the lineage says so. Only the YAML files
and ``git`` are read; the package does not import DVC.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bonetumor.registry.tracking import dvc_data_version
from bonetumor.utils import git_commit

log = logging.getLogger(__name__)

#: Most changed paths a record lists (a tree with thousands of changes is "dirty", the rest adds nothing).
MAX_DIRTY_PATHS = 20


@dataclass(frozen=True)
class RestoreRecord:
    """How to bring back the data source of a registration, byte for byte.

    Attributes:
        source: The data source, relative to the project (``data.source``).
        tracked_by: ``dvc`` (a ``.dvc`` file), ``git`` (committed files) or ``untracked``.
        dvc_md5: DVC's md5 of the source (``untracked`` when DVC knows nothing of it).
        recorded_in: The file that records the md5 (a ``.dvc`` file, or ``dvc.lock (stage ingest)``).
        dvc_file: The ``.dvc`` file (relative to the project) when ``tracked_by`` is ``dvc``.
        commit: The git commit at registration (with ``-dirty`` when tracked files had changes).
        dirty_paths: Tracked files changed at registration (at most :data:`MAX_DIRTY_PATHS`).
        restorable: Whether the commands give back the registered bytes.
        reason: Why not, when not.
        commands: Shell commands, run in a clone of the project, that restore the source.
    """

    source: str
    tracked_by: str
    dvc_md5: str
    recorded_in: str
    dvc_file: str
    commit: str
    dirty_paths: tuple[str, ...]
    restorable: bool
    reason: str
    commands: tuple[str, ...] = field(default=())

    @property
    def dirty(self) -> bool:
        """Whether tracked files differed from the commit at registration."""
        return self.commit.endswith("-dirty")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``lineage.json``."""
        return asdict(self) | {"dirty": self.dirty}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RestoreRecord:
        """Rebuild a record from :meth:`to_dict`'s output (unknown keys are ignored)."""
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["dirty_paths"] = tuple(known.get("dirty_paths", ()))
        known["commands"] = tuple(known.get("commands", ()))
        return cls(**known)


def _git(project: Path, *args: str) -> str | None:
    """Run git in ``project``; None outside a git checkout (a Kubeflow pod, an image) or without git."""
    try:
        return subprocess.run(
            ["git", *args], cwd=project, capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def restore_record(source: str, project_dir: str | Path, run_id: str = "") -> RestoreRecord:
    """Record who tracks the data source, whether the commit holds it unchanged, and the commands that restore it.

    Args:
        source: ``data.source`` (relative to the project, or absolute).
        project_dir: The project (git and DVC) folder.
        run_id: The MLflow run the ``.dvc`` file's copy is logged with (for the fallback command).

    Returns:
        The record; ``restorable`` is false, with the reason, when the bytes cannot be restored from the commit.
    """
    project = Path(project_dir).resolve()
    path = Path(source)
    path = (path if path.is_absolute() else project / path).resolve()
    relative = path.relative_to(project).as_posix() if project in path.parents or path == project else str(path)
    dvc = dvc_data_version(source, project)
    commit = git_commit(project)
    status = _git(project, "status", "--porcelain", "--untracked-files=no")
    dirty_paths = tuple(line[3:] for line in (status or "").splitlines() if line.strip())[:MAX_DIRTY_PATHS]
    clean_commit = commit.removesuffix("-dirty")
    if dvc["recorded_in"].endswith(".dvc") or ".dvc (" in dvc["recorded_in"]:
        dvc_file = dvc["recorded_in"].split(" (", 1)[0]
        changed = _git(project, "status", "--porcelain", "--", dvc_file)
        commands = (
            f"git checkout {clean_commit} -- {dvc_file}",
            f"dvc checkout {dvc_file}  # or: dvc pull {dvc_file}, where the local DVC cache lacks it",
        )
        if changed is None:
            return RestoreRecord(
                relative, "dvc", dvc["md5"], dvc["recorded_in"], dvc_file, commit, dirty_paths, False,
                "not a git checkout: the .dvc file is only in the model's lineage artifacts",
                _from_artifact(dvc_file, run_id),
            )  # fmt: skip
        if changed.strip():
            return RestoreRecord(
                relative, "dvc", dvc["md5"], dvc["recorded_in"], dvc_file, commit, dirty_paths, False,
                f"{dvc_file} was not committed as registered (git status: {changed.strip()}); restore from the "
                "copy logged with the model instead",
                _from_artifact(dvc_file, run_id),
            )  # fmt: skip
        return RestoreRecord(
            relative, "dvc", dvc["md5"], dvc["recorded_in"], dvc_file, commit, dirty_paths, True, "", commands
        )
    tracked = _git(project, "ls-files", "--", relative)
    if tracked is None or not tracked.strip():
        why = "not a git checkout" if tracked is None else f"{relative} is neither committed to git nor in a .dvc file"
        return RestoreRecord(
            relative, "untracked", dvc["md5"], dvc["recorded_in"], "", commit, dirty_paths, False,
            f"{why}: nothing can restore these tiles; track them with `bonetumor data import` (dvc add) and commit "
            "the .dvc file before registering",
        )  # fmt: skip
    changed = _git(project, "status", "--porcelain", "--untracked-files=all", "--", relative) or ""
    if changed.strip():
        lines = changed.strip().splitlines()
        return RestoreRecord(
            relative, "git", dvc["md5"], dvc["recorded_in"], "", commit, dirty_paths, False,
            f"{len(lines)} file(s) under {relative} differed from commit {clean_commit[:12]} at registration "
            f"(first: {lines[0].strip()}); commit the data before registering",
        )  # fmt: skip
    return RestoreRecord(
        relative, "git", dvc["md5"], dvc["recorded_in"], "", commit, dirty_paths, True, "",
        (f"git checkout {clean_commit} -- {relative}",),
    )  # fmt: skip


def _from_artifact(dvc_file: str, run_id: str) -> tuple[str, ...]:
    """Commands that restore DVC-tracked data from the ``.dvc`` file logged with the model."""
    name = Path(dvc_file).name
    return (
        f"mlflow artifacts download --run-id {run_id or '<refit run id>'} --artifact-path lineage/{name} "
        f"--dst-path {Path(dvc_file).parent.as_posix()}",
        f"dvc checkout {dvc_file}  # or: dvc pull {dvc_file}, where the local DVC cache lacks it",
    )
