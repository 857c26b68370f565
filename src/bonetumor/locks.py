"""One writer at a time: the lock a stage holds on a local tracking store, and the preflight look at DVC's lock.

Two pipelines on one sqlite MLflow store would interleave their runs and registrations (sqlite itself stays
consistent, but "the champion" then depends on which finished last). So every stage that writes to a sqlite store
holds an exclusive ``flock`` on ``<database>.lock`` for its whole run; the lock file names the holder (pid,
command, start time) for the message the second process gets. A killed holder's lock is released by the kernel,
so a kill never leaves a stale lock behind. A tracking server (``http://``) serialises its own writes and has no
lock file: pipelines sharing a server are told apart by their runs.

:func:`check_locks` is what ``bonetumor check`` (the first step of ``make pipeline``) runs: it looks at this lock
and at DVC's own locks without waiting (its repository lock ``.dvc/tmp/lock``, an ``flock`` too, and the
``rwlock`` file where it names the process running a stage), so a second ``make
pipeline`` stops in a second with "another run holds the lock" instead of queueing behind, or racing, the first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bonetumor.errors import StoreLockedError

#: DVC's repository lock, and the file where it locks the paths of the stage it runs, relative to the project.
DVC_LOCK = Path(".dvc") / "tmp" / "lock"
DVC_RWLOCK = Path(".dvc") / "tmp" / "rwlock"


def store_lock_path(uri: str) -> Path | None:
    """Return the lock file of a tracking store: ``<database>.lock`` for ``sqlite:///``, None for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return database.with_name(database.name + ".lock")


def _holder(path: Path) -> str:
    """Describe the holder a lock file names (pid, command, start), or say that it names none."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        # DVC's lock holds a bare pid.
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8").strip()
            if text.isdigit():
                return f"pid {text}"
        return "a process that did not say who it is"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info.get("started", 0))))
    return f"pid {info['pid']}, `{info.get('command', '?')}`, since {since}"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


@contextlib.contextmanager
def store_lock(uri: str, command: str = "") -> Iterator[None]:
    """Hold the tracking store's lock for the block (no-op for stores without one).

    Args:
        uri: The resolved tracking URI.
        command: What holds it, for the message a second process gets (default: this process's command line).

    Raises:
        StoreLockedError: Another process holds it; the message names it and what to do.
    """
    path = store_lock_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise StoreLockedError(_locked_message(path, uri))
        os.ftruncate(fd, 0)
        who = {"pid": os.getpid(), "command": command or " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])}
        os.write(fd, json.dumps({**who, "started": time.time()}).encode())
        yield
    finally:
        os.close(fd)  # releases the flock


def _locked_message(path: Path, uri: str) -> str:
    return (
        f"another run holds the lock on the tracking store {uri} ({_holder(path)}; lock file {path}). Two "
        "pipelines writing one store would interleave their runs and registrations: wait for it to finish, or "
        "point tracking.uri / MLFLOW_TRACKING_URI at another store"
    )


def _probe(path: Path) -> bool:
    """Whether the flock on ``path`` is free right now (taken and released at once); a missing file is free."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        free = _try_lock(fd)
        if free:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return free
    finally:
        os.close(fd)


def _dvc_stage_holders(rwlock: Path) -> list[str]:
    """Return the live processes DVC's rwlock file names (pid and command).

    DVC releases its repository lock while a stage's command runs, and keeps that stage's outputs and dependencies
    locked in this file instead.
    """
    try:
        content = json.loads(rwlock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # no DVC run has locked anything, or DVC is rewriting the file: the flock probe covers that
    entries: list[dict[str, object]] = []
    if isinstance(content, dict):
        for mode in ("write", "read"):
            for value in (content.get(mode) or {}).values():
                entries += value if isinstance(value, list) else [value]
    holders = []
    for entry in entries:
        pid = entry.get("pid") if isinstance(entry, dict) else None
        # A pid that no longer exists is a killed DVC's leftover, which DVC itself ignores and cleans up.
        if isinstance(pid, int) and psutil.pid_exists(pid):
            holder = f"pid {pid}, `{entry.get('cmd', 'dvc')}`"
            if holder not in holders:
                holders.append(holder)
    return holders


def check_locks(project_dir: str | Path, uri: str) -> str:
    """Check, without waiting, that no other run holds DVC's repository lock or the tracking store's lock.

    Args:
        project_dir: The DVC project folder.
        uri: The resolved tracking URI.

    Returns:
        What was checked, for the log.

    Raises:
        StoreLockedError: A lock is held; the message names the holder and what to do.
    """
    dvc_lock = Path(project_dir) / DVC_LOCK
    holders = [] if _probe(dvc_lock) else [_holder(dvc_lock)]
    holders += _dvc_stage_holders(Path(project_dir) / DVC_RWLOCK)
    if holders:
        raise StoreLockedError(
            f"another run holds the lock: DVC is running in {Path(project_dir).resolve()} ({'; '.join(holders)}; "
            f"lock files in {dvc_lock.parent}), probably a `make pipeline` or `dvc repro` started earlier. Wait "
            "for it to finish; two pipelines in one project would overwrite each other's outputs"
        )
    store = store_lock_path(uri)
    if store is not None and not _probe(store):
        raise StoreLockedError(_locked_message(store, uri))
    return "locks: no other run holds DVC's lock or the tracking store's"
