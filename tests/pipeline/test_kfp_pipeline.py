"""The Kubeflow adapter: the committed pipeline YAML is fresh, wires the DVC DAG, and really runs (kfp.local).

The local runs execute the committed ``pipelines/training_pipeline.yaml`` (what ``pipelines.submit`` sends to a
cluster) with kfp's SubprocessRunner in the current virtual environment, on the sample tiles: once with tiny
params against a throw-away sqlite MLflow store, checking the artifacts and the MLflow registry, and once with
a validation threshold the tiles cannot meet, checking that nothing after validate runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import CLASSES, REPO, SAMPLE, tiny_params

ROOT = REPO
PIPELINE_YAML = ROOT / "pipelines" / "training_pipeline.yaml"
SAMPLE_IMAGES = SAMPLE / "images"

STAGES = ("ingest", "validate", "split", "augment", "balance", "train", "evaluate", "register")
#: Every task's upstream tasks, as in dvc.yaml's deps.
EXPECTED_DEPENDENCIES: dict[str, set[str]] = {
    "ingest": set(),
    "validate": {"ingest"},
    "split": {"ingest", "validate"},
    "augment": {"ingest", "validate"},
    "balance": {"ingest", "split"},
    "train": {"ingest", "validate", "split", "augment", "balance"},  # train logs the Data Docs
    "evaluate": {"train"},
    "register": {"ingest", "split", "augment", "balance", "train", "evaluate"},  # the gate compares on folds
}

#: Small enough for about a minute on 2 CPU cores: the shared tiny params, one architecture.
#: Two optimiser steps cannot beat the baseline or meet referral targets; the gate is tested elsewhere (DVC run,
#: test_gate), so here it is opened, and the run must end with a champion the registry serves.
TINY_PARAMS: dict[str, Any] = tiny_params(
    train={"architectures": ["resnet50"]},
    register={"require_beats_baseline": False},
    referral={"max_error": 1.0, "target_recall": 0.0, "confidence": 0.5},
)


def _spec() -> dict[str, Any]:
    return yaml.safe_load(PIPELINE_YAML.read_text(encoding="utf-8"))


def test_committed_yaml_matches_a_fresh_compile() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr + result.stdout


def test_compile_is_deterministic(tmp_path: Path) -> None:
    script = "import sys; from pipelines.compile import compile_pipeline; compile_pipeline(sys.argv[1])"
    outputs = []
    for name in ("a.yaml", "b.yaml"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], cwd=ROOT, check=True, timeout=300)
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1]


def test_spec_has_the_dvc_dag() -> None:
    spec = _spec()
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == set(STAGES)
    dependencies = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    assert dependencies == EXPECTED_DEPENDENCIES
    # Validation gates split and augment through its report, not merely through ordering.
    for gated in ("split", "augment"):
        report = tasks[gated]["inputs"]["artifacts"]["validation_report"]["taskOutputArtifact"]
        assert report == {"producerTask": "validate", "outputArtifactKey": "report"}
    # MLflow stages are never served from KFP's cache; nothing installs packages at run time.
    for name in ("ingest", "train", "evaluate", "register"):
        assert not tasks[name]["cachingOptions"].get("enableCache", False), name
    executors = spec["deploymentSpec"]["executors"]
    for executor in executors.values():
        assert executor["container"]["image"] == "ghcr.io/bonetumor/bonetumor:0.1.0"
        assert "pip install" not in " ".join(executor["container"]["command"])
    assert "resourceMemoryRequest" in executors["exec-train"]["container"]["resources"]
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"source_dir", "params", "mlflow_tracking_uri"}


def _init_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Start a kfp.local session that runs every task as a subprocess of this venv; return the pipeline root."""
    from kfp import local

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Tasks run in the current working folder: keep MLflow's local artifact store (<cwd>/mlartifacts) in tmp_path.
    monkeypatch.chdir(tmp_path)
    # Each task's shell wrapper writes its program to `mktemp -d` and never removes it: keep those in tmp_path too.
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    pipeline_root = tmp_path / "root"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        workspace_root=str(tmp_path / "workspace"),
    )
    return pipeline_root


def _run_dir(pipeline_root: Path) -> Path:
    (run_dir,) = [p for p in pipeline_root.iterdir() if p.is_dir() and p.name.startswith("bonetumor-training-")]
    return run_dir


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
def test_failed_validation_stops_the_local_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp.components import load_component_from_file

    pipeline_root = _init_local(tmp_path, monkeypatch)
    pipeline = load_component_from_file(str(PIPELINE_YAML))
    # The sample tiles are far smaller than 4096 px, so the size expectations fail.
    with pytest.raises(RuntimeError, match=r"Inner task failed: .*validate"):
        pipeline(
            source_dir=str(SAMPLE_IMAGES),
            params={"validate": {"min_size": 4096}},
            mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        )
    run_dir = _run_dir(pipeline_root)
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {"ingest", "validate"}
    report = json.loads((run_dir / "validate" / "report" / "report.json").read_text())
    assert report["success"] is False
    assert not (tmp_path / "mlflow.db").exists()


def _metadata(task_dir: Path, artifact: str) -> dict[str, Any]:
    """The metadata a local task logged on one of its output artifacts."""
    outputs = json.loads((task_dir / "executor_output.json").read_text())["artifacts"]
    metadata: dict[str, Any] = outputs[artifact]["artifacts"][0]["metadata"]
    return metadata


def _check_stage_metadata(out: dict[str, Path], runs: dict[str, Any], champion: dict[str, Any]) -> None:
    """Every task's headline metadata (what bonetumor.stages returns) agrees with the files it wrote."""
    report_uri = str(out["validate"] / "report")
    folds = json.loads((out["split"] / "folds" / "folds.json").read_text())
    summary = json.loads((out["balance"] / "balanced" / "summary.json").read_text())
    comparison = json.loads((out["evaluate"] / "evaluation" / "comparison.json").read_text())
    assert _metadata(out["ingest"], "dataset") == {"n_tiles": 30, "n_slides": 12, "n_cases": 4}
    assert _metadata(out["validate"], "report") == {"success": True, "n_tiles": 30}
    assert _metadata(out["split"], "folds") == {
        "n_folds": folds["n_folds"],
        "group_by": folds["group_by"],
        "validated_by": report_uri,
    }
    policy = _metadata(out["augment"], "policy")
    assert policy["validated_by"] == report_uri
    assert len(policy["digest"]) == 12
    assert _metadata(out["balance"], "balanced") == {
        f"generated_{name}": sum(info["generated"].values()) for name, info in summary["sets"].items()
    }
    assert _metadata(out["train"], "training") == {
        "experiment_id": runs["experiment_id"],
        "run_id_resnet50": runs["architectures"]["resnet50"]["run_id"],
    }
    assert _metadata(out["evaluate"], "evaluation") == {
        key: comparison[key] for key in ("winner", "ranking", "selection")
    }
    assert _metadata(out["evaluate"], "confusion_matrix")["arch"] == comparison["winner"]
    assert _metadata(out["register"], "model") == {
        key: champion[key] for key in ("model_name", "version", "alias", "model_uri", "arch", "run_id", "cv_run_id")
    }


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Task .*have no effect in the current local runner:UserWarning")
def test_local_run_trains_and_registers_the_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp.components import load_component_from_file
    from mlflow.tracking import MlflowClient

    pipeline_root = _init_local(tmp_path, monkeypatch)
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    pipeline = load_component_from_file(str(PIPELINE_YAML))
    pipeline(source_dir=str(SAMPLE_IMAGES), params=TINY_PARAMS, mlflow_tracking_uri=tracking_uri)

    run_dir = _run_dir(pipeline_root)
    out = {stage: run_dir / stage for stage in STAGES}
    assert (out["ingest"] / "dataset" / "manifest.csv").is_file()
    assert len(list((out["ingest"] / "dataset" / "images").glob("*/*"))) == 30
    report = json.loads((out["validate"] / "report" / "report.json").read_text())
    assert report["success"] is True
    assert report["n_tiles"] == 30
    assert json.loads((out["split"] / "folds" / "folds.json").read_text())["n_folds"] == 2
    assert (out["augment"] / "policy" / "policy.json").is_file()
    assert (out["balance"] / "balanced" / "full" / "train_manifest.csv").is_file()
    runs = json.loads((out["train"] / "training" / "runs.json").read_text())
    assert list(runs["architectures"]) == ["resnet50"]
    comparison = json.loads((out["evaluate"] / "evaluation" / "comparison.json").read_text())
    assert comparison["winner"] == "resnet50"
    assert (out["evaluate"] / "comparison").read_text().startswith("# Model comparison")
    champion = json.loads((out["register"] / "model" / "champion.json").read_text())
    assert (out["register"] / "model" / "bundle").is_dir()

    _check_stage_metadata(out, runs, champion)
    # The KFP metadata the components logged: metrics, confusion matrix, model metadata.
    evaluate_meta = json.loads((out["evaluate"] / "executor_output.json").read_text())["artifacts"]
    metrics = evaluate_meta["metrics"]["artifacts"][0]["metadata"]
    assert metrics["accuracy"] == pytest.approx(comparison["scores"]["resnet50"]["accuracy"])
    matrix = evaluate_meta["confusion_matrix"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [spec["displayName"] for spec in matrix["annotationSpecs"]] == list(CLASSES)
    assert sum(sum(row["row"]) for row in matrix["rows"]) == 30
    register_meta = json.loads((out["register"] / "executor_output.json").read_text())["artifacts"]
    model_meta = register_meta["model"]["artifacts"][0]["metadata"]
    assert model_meta["model_uri"] == "models:/bone-tumor-classifier@champion"
    assert model_meta["version"] == champion["version"]

    # MLflow: the champion alias points at the registered version, and the train stage logged its runs there.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias("bone-tumor-classifier", "champion")
    assert str(version.version) == champion["version"]
    experiment = client.get_experiment_by_name("bone-tumor")
    assert experiment is not None
    train_runs = client.search_runs([experiment.experiment_id], filter_string="tags.`bonetumor.stage` = 'train'")
    assert runs["architectures"]["resnet50"]["run_id"] in {run.info.run_id for run in train_runs}
    assert (tmp_path / "mlartifacts").is_dir()
