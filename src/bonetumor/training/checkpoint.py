"""Checkpoints of :func:`bonetumor.training.engine.fit`: where one lives, when it is valid, writing and reading it.

A checkpoint holds the whole loop state of a fit (model, optimiser, scheduler, gradient scaler, the loop's
early-stopping state and every random generator), written atomically at every evaluation. It is resumed only when
its fingerprint matches: the caller's data fingerprint, the train config except the settings that do not change
what is computed (:data:`RESUME_NEUTRAL_FIELDS`), the step budget, the architecture, the test-time views and the
model's parameter shapes. What goes into a checkpoint and how it is restored is :mod:`bonetumor.training.engine`'s
business; this module knows the file, the fingerprint and the random generators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bonetumor.config import TrainConfig
from bonetumor.errors import CheckpointWriteError
from bonetumor.faults import fault_point
from bonetumor.transforms.tta import TestTimeViews

# The engine's logger, not this module's: these lines report on a fit, and the log format prints the logger name,
# so they read (and filter) as they did before the checkpoint code had a module of its own.
log = logging.getLogger("bonetumor.training.engine")

#: File name of the checkpoint inside ``checkpoint_dir``.
CHECKPOINT_FILE = "checkpoint.pt"
#: Bump when the checkpoint content changes; an older checkpoint is then ignored (training starts over).
CHECKPOINT_FORMAT = 2
#: Train settings that do not change what is computed, so changing them keeps a checkpoint valid.
RESUME_NEUTRAL_FIELDS = frozenset(
    {"architectures", "per_arch", "progress", "checkpoint", "num_workers", "num_threads", "device"}
)


def checkpoint_path(checkpoint_dir: str | Path) -> Path:
    """Return the checkpoint file :func:`bonetumor.training.engine.fit` writes into ``checkpoint_dir``."""
    return Path(checkpoint_dir) / CHECKPOINT_FILE


def clear_checkpoint(checkpoint_dir: str | Path) -> None:
    """Delete the checkpoint of a finished fit (and ``checkpoint_dir`` when that leaves it empty)."""
    path = checkpoint_path(checkpoint_dir)
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (other files) or already gone: leave it
        path.parent.rmdir()


def fit_fingerprint(
    fingerprint: str,
    config: TrainConfig,
    model: nn.Module,
    steps: int,
    schedule_steps: int,
    arch: str | None,
    has_val: bool,
    views: TestTimeViews | None,
) -> str:
    """Return the key a checkpoint must carry to be resumed by this fit (a SHA-256 hex digest).

    Args:
        fingerprint: The caller's fingerprint of the data (and anything else outside ``config``).
        config: The train config; :data:`RESUME_NEUTRAL_FIELDS` are left out.
        model: The network; its parameter names and shapes count, not its values.
        steps: Optimiser steps of the fit.
        schedule_steps: Length of the learning-rate schedule.
        arch: The architecture, or ``None``.
        has_val: Whether the fit has an early-stopping set.
        views: The test-time views the early-stopping set is predicted with, or ``None``.
    """
    train = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_NEUTRAL_FIELDS}
    shapes = [[name, list(tensor.shape)] for name, tensor in model.state_dict().items()]
    payload = {
        "format": CHECKPOINT_FORMAT,
        "caller": fingerprint,
        "train": train,
        "steps": steps,
        "schedule_steps": schedule_steps,
        "arch": arch,
        "early_stopping_set": has_val,
        "views": None if views is None else views.to_dict(),
        "model": shapes,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """Return the state of the torch (CPU and CUDA), NumPy and Python generators, as tensors and plain values.

    NumPy's key is stored as a tensor so that ``torch.load(..., weights_only=True)`` can read it back.
    """
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [bit_generator, torch.from_numpy(np.asarray(key, dtype=np.int64)), pos, has_gauss, cached_gaussian],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore the generators to a state :func:`rng_state` returned (CUDA's only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    bit_generator, key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((bit_generator, key.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def write_checkpoint(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` to ``path`` atomically: a run killed while writing leaves the previous checkpoint intact."""
    # Temporary file + rename. No fsync: it tripled the cost of a write (1 s of every evaluation of a ResNet50 on 2
    # cores), and what it guards against, a power cut between write and flush, leaves an unreadable checkpoint that
    # the next run detects and replaces.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            fault_point("checkpoint-write", tmp)
            torch.save(content, handle)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _disk_full(exc):
            kept = f"the previous checkpoint {path} is kept" if path.exists() else f"there was no checkpoint at {path}"
            raise CheckpointWriteError(
                f"no space left on the device of {path.parent} while writing the checkpoint after step "
                f"{content.get('step', '?')}; {kept}, and a rerun resumes from it. Free some space there (or set "
                "train.checkpoint: false) and rerun"
            ) from exc
        raise


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it arose from is ENOSPC (torch.save reports it as a RuntimeError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def read_checkpoint(path: Path, fingerprint: str, name: str) -> dict[str, Any] | None:
    """Return the checkpoint at ``path`` if it carries ``fingerprint``, else ``None`` (missing, unreadable, stale).

    An unreadable checkpoint or one of another fit is logged as a warning (labelled ``name``); the fit then trains
    from scratch and overwrites it.
    """
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        log.warning("%s: cannot read checkpoint %s (%s); training from scratch and overwriting it", name, path, exc)
        return None
    if not isinstance(content, dict) or content.get("fingerprint") != fingerprint:
        log.warning(
            "%s: checkpoint %s belongs to another config, data set or model (fingerprint differs); "
            "training from scratch and overwriting it",
            name,
            path,
        )
        return None
    return content
