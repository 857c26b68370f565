"""Small shared helpers: hashing, atomic outputs, JSON files, seeding, provenance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bonetumor.errors import ArtifactError


def format_number(value: float | None, digits: int = 3) -> str:
    """Return ``value`` with ``digits`` decimals, or ``n/a`` for None and NaN (undefined metrics in reports)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_interval(summary: dict[str, Any] | None, digits: int = 3, single: str = " (1 fold)") -> str:
    """Return a fold summary (:func:`bonetumor.evaluation.stats.fold_summary`) as ``mean [low, high]``.

    ``n/a`` without a mean; the mean and ``single`` when there is no interval (one fold).
    """
    if not summary or summary.get("mean") is None:
        return "n/a"
    if summary.get("ci_low") is None:
        return f"{summary['mean']:.3f}{single}"
    return f"{summary['mean']:.3f} [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name and move it into place only when the block succeeds.

    A stage that fails or is interrupted therefore never leaves a half-written output folder that a later stage
    (or DVC) could mistake for a complete one; the previous complete output, if any, stays until replaced.

    Args:
        target: The final folder.

    Yields:
        The temporary folder to write into (a sibling of ``target``, so the final move is a rename).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp creates the folder private (0700); give the final output the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(tmp, target)
        return
    # Move the old output aside first: there is never a moment without a complete folder at a known name, and a
    # crash between the two renames leaves the old output recoverable beside the new one.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (temporary file, then rename), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(_finite(data), indent=2, sort_keys=False, default=str, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _finite(data: Any) -> Any:
    # NaN and infinity are not JSON; an undefined metric is written as null.
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def read_json(path: str | Path, what: str) -> Any:
    """Read a JSON file written by an upstream stage.

    Args:
        path: The file.
        what: What the file is, for the error message (for example ``"folds file"``).

    Raises:
        ArtifactError: The file is missing or not valid JSON (for example, half-written by a killed run).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{what} not found at {path}; run the stage that produces it first") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{what} at {path} is not valid JSON ({exc}); rerun the stage that produces it") from exc


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that CPU runs repeat exactly."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_commit(cwd: str | Path | None = None) -> str:
    """Return the current git commit (with ``-dirty`` when tracked files have changes).

    Outside a git checkout (a container image, a Kubeflow pod) it returns ``BONETUMOR_GIT_COMMIT``, which the
    image build sets, or ``unknown``.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BONETUMOR_GIT_COMMIT", "unknown")
    return f"{commit}-dirty" if dirty else commit


class EtaTimer:
    """Estimates the remaining time of a loop of known length from the mean duration of finished steps."""

    def __init__(self, total: int) -> None:
        import time

        self._time = time.monotonic
        self.total = max(total, 1)
        self.done = 0
        self.start = self._time()

    def step(self, n: int = 1) -> None:
        """Record that ``n`` more units of work finished."""
        self.done += n

    @property
    def elapsed(self) -> float:
        """Seconds since the timer started."""
        return self._time() - self.start

    def eta(self) -> str:
        """Return the estimated remaining time as ``m:ss`` (``?`` before the first step)."""
        if self.done == 0:
            return "?"
        remaining = self.elapsed / self.done * (self.total - self.done)
        return f"{int(remaining // 60)}:{int(remaining % 60):02d}"
