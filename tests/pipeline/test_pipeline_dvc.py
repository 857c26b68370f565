"""The whole DVC pipeline, for real, on the real sample tiles, in a temporary copy of the repository."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml
from conftest import CLASSES, copy_repository, tiny_params, venv_env
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from bonetumor.config import load_config
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.registry.tracking import data_version
from bonetumor.serving.audit import read_prediction_log
from bonetumor.training.models import build_model
from bonetumor.training.refit import full_training_set
from bonetumor.transforms.augment import load_policy
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.tta import TestTimeViews, with_views
from bonetumor.utils import sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC copy of the repository (tracked and new files, no outputs) with tiny params, reproduced once."""
    # The pruned VGG19 and the per-fold INT8 models are off in the demo: on here, so that they are covered.
    candidates: dict[str, object] = {"pruned_vgg19": True, "prune_finetune_steps": 1, "int8": True}
    # The demo trains without an early-stopping set; held out here, so that the staged run covers it too.
    overrides = tiny_params(candidates=candidates)
    overrides["train"]["inner_val_fraction"] = 0.25
    # The first model must become champion, whatever two steps of training give, so that the second registration
    # below always meets a champion: referral targets any rule meets (no recall or error claim, no safe-class
    # rule: threshold 0 accepts every tile), and no requirement to beat the baseline.
    overrides["referral"] = {"target_recall": 0.0, "max_error": 1.0, "max_target_prob_when_safe": 1.0}
    overrides["register"] = {"require_beats_baseline": False}
    # A stain target makes the end-to-end serving test below see whether it reaches the service; the service
    # answers from ONNX FP32 there, whose arithmetic matches torch's to float tolerance (INT8 does not).
    overrides["augment"]["stain_normalization"] = "reinhard"
    overrides["serving"] = {"runtime": "onnx-fp32", "prediction_log": "outputs/serving/predictions.jsonl"}
    root = copy_repository(tmp_path_factory.mktemp("project"), overrides)
    result = run(["dvc", "repro"], root)
    assert stages_run(result.stdout) == [
        "ingest",
        "validate",
        "split",
        "augment",
        "balance",
        "train",
        "evaluate",
        "register",
    ]
    return root


def comparison_baseline(project: Path) -> float:
    comparison = json.loads((project / "outputs" / "evaluate" / "comparison.json").read_text())
    return float(comparison["baseline"]["fold_f1_macro_mean"])


def macro_f1(labels: pd.Series, predictions: pd.Series) -> float:
    """Macro-F1 over the classes present in labels or predictions (a fold may hold no tile of a class)."""
    present = sorted(set(labels) | set(predictions))
    return float(f1_score(labels, predictions, labels=present, average="macro", zero_division=0))


def ensemble_of(first: pd.DataFrame, second: pd.DataFrame) -> pd.DataFrame:
    """The soft vote of two OOF files, recomputed: the class of the higher mean probability, tile by tile."""
    columns = [f"prob_{c}" for c in CLASSES]
    a, b = (f.sort_values("path").reset_index(drop=True) for f in (first, second))
    assert list(a["path"]) == list(b["path"])
    probs = (a[columns].to_numpy() + b[columns].to_numpy()) / 2
    return a[["path", "label", "fold"]].assign(prediction=[CLASSES[i] for i in probs.argmax(1)])


def test_every_stage_wrote_its_outputs(project: Path) -> None:
    out = project / "outputs"
    for path in (
        "ingest/manifest.csv",
        "validate/report.json",
        "validate/tiles.csv",
        "validate/data_docs/index.html",
        "split/folds.json",
        "split/folds_report.json",
        "augment/policy.json",
        "augment/preview.png",
        "balance/summary.json",
        "balance/fold-0/train_manifest.csv",
        "balance/full/train_manifest.csv",
        "train/runs.json",
        "train/baseline/oof.csv",
        "train/resnet50/oof.csv",
        "train/vgg19/oof.csv",
        "train/vgg19_pruned/oof.csv",
        "train/resnet50_int8/oof.csv",
        "train/vgg19_int8/oof.csv",
        "train/resnet50/gradcam/fold-0.png",
        "evaluate/metrics/resnet50.json",
        "evaluate/reports/resnet50.json",
        "evaluate/comparison.md",
        "evaluate/plots/comparison.png",
        "evaluate/plots/resnet50_gradcam_fold-0.png",
        "evaluate/referral/resnet50.json",
        "register/bundle/weights.pt",
        "register/bundle/metadata.json",
        "register/bundle/onnx/model.int8.onnx",
        "register/champion.json",
    ):
        assert (out / path).is_file(), path
    # The resolved config is saved beside every output.
    for stage in ("ingest", "validate", "split", "augment", "balance", "train", "evaluate", "register"):
        assert (out / stage / "config.resolved.yaml").is_file(), stage
    models = ("baseline", "resnet50", "vgg19", "ensemble", "vgg19_pruned", "resnet50_int8", "vgg19_int8")
    for model in models:
        for plot in ("confusion_matrix", "roc_pr", "reliability", "risk_coverage"):
            assert (out / "evaluate" / "plots" / f"{model}_{plot}.png").is_file(), (model, plot)
    # Every model's headline figures (the DVC metrics) and its report (every figure), one file each.
    headline = {m: json.loads((out / "evaluate" / "metrics" / f"{m}.json").read_text()) for m in models}
    metrics = {m: json.loads((out / "evaluate" / "reports" / f"{m}.json").read_text()) for m in models}
    scores = json.loads((out / "evaluate" / "comparison.json").read_text())["scores"]
    manifest = pd.read_csv(out / "ingest" / "manifest.csv")
    folds_doc = json.loads((out / "split" / "folds.json").read_text())
    oofs = {m: pd.read_csv(out / "train" / m / "oof.csv") for m in models if m != "ensemble"}
    oofs["ensemble"] = ensemble_of(oofs["resnet50"], oofs["vgg19"])
    for name, oof in oofs.items():
        # Every tile once, in the fold the split put it in, and the reported figures are those of these rows.
        assert sorted(oof["path"]) == sorted(manifest["path"]), name
        for fold in folds_doc["folds"]:
            assert set(oof.loc[oof["fold"] == fold["fold"], "path"]) == set(fold["val_paths"]), (name, fold["fold"])
        reported = metrics[name]
        assert reported["accuracy"] == pytest.approx(accuracy_score(oof["label"], oof["prediction"])), name
        assert headline[name]["accuracy"] == reported["accuracy"], name
        assert reported["f1_macro"] == pytest.approx(macro_f1(oof["label"], oof["prediction"])), name
        present = sorted(set(oof["label"]) | set(oof["prediction"]))
        weighted = f1_score(oof["label"], oof["prediction"], labels=present, average="weighted", zero_division=0)
        assert reported["f1_weighted"] == pytest.approx(weighted), name
        matrix = confusion_matrix(oof["label"], oof["prediction"], labels=list(CLASSES))
        assert scores[name]["confusion_matrix"] == matrix.tolist(), name
        # Per fold: the fold figures are each fold's own rows, and they average to the reported means.
        by_fold = [oof[oof["fold"] == k] for k in sorted(oof["fold"].unique())]
        fold_f1 = [macro_f1(f["label"], f["prediction"]) for f in by_fold]
        fold_accuracy = [accuracy_score(f["label"], f["prediction"]) for f in by_fold]
        assert scores[name]["fold_f1_macro"] == pytest.approx(fold_f1), name
        assert reported["fold_f1_macro_mean"] == pytest.approx(np.mean(fold_f1)), name
        assert headline[name]["f1_mean"] == pytest.approx(np.mean(fold_f1)), name
        assert scores[name]["fold_summary"]["accuracy"]["mean"] == pytest.approx(np.mean(fold_accuracy)), name
        # Pooled accuracy is the tile-weighted mean of the folds' accuracies.
        pooled = sum(len(f) * a for f, a in zip(by_fold, fold_accuracy, strict=True)) / len(oof)
        assert reported["accuracy"] == pytest.approx(pooled), name
    # CPU latency: what the train stage measured on fold 0, in milliseconds per tile. A ResNet50 or VGG19 on a
    # 32 px crop takes well over 0.1 ms and well under 2 s per tile on any CPU (seconds or microseconds would not).
    latency = json.loads((out / "train" / "runs.json").read_text())["latency_ms"]
    for name in models:
        if name in ("baseline", "ensemble"):
            continue
        ms = metrics[name]["cpu_ms_per_tile"]
        assert ms == pytest.approx(latency[name]), name
        assert math.isfinite(ms), name
        assert 0.1 < ms < 2000, (name, ms)
    # The ensemble runs both architectures: its latency is their sum.
    assert metrics["ensemble"]["cpu_ms_per_tile"] == pytest.approx(latency["resnet50"] + latency["vgg19"])
    report = (out / "evaluate" / "comparison.md").read_text()
    assert "The paper's figures beside ours" in report
    assert "Baseline to beat (baseline: colour histograms into a random forest, same folds)" in report
    # Offline, train.weights auto fell back to random initialisation, and the report says so.
    assert "`bonetumor.init = scratch (no ImageNet weights available)`" in report
    comparison = json.loads((out / "evaluate" / "comparison.json").read_text())
    assert set(comparison["beats_baseline"]) >= {"resnet50", "vgg19"}
    folds = json.loads((out / "split" / "folds.json").read_text())
    assert folds["n_folds"] == 2
    assert folds["group_by"] == "slide"


def test_dvc_metrics_show_is_a_short_table_of_the_headline_figures(project: Path) -> None:
    table = run(["dvc", "metrics", "show"], project).stdout.splitlines()
    models = ("baseline", "resnet50", "vgg19", "ensemble", "vgg19_pruned", "resnet50_int8", "vgg19_int8")
    # One row per model, its headline figures as columns, narrow enough for a terminal.
    assert table[0].split() == [
        "Path",
        "accuracy",
        "f1_lower",
        "f1_mean",
        "f1_upper",
        "recall_Viable-Tumor",
        "referral.coverage",
    ]
    assert sorted(row.split()[0] for row in table[1:]) == sorted(f"outputs/evaluate/metrics/{m}.json" for m in models)
    assert max(len(line) for line in table) <= 160
    # The reports are read as metrics too, so `dvc metrics diff --targets outputs/evaluate/reports` compares them.
    shown = json.loads(run(["dvc", "metrics", "show", "--json", "outputs/evaluate/reports"], project).stdout)
    (workspace,) = shown.values()
    files = workspace["data"]
    scores = json.loads((project / "outputs" / "evaluate" / "comparison.json").read_text())["scores"]
    for model in models:
        figures = files[f"outputs/evaluate/reports/{model}.json"]["data"]
        assert figures["per_class"] == scores[model]["per_class"], model


def test_mlflow_holds_the_cross_validation_and_the_champion(project: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("bone-tumor")
    assert experiment is not None
    assert experiment.artifact_location == (project / "mlartifacts").as_uri()
    runs = json.loads((project / "outputs" / "train" / "runs.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    version = data_version(project / "outputs" / "ingest" / "manifest.csv")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    dvc_md5 = next(d["md5"] for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/sample/images")
    for arch, info in runs["architectures"].items():
        parent = client.get_run(info["run_id"])
        assert parent.data.tags["bonetumor.arch"] == arch
        assert parent.data.tags["bonetumor.data_version"] == version
        assert parent.data.tags["bonetumor.dvc_data_md5"] == dvc_md5  # DVC's version of data.source
        docs = {a.path for a in client.list_artifacts(info["run_id"], "data_validation/data_docs")}
        assert "data_validation/data_docs/index.html" in docs
        assert parent.data.tags["bonetumor.git_commit"].startswith(commit)
        assert parent.data.tags["bonetumor.init"] == "scratch (no ImageNet weights available)"
        assert parent.data.tags["bonetumor.beats_baseline"] in ("True", "False")
        assert parent.data.params["split.n_folds"] == "2"
        assert "oof_f1_macro" in parent.data.metrics  # logged by the evaluate stage
        artifacts = {a.path for a in client.list_artifacts(info["run_id"], "evaluation")}
        assert f"evaluation/{arch}_confusion_matrix.png" in artifacts
        children = client.search_runs(
            [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{info['run_id']}'"
        )
        assert len(children) == 2
        oof = pd.read_csv(project / "outputs" / "train" / arch / "oof.csv")
        assert sorted(c.data.tags["bonetumor.fold"] for c in children) == ["0", "1"]
        for child in children:
            # One point per evaluation (2 steps, eval_every 1) at its optimiser step, for every training and
            # early-stopping metric.
            for key in ("train_loss", "lr", "val_loss", "val_accuracy", "val_macro_f1"):
                history = client.get_metric_history(child.info.run_id, key)
                assert [m.step for m in history] == [1, 2], (arch, key)
            # The fold's figures are those of its own validation tiles in the OOF file.
            rows = oof[oof["fold"] == int(child.data.tags["bonetumor.fold"])]
            assert child.data.metrics["fold_macro_f1"] == pytest.approx(macro_f1(rows["label"], rows["prediction"]))
            assert child.data.metrics["fold_accuracy"] == pytest.approx(
                accuracy_score(rows["label"], rows["prediction"])
            )

    champion = json.loads((project / "outputs" / "register" / "champion.json").read_text())
    registered = client.get_model_version("bone-tumor-classifier", champion["version"])
    # No champion existed, the referral targets are trivially met and the baseline need not be beaten (see the
    # fixture): the first model is champion.
    candidate = champion["gate"]["candidate"]
    assert candidate["target_met"]
    assert champion["alias"] == "champion"
    assert champion["gate"]["reason"].startswith("no champion yet")
    assert champion["gate"]["champion"] is None
    assert candidate["beats_baseline"] == (candidate["fold_f1_macro_mean"] > candidate["baseline_fold_f1_macro_mean"])
    assert candidate["baseline_fold_f1_macro_mean"] == pytest.approx(comparison_baseline(project))
    assert registered.aliases == [champion["alias"]]
    assert registered.tags["bonetumor.gate.decision"] == champion["alias"]
    assert registered.tags["bonetumor.gate.reason"] == champion["gate"]["reason"]
    assert registered.tags["bonetumor.status"] == "ready"
    assert registered.tags["bonetumor.init"] == "scratch (no ImageNet weights available)"
    assert registered.tags["bonetumor.temperature_at_bound"] in ("True", "False")
    assert registered.tags["bonetumor.dvc_data_md5"] == dvc_md5
    assert str(registered.version) == champion["version"]
    assert registered.run_id == champion["run_id"]
    assert registered.tags["bonetumor.arch"] == champion["arch"]
    assert registered.tags["bonetumor.data_version"] == version
    assert registered.tags["bonetumor.cv_run_id"] == runs["architectures"][champion["arch"]]["run_id"]
    refit = client.get_run(champion["run_id"])
    assert refit.data.tags["bonetumor.stage"] == "register"
    comparison = json.loads((project / "outputs" / "evaluate" / "comparison.json").read_text())
    assert champion["arch"] == comparison["winner"]


def expected_answers(project: Path, arch: str, tiles: list[Path]) -> tuple[np.ndarray, list[dict[str, object]]]:
    """What the registered model must answer, computed without its bundle's metadata.

    The weights are the refit's (``weights.pt``); the views come from params.yaml, the stain target is refitted
    on the training tiles as register fits it, the temperature and the referral rule are evaluate's outputs.
    """
    config = load_config(project / "params.yaml").for_arch(arch)
    network = build_model(arch, len(CLASSES), config.train.dropout)
    network.load_state_dict(torch.load(project / "outputs/register/bundle/weights.pt", weights_only=True))
    model = with_views(network.eval(), TestTimeViews.from_config(config.preprocess))
    policy = load_policy(project / "outputs/augment/policy.json")
    stain = full_training_set(config, project / "outputs/balance", project / "outputs/ingest", policy, 0).stain
    assert stain is not None
    assert stain.method == "reinhard"
    transform = build_eval_transform(config.preprocess, stain=stain)
    rule_file = project / "outputs/evaluate/referral" / f"{arch}.json"
    rule = ReferralPolicy.from_dict(json.loads(rule_file.read_text()), source=str(rule_file))
    # Dropping the referral rule anywhere must show: its temperature has to change the probabilities.
    assert abs(rule.temperature - 1.0) > 0.05, rule.temperature
    with torch.no_grad():
        logits = model(torch.stack([transform(decode_image(tile)) for tile in tiles])).double().numpy()
    scaled = logits / rule.temperature
    probs = np.exp(scaled - scaled.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    _, refer, reasons = rule.decide_batch(probs)
    return probs, [{"refer": bool(r), "reason": reason} for r, reason in zip(refer, reasons, strict=True)]


def test_the_served_champion_answers_exactly_what_evaluate_and_register_fitted(project: Path) -> None:
    """Evaluate -> register -> bundle -> real `bentoml serve` of @champion: the same calibrated answers."""
    from bento_server import BentoServer

    champion = json.loads((project / "outputs" / "register" / "champion.json").read_text())
    assert champion["alias"] == "champion"  # the fixture's params make sure of it
    tiles = [t for t in sorted((project / "data/sample/images").rglob("*.jpg")) if "P9-B6-5195-29864" not in t.name]
    tiles = tiles[::5]  # 6 tiles of the 3 classes, all with enough tissue
    probs, referrals = expected_answers(project, champion["arch"], tiles)
    (project / "tmp").mkdir(exist_ok=True)
    server = BentoServer.start(project, champion["version"])
    try:
        info = requests.get(f"{server.url}/model_info", timeout=30).json()
        assert info["version"] == champion["version"]
        assert info["runtime"]["engine"] == "onnx-fp32"
        assert info["stain_normalization"] == "reinhard"
        # The card registration logged: this run's data, initialisation, and the baseline beside the model.
        card = requests.get(f"{server.url}/model_card", timeout=30).text
        assert card.startswith(
            f"# Model card: bone-tumor-classifier version {champion['version']} ({champion['arch']})"
        )
        manifest = pd.read_csv(project / "outputs" / "ingest" / "manifest.csv")
        assert f"{len(manifest)} real tiles" in card
        assert f"from {manifest['slide'].nunique()} slides of {manifest['case'].nunique()} patients" in card
        assert "**from scratch**" in card
        assert "No version held the champion alias" in card
        baseline_f1 = comparison_baseline(project)
        assert f"| mean per-fold macro-F1 | {champion['gate']['candidate']['fold_f1_macro_mean']:.3f}" in card
        assert f"{baseline_f1:.3f}" in card
        for tile, expected, referral in zip(tiles, probs, referrals, strict=True):
            answer = requests.post(f"{server.url}/predict", files={"image": (tile.name, tile.read_bytes())}, timeout=60)
            assert answer.status_code == 200, answer.text
            served = answer.json()
            assert served["model"]["version"] == champion["version"]
            assert served["model"]["run_id"] == champion["run_id"]
            got = np.array([served["probabilities"][c] for c in CLASSES])
            np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=tile.name)  # FP32 ONNX: ~1e-8 here
            assert served["label"] == CLASSES[int(expected.argmax())]
            assert served["referral"] == referral, tile.name
    finally:
        server.stop()


def test_lineage_traces_a_served_answer_to_its_runs_data_params_and_commit(project: Path) -> None:
    """From the request id of a /predict answer (logged by the real service above), one command prints the chain."""
    champion = json.loads((project / "outputs" / "register" / "champion.json").read_text())
    logged = [r for r in read_prediction_log(project / "outputs/serving/predictions.jsonl") if "label" in r]
    assert logged, "the served test above logged no answer"
    answer = logged[-1]
    doc = json.loads(run(["bonetumor", "lineage", answer["request_id"], "--json"], project).stdout)
    assert doc["kind"] == "request"
    assert doc["answer"]["input_sha256"] == answer["input_sha256"]
    assert doc["model_version"]["version"] == champion["version"]
    assert "champion" in doc["model_version"]["aliases"]
    assert doc["model_version"]["model_card"] == f"runs:/{champion['run_id']}/model_card/model_card.md"
    history = doc["model_version"]["alias_history"]
    assert [(e["action"], e["alias"], e["to_version"]) for e in history] == [
        ("register", "champion", champion["version"])
    ]
    assert doc["refit_run"]["run_id"] == champion["run_id"]
    assert doc["cv_run"]["run_id"] == champion["cv_run_id"]
    assert len(doc["fold_runs"]) == 2
    assert all(f["status"] == "FINISHED" for f in doc["fold_runs"])
    assert doc["data"]["data_version"] == data_version(project / "outputs" / "ingest" / "manifest.csv")
    restore = doc["data"]["restore"]
    assert restore["tracked_by"] == "git"
    assert restore["restorable"], restore
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert restore["commands"] == [f"git checkout {commit} -- data/sample/images"]
    assert doc["code"]["git_commit"] == commit
    assert doc["code"]["dirty"] is True
    assert "dvc.lock" in doc["code"]["dirty_paths"]
    assert doc["validation"]["data_docs"].endswith("data_validation/data_docs/index.html")
    assert doc["folds"]["sha256"] == sha256_file(project / "outputs" / "split" / "folds.json")
    assert doc["params"]["resolved"]["split"]["n_folds"] == 2
    assert doc["params"]["hash"]
    assert doc["pipeline_run"]["runner"] == "dvc repro"
    assert doc["pipeline_run"]["stage"] == "register"
    assert doc["libraries"]["torch"]
    assert doc["gaps"] == []
    text = run(["bonetumor", "lineage", f"models:/bone-tumor-classifier/{champion['version']}"], project).stdout
    assert f"git checkout {commit} -- data/sample/images" in text
    assert champion["cv_run_id"] in text
    unknown = subprocess.run(
        ["bonetumor", "lineage", "0" * 32], cwd=project, env=venv_env(), capture_output=True, text=True
    )
    assert unknown.returncode == 1
    assert "neither a request id in the prediction log" in unknown.stderr


def test_repro_reruns_only_what_a_param_change_affects(project: Path) -> None:
    assert stages_run(run(["dvc", "repro"], project).stdout) == []
    params = yaml.safe_load((project / "params.yaml").read_text())
    # The preview is augment's own: the policy file is unchanged, so nothing downstream reruns.
    params["augment"]["preview_samples"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], project).stdout) == ["augment"]

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    client = MlflowClient()
    first = json.loads((project / "outputs" / "register" / "champion.json").read_text())
    assert first["alias"] == "champion"  # the fixture's params make sure of it
    # The confidence of the referral bounds changes the evaluation and the gate, not the training.
    params["referral"]["confidence"] = 0.9
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(run(["dvc", "repro"], project).stdout) == ["evaluate", "register"]
    second = json.loads((project / "outputs" / "register" / "champion.json").read_text())
    assert int(second["version"]) == int(first["version"]) + 1
    # The same recipe on the same data and folds does not beat itself: the gate keeps it as challenger, and the
    # champion alias has not moved.
    assert second["alias"] == "challenger"
    assert second["gate"]["promoted"] is False
    name = "bone-tumor-classifier"
    assert str(client.get_model_version_by_alias(name, "champion").version) == first["version"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == second["version"]
    reason = f"does not beat champion version {first['version']}'s"
    assert reason in second["gate"]["reason"]
    gate_champion, gate_candidate = second["gate"]["champion"], second["gate"]["candidate"]
    assert gate_champion["version"] == first["version"]
    assert gate_candidate["fold_f1_macro_mean"] == pytest.approx(gate_champion["fold_f1_macro_mean"])
    assert (gate_candidate["data_version"], gate_candidate["folds_digest"]) == (
        gate_champion["data_version"],
        gate_champion["folds_digest"],
    )
    tags = client.get_model_version(name, second["version"]).tags
    assert tags["bonetumor.gate.decision"] == "challenger"
    assert reason in tags["bonetumor.gate.reason"]
    assert tags["bonetumor.gate.champion.version"] == first["version"]
    # The challenger's card compares it with the champion it was judged against.
    card = client.download_artifacts(second["run_id"], "model_card/model_card.md")
    changes = Path(card).read_text().split("## Changes since the previous champion", 1)[1]
    assert f"Compared with version {first['version']}" in changes
    rows = {line.split(" | ")[0].strip("| "): line for line in changes.splitlines() if line.startswith("| ")}
    assert rows["architecture"] == f"| architecture | `{first['arch']}` | `{first['arch']}` |"
    assert "(changed)" not in rows["data version"]
    assert "(changed)" not in rows["folds file"]
    assert "**(changed)**" in rows["params hash"]  # referral.confidence changed
    assert tags["bonetumor.model_card"] == f"runs:/{second['run_id']}/model_card/model_card.md"
    # The champion's own record is untouched by the challenger's registration.
    assert client.get_model_version(name, first["version"]).tags["bonetumor.gate.decision"] == "champion"
