"""Fault injection at named points of a run, for the reliability tests (kills, a full disk, a pause).

The environment variable ``BONETUMOR_FAULT`` names what to do where: ``<action>@<point>[#<n>]``, several separated
by commas. The fault fires the ``n``-th time (default: the first) this process reaches the point:

* ``kill@fit-step#3``: SIGKILL at the third optimiser step of this process (no cleanup runs, as with ``kill -9``
  or the OOM killer);
* ``enospc@checkpoint-write#2``: the second checkpoint write fails with ``OSError(ENOSPC)``, as on a full disk;
* ``pause:20@fit-step#2``: write the file ``$BONETUMOR_FAULT_MARKER`` (when set), then sleep 20 s, so that a test
  can stop a server while the run is between two steps;
* ``raise@<point>``: raise :class:`InjectedFaultError`, a failure that cleanup code does see.

Points (:data:`POINTS`) sit where a real failure would hurt most: mid-validation, between two optimiser steps,
between two folds, mid-evaluation, inside a registration after the version exists but before its alias, and
between the two ONNX exports. Without the variable, :func:`fault_point` returns at once: nothing is read or counted
at import time, and production runs never set it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

from bonetumor.errors import ConfigError

log = logging.getLogger(__name__)

#: The environment variable read by :func:`fault_point`.
FAULT_ENV = "BONETUMOR_FAULT"
#: File a ``pause`` fault writes before sleeping (for a test to wait on).
MARKER_ENV = "BONETUMOR_FAULT_MARKER"
#: Every point the code calls, and where it is.
POINTS = {
    "validate": "data validation, after the tiles are decoded and before the suites and Data Docs",
    "fit-step": "the training loop, before each optimiser step (after the previous step's checkpoint)",
    "fold-end": "cross-validation, after every candidate of a fold finished and before the next fold",
    "evaluate": "evaluation, after the models are scored and before the output folder is moved into place",
    "register-version": "registration, after create_model_version and before the version is ready and aliased",
    "onnx-export": "registration, after the ONNX FP32 export and before the INT8 one",
    "checkpoint-write": "every checkpoint write, before the file is written",
    "gan-step": "the GAN's training loop, before each step (after the previous step's checkpoint)",
}
ACTIONS = ("kill", "enospc", "pause", "raise")

_reached: Counter[str] = Counter()


class InjectedFaultError(RuntimeError):
    """The failure a ``raise@<point>`` fault raises."""


def _parse(spec: str) -> list[tuple[str, float, str, int]]:
    """Parse ``BONETUMOR_FAULT`` into (action, seconds, point, n) tuples.

    Raises:
        ConfigError: A malformed entry, an unknown action or an unknown point.
    """
    faults = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        action, _, where = entry.partition("@")
        point, _, nth = where.partition("#")
        action, _, seconds = action.partition(":")
        if action not in ACTIONS or point not in POINTS or not (nth or "1").isdigit() or int(nth or "1") < 1:
            raise ConfigError(
                f"{FAULT_ENV}={spec!r}: cannot read {entry!r}; expected <action>@<point>[#<n>] with action one of "
                f"{list(ACTIONS)} (pause:<seconds>), point one of {sorted(POINTS)} and n >= 1"
            )
        try:
            pause = float(seconds or 0)
        except ValueError as exc:
            raise ConfigError(f"{FAULT_ENV}: {entry!r}: pause needs seconds, as in pause:20@fit-step") from exc
        faults.append((action, pause, point, int(nth or "1")))
    return faults


def fault_point(point: str, path: str | Path | None = None) -> None:
    """Fire the fault ``BONETUMOR_FAULT`` sets for this point, if any (no-op otherwise).

    Args:
        point: One of :data:`POINTS`.
        path: The file being written, named in an ``enospc`` error.

    Raises:
        OSError: An ``enospc`` fault (errno ENOSPC).
        InjectedFaultError: A ``raise`` fault.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    _reached[point] += 1
    for action, seconds, target, nth in _parse(spec):
        if target != point or _reached[point] != nth:
            continue
        log.warning("%s: injecting %s at %s (#%d)", FAULT_ENV, action, point, nth)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) if path is not None else None)
        elif action == "raise":
            raise InjectedFaultError(f"{FAULT_ENV}: injected failure at {point} (#{nth})")
        else:
            marker = os.environ.get(MARKER_ENV)
            if marker:
                Path(marker).write_text(point)
            time.sleep(seconds)
