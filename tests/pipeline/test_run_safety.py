"""The pieces the kill tests rely on, one by one: fault specs, the store lock, DVC's lock, closing killed runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import zc.lockfile
from mlflow.tracking import MlflowClient

from bonetumor import faults
from bonetumor.errors import ConfigError, StoreLockedError
from bonetumor.locks import check_locks, store_lock, store_lock_path
from bonetumor.registry.tracking import (
    HOST_TAG,
    INTERRUPTED_TAG,
    PID_STARTED_TAG,
    PID_TAG,
    close_interrupted_runs,
    process_tags,
)


@pytest.mark.parametrize("spec", ["kill", "kill@nowhere", "explode@fit-step", "kill@fit-step#0", "pause:x@validate"])
def test_a_malformed_fault_spec_names_what_is_expected(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(faults.FAULT_ENV, spec)
    with pytest.raises(ConfigError, match="BONETUMOR_FAULT"):
        faults.fault_point("fit-step")


def test_a_fault_fires_at_the_nth_time_its_point_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faults, "_reached", Counter())
    monkeypatch.setenv(faults.FAULT_ENV, "raise@fold-end#3")
    faults.fault_point("fold-end")
    faults.fault_point("fit-step")  # other points do not count
    faults.fault_point("fold-end")
    with pytest.raises(faults.InjectedFaultError, match=r"fold-end \(#3\)"):
        faults.fault_point("fold-end")
    faults.fault_point("fold-end")  # once only


def test_a_killed_process_is_really_gone(tmp_path: Path) -> None:
    """``kill@point`` is a SIGKILL: no finally block, no atexit handler runs."""
    script = (
        "import atexit, pathlib\n"
        f"atexit.register(lambda: pathlib.Path({str(tmp_path / 'atexit')!r}).touch())\n"
        "from bonetumor.faults import fault_point\n"
        "try:\n    fault_point('validate')\n"
        f"finally:\n    pathlib.Path({str(tmp_path / 'finally')!r}).touch()\n"
    )
    env = {**os.environ, faults.FAULT_ENV: "kill@validate"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=60)
    assert result.returncode == -9
    assert not (tmp_path / "atexit").exists()
    assert not (tmp_path / "finally").exists()


def _hold_store_lock(uri: str, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A second process holding the store lock until killed; returns once it holds it."""
    ready = tmp_path / "ready"
    script = (
        "import pathlib, time\nfrom bonetumor.locks import store_lock\n"
        f"with store_lock({uri!r}, 'bonetumor train'):\n"
        f"    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return holder


def test_the_store_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = _hold_store_lock(uri, tmp_path)
    try:
        with pytest.raises(StoreLockedError) as error, store_lock(uri, "bonetumor evaluate"):
            pass
        message = str(error.value)
        assert f"another run holds the lock on the tracking store {uri}" in message
        assert f"pid {holder.pid}, `bonetumor train`" in message
        assert str(store_lock_path(uri)) in message
        with pytest.raises(StoreLockedError, match="another run holds the lock on the tracking store"):
            check_locks(tmp_path, uri)
    finally:
        holder.kill()  # as a SIGKILL would: the kernel releases the flock
        holder.wait()
    with store_lock(uri, "bonetumor evaluate"):
        pass
    assert "no other run holds" in check_locks(tmp_path, uri)


def test_a_server_store_has_no_lock_file(tmp_path: Path) -> None:
    assert store_lock_path("http://127.0.0.1:5000") is None
    with store_lock("http://127.0.0.1:5000"):
        pass


def test_check_sees_dvc_holding_its_repository_lock(tmp_path: Path) -> None:
    lock = tmp_path / ".dvc" / "tmp" / "lock"
    lock.parent.mkdir(parents=True)
    held = zc.lockfile.LockFile(str(lock))  # what DVC itself takes for `dvc repro`
    try:
        with pytest.raises(StoreLockedError) as error:
            check_locks(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert f"another run holds the lock: DVC is running in {tmp_path.resolve()} (pid {os.getpid()}" in str(
            error.value
        )
    finally:
        held.close()
    assert "no other run holds" in check_locks(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_runs_of_killed_processes_are_marked_failed_and_others_left_alone(tmp_path: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("e")
    client = MlflowClient()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    owners = {
        "killed": {HOST_TAG: host, PID_TAG: dead.stdout.strip(), PID_STARTED_TAG: "1.0"},
        "alive": process_tags(),
        "reused pid": {**process_tags(), PID_STARTED_TAG: "1.0"},  # this pid, but another process's start time
        "other host": {HOST_TAG: "pod-7", PID_TAG: "1", PID_STARTED_TAG: "1.0"},
        "untagged": {},
    }
    ids = {name: client.create_run(experiment, tags=tags, run_name=name).info.run_id for name, tags in owners.items()}
    closed = close_interrupted_runs(experiment)
    assert sorted(closed) == sorted([ids["killed"], ids["reused pid"]])
    for name, run_id in ids.items():
        run = client.get_run(run_id)
        expected = "FAILED" if run_id in closed else "RUNNING"
        assert run.info.status == expected, name
        assert (INTERRUPTED_TAG in run.data.tags) == (run_id in closed), name
    assert (
        "ended without closing this run (killed); marked FAILED"
        in client.get_run(ids["killed"]).data.tags[INTERRUPTED_TAG]
    )
    assert close_interrupted_runs(experiment) == []  # idempotent


def test_check_sees_dvc_running_a_stage_in_its_rwlock(tmp_path: Path) -> None:
    """While a stage's command runs, DVC releases its repository lock and names itself in ``.dvc/tmp/rwlock``."""
    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live = {"pid": os.getpid(), "cmd": "dvc repro"}
    rwlock.write_text(json.dumps({"write": {str(tmp_path / "outputs/train"): live}, "read": {"a": [live]}}))
    with pytest.raises(StoreLockedError) as error:
        check_locks(tmp_path, uri)
    assert str(error.value).count(f"pid {os.getpid()}, `dvc repro`") == 1  # named once, however many paths
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # A killed DVC's leftover entry is ignored, as DVC itself ignores it.
    rwlock.write_text(json.dumps({"write": {"outputs/train": {"pid": int(dead.stdout), "cmd": "dvc repro"}}}))
    assert "no other run holds" in check_locks(tmp_path, uri)
