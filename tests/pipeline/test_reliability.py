"""Kills, a typo and a second pipeline, for real: `dvc repro` in copies of the repository, SIGKILLed at each stage.

One project is killed at six points in turn (``BONETUMOR_FAULT``, :mod:`bonetumor.faults`), each rerun going
further, until a last ``dvc repro`` finishes; another runs uninterrupted with the same params and seed. The killed
project must end with the same model, no MLflow run left RUNNING, and no alias on a version whose registration
was killed. The README's "Reliability" table lists these cases.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import copy_repository, tiny_params, venv_env
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from bonetumor.config import load_config
from bonetumor.errors import ArtifactError
from bonetumor.registry.model_registry import STATUS_TAG, load_served_version
from bonetumor.registry.tracking import INTERRUPTED_TAG

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "bone-tumor-classifier"
#: Where the kills go, in pipeline order: (fault, the stage DVC reports as failed).
KILLS = [
    ("kill@validate", "validate"),
    ("kill@fit-step#3", "train"),  # inside the first fold's first fit, after its checkpoint of step 2
    ("kill@fold-end", "train"),  # fold 0 finished (its fits resume from their last checkpoints), fold 1 not begun
    ("kill@evaluate", "evaluate"),
    ("kill@register-version", "register"),  # the version exists, pending; no alias yet
    ("kill@onnx-export", "register"),  # between the FP32 and the INT8 export of the refit model
]


def params() -> dict[str, dict[str, object]]:
    """Tiny params with enough steps (4, a checkpoint at each) to be killed inside a fit and resume."""
    overrides = tiny_params()
    # One architecture (with the baseline): every kill point is in its path, at half the training of two.
    overrides["train"].update({"architectures": ["resnet50"], "steps": 4, "eval_every": 1, "checkpoint": True})
    overrides["balance"]["enabled"] = False
    # Whatever 4 steps learn, the first version becomes champion: the alias then has somewhere to be (or not).
    overrides["referral"] = {"target_recall": 0.0, "max_error": 1.0, "max_target_prob_when_safe": 1.0}
    overrides["register"] = {"require_beats_baseline": False, "export_onnx": True}
    return overrides


def dvc(args: list[str], cwd: Path, fault: str = "", check: bool = True) -> subprocess.CompletedProcess[str]:
    env = venv_env(BONETUMOR_FAULT=fault) if fault else venv_env()
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite store
    result = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"dvc {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def weights(project: Path) -> dict[str, torch.Tensor]:
    return torch.load(project / "outputs/register/bundle/weights.pt", map_location="cpu", weights_only=True)


def model_versions(project: Path) -> dict[str, ModelVersion]:
    """Every version by number, read one by one: search results do not carry the aliases."""
    tracking = client(project)
    found = tracking.search_model_versions(f"name = '{MODEL}'")
    return {str(v.version): tracking.get_model_version(MODEL, str(v.version)) for v in found}


def runs_in(project: Path, status: str) -> list[object]:
    tracking = client(project)
    experiments = [e.experiment_id for e in tracking.search_experiments()]
    return list(tracking.search_runs(experiments, filter_string=f"attributes.status = '{status}'"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same params, run once without interruption."""
    project = copy_repository(tmp_path_factory.mktemp("reference"), params())
    dvc(["repro"], project)
    return project


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A project killed at each point of :data:`KILLS` in turn, then reproduced to the end; and each run's log."""
    project = copy_repository(tmp_path_factory.mktemp("killed"), params())
    logs = {}
    for fault, stage in KILLS:
        result = dvc(["repro"], project, fault=fault, check=False)
        logs[fault] = result.stdout + result.stderr
        assert result.returncode != 0, f"{fault}: dvc repro did not fail"
        assert f"failed to reproduce '{stage}'" in logs[fault], (fault, logs[fault][-3000:])
        # DVC reports the signal as -9 when it runs the command itself, or as 137 when a shell ran it (as in CI).
        assert re.search(r"exited with (-9|137)\b", logs[fault]), (fault, logs[fault][-2000:])
    result = dvc(["repro"], project)
    logs["final"] = result.stdout + result.stderr
    return project, logs


def test_training_resumes_from_its_checkpoints_after_kills(killed: tuple[Path, dict[str, str]]) -> None:
    _, logs = killed
    # Killed before its third step, the first fit resumes after its second (not from step 0).
    assert "resnet50 fold 1/2: resuming after step 2 from checkpoint" in logs["kill@fold-end"]
    # Killed between folds: fold 0's fits come back from their final checkpoints, not retrained.
    after_fold = logs["kill@evaluate"]
    assert "resnet50 fold 1/2: resuming after step 4" in after_fold
    # The refit, killed during the ONNX export, resumes at its end and is not trained again.
    assert re.search(r"\w+ refit on all tiles: resuming after step \d+ from checkpoint", logs["final"]), logs["final"]


def test_killed_pipeline_ends_with_the_uninterrupted_model(
    killed: tuple[Path, dict[str, str]], reference: Path
) -> None:
    project, _ = killed
    ours, theirs = weights(project), weights(reference)
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run's, e.g. {different[:3]}"
    for model in ("baseline", "resnet50"):
        a = pd.read_csv(project / "outputs/train" / model / "oof.csv")
        b = pd.read_csv(reference / "outputs/train" / model / "oof.csv")
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)
    assert dvc(["status"], project).stdout.strip().endswith("Data and pipelines are up to date.")


def test_kills_leave_no_run_running_and_no_alias_on_a_killed_registration(
    killed: tuple[Path, dict[str, str]],
) -> None:
    project, _ = killed
    assert runs_in(project, "RUNNING") == []
    failed = runs_in(project, "FAILED")
    marked = [r for r in failed if INTERRUPTED_TAG in r.data.tags]  # type: ignore[attr-defined]
    names = sorted(r.info.run_name for r in marked)  # type: ignore[attr-defined]
    # Killed in train twice: inside resnet50's first fold (that fold run and every candidate's open parent), and
    # between folds (the parents); in register twice (the refit run each time).
    assert names.count("cv-resnet50-fold0") == 1, names
    for parent in ("cv-baseline", "cv-resnet50"):
        assert names.count(parent) == 2, names
    assert len([name for name in names if name.startswith("refit-")]) == 2, names
    assert len(marked) == len(failed) == 7, names
    assert all("marked FAILED" in r.data.tags[INTERRUPTED_TAG] for r in marked)  # type: ignore[attr-defined]
    tracking = client(project)
    versions = model_versions(project)
    # The kill after create_model_version left version 1, now abandoned; the finished registration is version 2.
    assert sorted(versions, key=int) == ["1", "2"]
    assert versions["1"].tags[STATUS_TAG] == "abandoned"
    assert not versions["1"].aliases
    assert versions["2"].tags[STATUS_TAG] == "ready"
    champion = json.loads((project / "outputs/register/champion.json").read_text())
    assert champion["version"] == "2"
    assert versions["2"].aliases == [champion["alias"]]
    os.environ["MLFLOW_TRACKING_URI"] = tracking.tracking_uri
    try:
        with pytest.raises(ArtifactError, match="'abandoned', not 'ready': it is not served"):
            load_served_version(load_config(project / "params.yaml"), versions["1"])
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")


def test_a_failed_rerun_keeps_the_last_outputs_and_dvc_status_tells_the_truth(
    killed: tuple[Path, dict[str, str]],
) -> None:
    """The case of the issue: a changed param, a train stage that dies, the param restored byte for byte."""
    project, _ = killed
    params_file = project / "params.yaml"
    original = params_file.read_bytes()
    kept = {
        name: (project / name).read_bytes() for name in ("outputs/train/runs.json", "outputs/register/champion.json")
    }
    changed = yaml.safe_load(original)
    changed["train"]["seed"] = 7
    params_file.write_text(yaml.safe_dump(changed, sort_keys=False))
    result = dvc(["repro"], project, fault="kill@fit-step", check=False)
    assert result.returncode != 0
    assert "failed to reproduce 'train'" in result.stdout + result.stderr
    for name, content in kept.items():
        assert (project / name).read_bytes() == content, f"{name} was lost or changed by the failed rerun"
    status = dvc(["status"], project).stdout
    assert "train:" in status, status
    assert "params.yaml" in status, status
    assert "deleted" not in status, status
    params_file.write_bytes(original)
    assert dvc(["status"], project).stdout.strip().endswith("Data and pipelines are up to date.")
    assert len(client(project).search_model_versions(f"name = '{MODEL}'")) == 2  # nothing new registered


def test_a_killed_registration_moves_no_alias(killed: tuple[Path, dict[str, str]]) -> None:
    project, _ = killed
    before = {number: list(v.aliases) for number, v in model_versions(project).items()}
    assert any(before.values()), "the finished registration set no alias"
    champion = (project / "outputs/register/champion.json").read_bytes()
    result = dvc(["repro", "-s", "-f", "register"], project, fault="kill@register-version", check=False)
    assert result.returncode != 0
    assert "failed to reproduce 'register'" in result.stdout + result.stderr
    after = model_versions(project)
    new = sorted(set(after) - set(before), key=int)
    assert len(new) == 1
    assert after[new[0]].tags[STATUS_TAG] == "pending"
    assert not after[new[0]].aliases
    assert {v: list(after[v].aliases) for v in before} == before  # every alias where it was
    assert (project / "outputs/register/champion.json").read_bytes() == champion
    assert dvc(["status"], project).stdout.strip().endswith("Data and pipelines are up to date.")


def test_a_second_pipeline_is_told_another_run_holds_the_lock(killed: tuple[Path, dict[str, str]]) -> None:
    """Then the first pipeline, DVC and its stage together, is SIGKILLed: no stale lock, no lost output."""
    project, _ = killed
    marker = project / "paused"
    evaluated = {p: p.read_bytes() for p in sorted((project / "outputs" / "evaluate").rglob("*")) if p.is_file()}
    env = venv_env(BONETUMOR_FAULT="pause:300@evaluate", BONETUMOR_FAULT_MARKER=str(marker))
    env.pop("MLFLOW_TRACKING_URI", None)
    first = subprocess.Popen(
        ["dvc", "repro", "-s", "-f", "evaluate"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, "the first run ended before its pause"
            assert time.monotonic() < deadline, "the first run never reached the pause"
            time.sleep(0.5)
        own = venv_env()
        own.pop("MLFLOW_TRACKING_URI", None)
        # `make pipeline` starts with `bonetumor check`: it stops at once, naming the lock.
        check = subprocess.run(["bonetumor", "check"], cwd=project, env=own, capture_output=True, text=True)
        assert check.returncode == 1
        assert "another run holds the lock: DVC is running in" in check.stderr, check.stderr
        # A stage started by hand, bypassing DVC, meets the tracking store's lock.
        stage = subprocess.run(["bonetumor", "evaluate"], cwd=project, env=own, capture_output=True, text=True)
        assert stage.returncode == 1
        assert "another run holds the lock on the tracking store" in stage.stderr, stage.stderr
        assert "`bonetumor evaluate`" in stage.stderr  # the holder, from the lock file
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # DVC and its stage at once, as an OOM kill or a closed terminal
        first.wait()
    after = {p: p.read_bytes() for p in sorted((project / "outputs" / "evaluate").rglob("*")) if p.is_file()}
    assert after == evaluated, "the killed evaluation changed or removed the last good outputs"
    assert dvc(["status"], project).stdout.strip().endswith("Data and pipelines are up to date.")
    assert dvc(["repro", "-s", "-f", "evaluate"], project).returncode == 0  # no stale lock is left behind
    assert runs_in(project, "RUNNING") == []
