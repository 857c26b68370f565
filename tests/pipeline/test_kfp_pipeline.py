"""The Kubeflow adapter: the committed YAML is fresh, fans out per fold and group, and really runs (kfp.local).

The shape tests read the committed ``pipelines/training_pipeline.yaml`` (what ``bonetumor pipeline submit``
sends to a cluster): the DAG of dvc.yaml with the cross-validation fanned out (``dsl.ParallelFor`` over the
plan's folds, a balance per fold, a ``train_fold`` per group, ``dsl.Collected`` into ``gather``), ``register``
under ``dsl.If``, and the cluster settings of params.yaml (resources, retries, caching, secrets, accelerator).

kfp's SubprocessRunner cannot loop over a task's output, so the local runs execute the same pipeline compiled with
the folds and groups written into its loops (``bonetumor pipeline run-local``), on the sample tiles, in the
current virtual environment: once with tiny params against a throw-away sqlite MLflow store, checking the
artifacts and the registry, and once with a validation threshold the tiles cannot meet, checking that nothing
after validate runs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import CLASSES, REPO, SAMPLE, tiny_params, venv_env

ROOT = REPO
PIPELINE_YAML = ROOT / "pipelines" / "training_pipeline.yaml"
SAMPLE_IMAGES = SAMPLE / "images"

#: The pipeline's top-level tasks and their upstream tasks.
EXPECTED_DEPENDENCIES: dict[str, set[str]] = {
    "fetch-data": set(),
    "ingest": {"fetch-data"},
    "validate": {"ingest"},
    "split": {"ingest", "validate"},
    "augment": {"ingest", "validate"},
    "cv-plan": {"ingest", "validate", "split", "augment"},  # the parent runs log the Data Docs
    "for-loop-1": {"ingest", "split", "cv-plan"},  # per fold: balance
    "merge-balanced": {"ingest", "split", "for-loop-1"},  # and the ablation and the gate on the folds' sets
    "for-loop-2": {"ingest", "split", "augment", "cv-plan", "merge-balanced"},  # per fold and group: train_fold
    "gather": {"ingest", "cv-plan", "for-loop-2"},
    "evaluate": {"gather", "merge-balanced"},  # the gate's report goes into comparison.md
    "balance-2": {"ingest", "split", "merge-balanced"},  # the full training set, for the refit, with the decision
    "condition-3": {"ingest", "split", "augment", "balance-2", "gather", "evaluate"},  # register, if allowed
}
#: Tasks that log to MLflow: never from KFP's cache.
MLFLOW_TASKS = ("cv-plan", "train-fold", "gather", "evaluate", "register")
#: Tasks whose inputs (data version, params, upstream artifacts) key their content: cached.
CACHED_TASKS = ("fetch-data", "ingest", "validate", "split", "augment", "balance", "balance-2", "merge-balanced")

#: Small enough for a few minutes on 2 CPU cores: the shared tiny params, one architecture.
#: Two optimiser steps cannot beat the baseline or meet referral targets; the gate is tested elsewhere (DVC run,
#: test_gate), so here it is opened, and the run must end with a champion the registry serves.
TINY_PARAMS: dict[str, Any] = tiny_params(
    train={"architectures": ["resnet50"]},
    register={"require_beats_baseline": False},
    referral={"max_error": 1.0, "target_recall": 0.0, "confidence": 0.5},
)


def _documents(path: Path = PIPELINE_YAML) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pipeline spec and its Kubernetes platform spec (kfp-kubernetes: secrets, node selectors)."""
    spec, platform = yaml.safe_load_all(path.read_text(encoding="utf-8"))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of the pipeline, inside loops and conditions too, by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


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


def test_the_cross_validation_fans_out_per_fold_and_group_and_gathers() -> None:
    spec, _ = _documents()
    root = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in root.items()} == EXPECTED_DEPENDENCIES
    # One GAN balance per fold cv_plan returns, kubeflow.parallelism at a time, merged into one balance output ...
    balance_loop = root["for-loop-1"]
    assert balance_loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--cv-plan-folds"
    assert balance_loop["iteratorPolicy"]["parallelismLimit"] == 4
    assert set(spec["components"]["comp-for-loop-1"]["dag"]["tasks"]) == {"balance"}
    sets = root["merge-balanced"]["inputs"]["artifacts"]["sets"]["taskOutputArtifact"]
    assert sets == {"outputArtifactKey": "pipelinechannel--balance-balanced", "producerTask": "for-loop-1"}
    # ... then one train_fold per (fold, group) of cv_plan's units, on that fold's balanced set.
    train_loop = root["for-loop-2"]
    assert train_loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--cv-plan-units"
    assert train_loop["iteratorPolicy"]["parallelismLimit"] == 4
    inner = spec["components"]["comp-for-loop-2"]["dag"]["tasks"]
    assert set(inner) == {"train-fold"}
    inputs = inner["train-fold"]["inputs"]
    assert inputs["artifacts"]["balanced"] == {"componentInputArtifact": "pipelinechannel--merge-balanced-balanced"}
    assert inputs["parameters"]["unit"] == {"componentInputParameter": "pipelinechannel--cv-plan-units-loop-item"}
    # Every fold task's output is collected into gather, which evaluate reads.
    units = root["gather"]["inputs"]["artifacts"]["units"]["taskOutputArtifact"]
    assert units == {"outputArtifactKey": "pipelinechannel--train-fold-trained", "producerTask": "for-loop-2"}
    assert root["evaluate"]["inputs"]["artifacts"]["training"]["taskOutputArtifact"]["producerTask"] == "gather"
    # The refit and registration run only when the evaluation allows them, from the full set's balance.
    condition = root["condition-3"]["triggerPolicy"]["condition"]
    assert condition == "inputs.parameter_values['pipelinechannel--evaluate-register'] == true"
    register = spec["components"]["comp-condition-3"]["dag"]["tasks"]["register"]
    assert register["inputs"]["artifacts"]["balanced"] == {
        "componentInputArtifact": "pipelinechannel--balance-2-balanced"
    }
    assert root["balance-2"]["inputs"]["parameters"]["fold"]["runtimeValue"]["constant"] == -1
    # The run's inputs: the data version (its content hash) and where to get it; no credentials.
    parameters = set(spec["root"]["inputDefinitions"]["parameters"])
    assert parameters == {"data_version", "dvc_remote", "source_dir", "params", "mlflow_tracking_uri"}


def test_tasks_carry_the_cluster_settings_of_params_yaml() -> None:
    spec, platform = _documents()
    tasks = _all_tasks(spec)
    for name in MLFLOW_TASKS:
        assert not tasks[name]["cachingOptions"].get("enableCache", False), name
    for name in CACHED_TASKS:
        assert tasks[name]["cachingOptions"]["enableCache"] is True, name
    for name, task in tasks.items():
        if "componentRef" in task and not name.startswith(("for-loop", "condition")):
            assert task["retryPolicy"]["maxRetryCount"] == 2, name
            assert task["retryPolicy"]["backoffDuration"] == "60s", name
    executors = spec["deploymentSpec"]["executors"]
    resources = {name: executor["container"]["resources"] for name, executor in executors.items()}
    assert resources["exec-train-fold"]["resourceCpuRequest"] == "4"
    assert resources["exec-train-fold"]["resourceCpuLimit"] == "8"
    assert resources["exec-train-fold"]["resourceMemoryRequest"] == "8Gi"
    assert resources["exec-balance"]["resourceCpuRequest"] == "2"
    assert resources["exec-ingest"]["resourceMemoryRequest"] == "2Gi"  # kubeflow.resources.default
    for name, executor in executors.items():
        assert executor["container"]["image"] == "ghcr.io/bonetumor/bonetumor:0.1.0", name
        assert "pip install" not in " ".join(executor["container"]["command"]), name
        assert "accelerator" not in executor["container"]["resources"], name  # train.accelerator: none
        # Credentials only as environment variables from Secrets, in every task.
        secrets = {entry["secretName"]: entry for entry in platform[name]["secretAsEnv"]}
        assert set(secrets) == {"bonetumor-mlflow-auth", "bonetumor-s3"}, name
        keys = {pair["envVar"] for entry in secrets.values() for pair in entry["keyToEnv"]}
        assert keys == {
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
        assert "nodeSelector" not in platform[name], name
        assert "tolerations" not in platform[name], name
        (config_map,) = platform[name]["configMapAsEnv"]
        assert config_map["configMapName"] == "bonetumor-pipeline-env", name
        assert config_map["optional"] is True, name


def test_the_kit_provides_what_the_pipeline_pods_read() -> None:
    """The ConfigMap and Secrets the compiled tasks name are the ones infra/k8s and its guide create."""
    _, platform = _documents()
    env_map = yaml.safe_load((ROOT / "infra/k8s/base/pipelines/pipeline-env.yaml").read_text(encoding="utf-8"))
    guide = (ROOT / "docs/deploy-kubernetes.md").read_text(encoding="utf-8")
    for executor in platform.values():
        assert executor["configMapAsEnv"][0]["configMapName"] == env_map["metadata"]["name"]
        for secret in executor["secretAsEnv"]:
            assert f"`{secret['secretName']}`" in guide


def test_image_and_accelerator_are_compile_time_options(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["accelerator"] = "gpu"
    params["kubeflow"]["node_selector"] = {"nvidia.com/gpu.present": "true"}
    params["kubeflow"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    params["kubeflow"]["parallelism"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    image = "registry.example.org/team/bonetumor:1.2.3-cuda"
    out = tmp_path / "gpu.yaml"
    command = [
        "-m",
        "pipelines.compile",
        "--image",
        image,
        "--params",
        str(tmp_path / "params.yaml"),
        "--output",
        str(out),
    ]
    subprocess.run([sys.executable, *command], cwd=ROOT, check=True, timeout=300)
    spec, platform = _documents(out)
    assert image in spec["pipelineInfo"]["description"]
    for loop in ("for-loop-1", "for-loop-2"):
        assert spec["root"]["dag"]["tasks"][loop]["iteratorPolicy"]["parallelismLimit"] == 7
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {image}
    gpu_tasks = {name for name, e in executors.items() if "accelerator" in e["container"]["resources"]}
    assert gpu_tasks == {"exec-train-fold", "exec-register"}  # only what trains a network
    for name in gpu_tasks:
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert accelerator["resourceCount"] == "1"
        assert platform[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert platform[name]["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    assert "nodeSelector" not in platform["exec-ingest"]


def test_a_typo_in_the_kubeflow_section_fails_the_compile(tmp_path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["kubeflow"]["paralellism"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--params", str(tmp_path / "params.yaml"),
         "--output", str(tmp_path / "p.yaml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "kubeflow" in result.stderr
    assert "paralellism" in result.stderr
    assert "parallelism" in result.stderr
    assert not (tmp_path / "p.yaml").exists()


def _local_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a kfp.local run: the venv first, telemetry off, no tracking URI, temp files in tmp_path."""
    env = venv_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    # Each task's shell wrapper writes its program to `mktemp -d` and never removes it: keep those in tmp_path.
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp_path / "tmp")
    return env


def _run_dir(pipeline_root: Path) -> Path:
    (run_dir,) = [p for p in pipeline_root.iterdir() if p.is_dir() and p.name.startswith("bonetumor-training-")]
    return run_dir


@pytest.mark.integration
@pytest.mark.slow
def test_failed_validation_stops_the_local_run(tmp_path: Path) -> None:
    """The pipeline as compiled for a cluster, under kfp.local: validation fails, and nothing after it runs.

    Compiled without retries: kfp.local honours a task's retry policy, and the project's (2 retries, 60 s backoff
    doubled) would spend three minutes retrying a validation that fails the same way each time.
    """
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["kubeflow"]["retries"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    pipeline_yaml = tmp_path / "pipeline.yaml"
    subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--params", str(tmp_path / "params.yaml"), "--output",
         str(pipeline_yaml)], cwd=REPO, env=venv_env(), check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    script = (
        "import sys; from kfp import local; from kfp.components import load_component_from_file\n"
        "local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=sys.argv[2],"
        " workspace_root=sys.argv[3])\n"
        "load_component_from_file(sys.argv[1])(source_dir=sys.argv[4], params={'validate': {'min_size': 4096}},"
        " mlflow_tracking_uri=sys.argv[5])"
    )
    root, db = tmp_path / "root", tmp_path / "mlflow.db"
    args = [str(pipeline_yaml), str(root), str(tmp_path / "ws"), str(SAMPLE_IMAGES), f"sqlite:///{db}"]
    result = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=_local_env(tmp_path), capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip
    # The sample tiles are far smaller than 4096 px, so the size expectations fail.
    assert result.returncode != 0
    assert re.search(r"Inner task failed: .*validate", result.stdout + result.stderr), result.stderr[-3000:]
    run_dir = _run_dir(root)
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} == {"fetch-data", "ingest", "validate"}
    report = json.loads((run_dir / "validate" / "report" / "report.json").read_text())
    assert report["success"] is False
    assert not db.exists()


def _metadata(task_dir: Path, artifact: str) -> dict[str, Any]:
    """The metadata a local task logged on one of its output artifacts."""
    outputs = json.loads((task_dir / "executor_output.json").read_text())["artifacts"]
    metadata: dict[str, Any] = outputs[artifact]["artifacts"][0]["metadata"]
    return metadata


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """``bonetumor pipeline run-local``'s module, on the sample with tiny params: the run folder, URI and output."""
    tmp_path = tmp_path_factory.mktemp("kfp-local")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS), encoding="utf-8")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable, "-m", "pipelines.local_run", "--params", str(tmp_path / "params.yaml"),
        "--source-dir", str(SAMPLE_IMAGES), "--tracking-uri", uri, "--pipeline-root", str(tmp_path / "root"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=_local_env(tmp_path), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return _run_dir(tmp_path / "root"), uri, result.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_each_fold_task_trains_its_group_on_its_fold(local_run: tuple[Path, str, str]) -> None:
    run_dir, _, _ = local_run
    # kfp.local names the iterations of the loops: 2 folds x (baseline, resnet50), each with its own output.
    units = sorted(run_dir.rglob("train-fold/trained/unit.json"))
    records = [json.loads(path.read_text()) for path in units]
    assert sorted((r["fold"], r["group"]) for r in records) == [
        (0, "baseline"), (0, "resnet50"), (1, "baseline"), (1, "resnet50")
    ]  # fmt: skip
    for path, record in zip(units, records, strict=True):
        (name,) = record["candidates"] if record["group"] == "baseline" else ["resnet50"]
        entry = record["candidates"][name]
        assert entry["skipped"] is None
        assert 0.0 <= entry["score"] <= 1.0
        oof = pd.read_csv(path.parent / name / f"oof-fold-{record['fold']}.csv")
        assert set(oof["fold"]) == {record["fold"]}
        assert len(oof) > 0
    # Each fold's balance task trained the GAN of that fold's training set only.
    balanced = sorted(p.name for p in run_dir.rglob("balance/balanced/fold-*"))
    assert balanced == ["fold-0", "fold-1"]
    merged = json.loads((run_dir / "merge-balanced" / "balanced" / "summary.json").read_text())
    assert sorted(merged["sets"]) == ["fold-0", "fold-1"]


@pytest.mark.integration
@pytest.mark.slow
def test_gather_and_the_rest_register_the_champion(local_run: tuple[Path, str, str]) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, uri, stdout = local_run
    runs = json.loads((run_dir / "gather" / "training" / "runs.json").read_text())
    assert list(runs["architectures"]) == ["resnet50"]
    oof = pd.read_csv(run_dir / "gather" / "training" / "resnet50" / "oof.csv")
    assert len(oof) == 30 - _n_test(run_dir)
    assert set(oof["fold"]) == {0, 1}
    comparison = json.loads((run_dir / "evaluate" / "evaluation" / "comparison.json").read_text())
    assert comparison["winner"] == "resnet50"
    assert _metadata(run_dir / "evaluate", "evaluation")["register"] is True
    champion = json.loads((run_dir / "register" / "model" / "champion.json").read_text())
    assert (run_dir / "register" / "model" / "bundle").is_dir()
    assert (run_dir / "balance-2" / "balanced" / "full" / "train_manifest.csv").is_file()
    assert f"registered {champion['model_uri']}" in stdout
    # The KFP metadata the components logged: metrics and confusion matrix.
    evaluate_meta = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())["artifacts"]
    metrics = evaluate_meta["metrics"]["artifacts"][0]["metadata"]
    assert metrics["accuracy"] == pytest.approx(comparison["scores"]["resnet50"]["accuracy"])
    matrix = evaluate_meta["confusion_matrix"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [spec["displayName"] for spec in matrix["annotationSpecs"]] == list(CLASSES)
    # MLflow: the parent runs are closed, with one nested run per fold task; the alias points at the version.
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("bone-tumor-classifier", "champion")
    assert str(version.version) == champion["version"]
    for name in ("resnet50", "baseline"):
        parent = client.get_run(
            runs["architectures"][name]["run_id"] if name != "baseline" else runs["baseline"]["run_id"]
        )
        assert parent.info.status == "FINISHED", name
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert sorted(run.data.tags["bonetumor.fold"] for run in children) == ["0", "1"], name


def _n_test(run_dir: Path) -> int:
    """Tiles the split held out as the test set (not in any fold)."""
    folds = json.loads((run_dir / "split" / "folds" / "folds.json").read_text())
    return len(folds["test_paths"])
