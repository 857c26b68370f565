import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import CLASSES, venv_env

from bonetumor.config import Config
from bonetumor.errors import ArtifactError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.evaluation.evaluate import (
    METRICS_DIR,
    REPORTS_DIR,
    headline_metrics,
    rank_architectures,
    read_oof,
    run_evaluation,
    score_oof,
)
from bonetumor.evaluation.metrics import classification_metrics, macro_f1
from bonetumor.registry.tracking import setup_mlflow


def oof_frame(labels: list[str], predictions: list[str], folds: list[int]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"path": [f"t{i}.jpg" for i in range(len(labels))], "label": labels, "prediction": predictions}
    )
    frame["fold"] = folds
    for c in CLASSES:
        frame[f"prob_{c}"] = (frame["prediction"] == c).astype(float)
    return frame


def test_metrics_known_answer() -> None:
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["Non-Viable-Tumor"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert m["per_class"]["Viable-Tumor"]["recall"] == 0.5
    assert m["f1_macro"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))


def test_macro_f1_ignores_a_class_absent_from_labels_and_predictions() -> None:
    assert macro_f1([0, 0, 1], [0, 0, 1]) == 1.0  # class 2 absent: not a zero in the average
    assert macro_f1([0, 0, 1], [0, 2, 1]) < 1.0  # predicting an absent class is still an error


def test_score_oof_reports_per_fold_mean_and_spread() -> None:
    oof = oof_frame(
        ["Non-Tumor", "Viable-Tumor", "Non-Tumor", "Viable-Tumor"],
        ["Non-Tumor", "Viable-Tumor", "Viable-Tumor", "Viable-Tumor"],
        [0, 0, 1, 1],
    )
    scores = score_oof(oof, CLASSES)
    assert scores["fold_f1_macro"][0] == 1.0
    assert scores["fold_f1_macro"][1] == pytest.approx(np.mean([0.0, 2 / 3]))
    assert scores["fold_f1_macro_mean"] == pytest.approx(np.mean(scores["fold_f1_macro"]))
    assert scores["fold_f1_macro_std"] > 0
    json.dumps(scores)  # everything is plain JSON for DVC and MLflow


def test_ranking_uses_fold_f1_then_accuracy_then_configured_order() -> None:
    scores = {
        "a": {"fold_f1_macro_mean": 0.7, "accuracy": 0.8},
        "b": {"fold_f1_macro_mean": 0.9, "accuracy": 0.5},
        "c": {"fold_f1_macro_mean": 0.7, "accuracy": 0.9},
        "d": {"fold_f1_macro_mean": 0.7, "accuracy": 0.8},
    }
    assert rank_architectures(scores, ["d", "a", "b", "c"]) == ["b", "c", "d", "a"]


def test_unreadable_oof_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run `bonetumor train` first"):
        read_oof(tmp_path / "missing.csv", CLASSES)
    (tmp_path / "oof.csv").write_text("path,label\nx,y\n")
    with pytest.raises(ArtifactError, match=r"missing column\(s\)"):
        read_oof(tmp_path / "oof.csv", CLASSES)


def synthetic_oof(seed: int, skill: float, n: int = 60) -> pd.DataFrame:
    """OOF predictions of a model that puts extra logit mass ``skill`` on the true class (3 folds)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), labels] += skill
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame(
        {
            "path": [f"t{i:03d}.jpg" for i in range(n)],
            "label": [CLASSES[i] for i in labels],
            "slide": [f"s{i % 6}" for i in range(n)],
            "case": "c",
            "fold": np.arange(n) % 6 // 2,
            "prediction": [CLASSES[i] for i in probs.argmax(1)],
        }
    )
    for i, c in enumerate(CLASSES):
        frame[f"prob_{c}"] = probs[:, i]
    for i, c in enumerate(CLASSES):
        frame[f"logit_{c}"] = logits[:, i]
    return frame


@dataclass(frozen=True)
class Evaluated:
    """One run of :func:`run_evaluation` on synthetic OOF files, shared by the tests that read its outputs."""

    out: Path
    train_dir: Path
    tracking_uri: str
    run_ids: dict[str, str]
    comparison: dict[str, Any]


MODELS = ("baseline", "resnet50", "vgg19", "ensemble")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Evaluated]:
    """Evaluate two architectures, the baseline and their ensemble once for the module (it takes seconds)."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = Config.from_dict({"tracking": {"uri": uri}, "train": {"architectures": ["resnet50", "vgg19"]}})
    # Module-scoped, so before the per-test isolation: drop a developer's tracking override here too.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        setup_mlflow(config.tracking, tmp_path)
        train_dir = tmp_path / "train"
        run_ids = {}
        oofs = {}
        for arch, skill in (("resnet50", 3.0), ("vgg19", 0.5), ("baseline", 1.5)):
            seed = {"resnet50": 1, "vgg19": 2, "baseline": 3}[arch]
            oofs[arch] = synthetic_oof(seed, skill)
        # The train stage writes the ensemble (the members' mean probability) as one more candidate; evaluation
        # scores whatever runs.json lists.
        probs = [f"prob_{c}" for c in CLASSES]
        mean = (oofs["resnet50"][probs].to_numpy() + oofs["vgg19"][probs].to_numpy()) / 2
        oofs["ensemble"] = oofs["resnet50"].assign(
            prediction=[CLASSES[i] for i in mean.argmax(1)],
            **{f"prob_{c}": mean[:, i] for i, c in enumerate(CLASSES)},
            **{f"logit_{c}": np.log(mean[:, i]) for i, c in enumerate(CLASSES)},
        )
        for arch, oof in oofs.items():
            (train_dir / arch).mkdir(parents=True)
            oof.to_csv(train_dir / arch / "oof.csv", index=False)
            with mlflow.start_run(run_name=f"cv-{arch}") as run:
                run_ids[arch] = run.info.run_id
        runs = {
            "architectures": {
                a: {"run_id": run_ids[a], "init": "scratch (no ImageNet weights available)"}
                for a in ("resnet50", "vgg19")
            },
            "baseline": {"run_id": run_ids["baseline"]},
            "candidates": {"ensemble": {"base": None, "kind": "ensemble", "run_id": run_ids["ensemble"]}},
        }
        (train_dir / "runs.json").write_text(json.dumps(runs))
        comparison = run_evaluation(config, train_dir, tmp_path / "evaluate", tmp_path)
        yield Evaluated(tmp_path / "evaluate", train_dir, uri, run_ids, comparison)
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, and each test's isolation (conftest) restores the value
    # it found on its way out; left set, it would point the next module's and session's fixtures (a `dvc repro`,
    # a registered test model) at this module's database.
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_run_evaluation_writes_every_artifact_and_logs_them(evaluated: Evaluated) -> None:
    comparison, out, train_dir, run_ids = evaluated.comparison, evaluated.out, evaluated.train_dir, evaluated.run_ids
    mlflow.set_tracking_uri(evaluated.tracking_uri)
    assert comparison["winner"] == "resnet50"  # the model with the real signal
    assert comparison["candidates"] == ["ensemble"]
    assert comparison["ranking"] == ["resnet50", "vgg19"]  # the baseline is the bar, never ranked
    bar = comparison["scores"]["baseline"]["fold_f1_macro_mean"]
    assert comparison["baseline"]["fold_f1_macro_mean"] == bar
    assert (
        comparison["scores"]["resnet50"]["fold_f1_macro_mean"]
        > bar
        > comparison["scores"]["vgg19"]["fold_f1_macro_mean"]
    )
    beats = comparison["beats_baseline"]
    assert (beats["resnet50"], beats["vgg19"]) == (True, False)
    assert beats["ensemble"] == (comparison["scores"]["ensemble"]["fold_f1_macro_mean"] > bar)
    for name in MODELS:
        for plot in ("confusion_matrix", "roc_pr", "reliability", "risk_coverage"):
            assert (out / "plots" / f"{name}_{plot}.png").is_file(), (name, plot)
        policy = ReferralPolicy.from_dict(json.loads((out / "referral" / f"{name}.json").read_text()))
        assert policy.target_class == "Viable-Tumor"
        summary = comparison["scores"][name]["fold_summary"]["f1_macro"]
        assert summary["n"] == 3
        assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    # The ensemble file is scored as written: the mean of the architectures' probabilities.
    first = pd.read_csv(train_dir / "resnet50" / "oof.csv")
    second = pd.read_csv(train_dir / "vgg19" / "oof.csv")
    assert comparison["scores"]["resnet50"]["roc_pr"]["roc_auc_macro"] > 0.9
    expected_accuracy = np.mean(
        np.argmax(np.stack([(first[f"prob_{c}"] + second[f"prob_{c}"]).to_numpy() for c in CLASSES], 1), 1)
        == np.arange(60) % 3
    )
    assert comparison["scores"]["ensemble"]["accuracy"] == pytest.approx(expected_accuracy)
    report = (out / "comparison.md").read_text()
    assert "| resnet50 | 0.942 |" in report  # the paper's figure beside ours
    assert "## ensemble: per class" in report
    assert f"mean per-fold macro-F1 **{bar:.3f}**" in report
    assert "vgg19 " in report
    assert "**does not beat it**" in report
    assert "resnet50 started from random initialisation" in report
    logged = mlflow.get_run(run_ids["resnet50"])
    assert "oof_ece_after" in logged.data.metrics
    # The MLflow figures keep their names: the overall ones, the fold interval and the per-class ones.
    assert logged.data.metrics["oof_f1_macro"] == pytest.approx(comparison["scores"]["resnet50"]["f1_macro"])
    assert logged.data.metrics["oof_fold_f1_macro_ci_low"] == pytest.approx(
        comparison["scores"]["resnet50"]["fold_summary"]["f1_macro"]["ci_low"]
    )
    assert logged.data.metrics["oof_Viable-Tumor_recall"] == pytest.approx(
        comparison["scores"]["resnet50"]["per_class"]["Viable-Tumor"]["recall"]
    )
    assert "oof_referral_coverage" in logged.data.metrics
    assert logged.data.tags["bonetumor.beats_baseline"] == "True"
    assert mlflow.get_run(run_ids["baseline"]).data.tags["bonetumor.rank"] == "baseline"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_ids["resnet50"], "evaluation")}
    assert "evaluation/resnet50_reliability.png" in artifacts
    assert "evaluation/resnet50.json" in artifacts  # the model's report


HEADLINE_KEYS = {"accuracy", "f1_lower", "f1_mean", "f1_upper", "recall_Viable-Tumor", "referral"}


def test_dvc_metrics_are_the_headline_figures_one_file_per_model(evaluated: Evaluated) -> None:
    out, scores = evaluated.out, evaluated.comparison["scores"]
    assert not (out / "metrics.json").exists()  # the old one-row-of-everything file is gone
    assert sorted(p.name for p in (out / METRICS_DIR).iterdir()) == sorted(f"{m}.json" for m in MODELS)
    for name in MODELS:
        headline = json.loads((out / METRICS_DIR / f"{name}.json").read_text())
        assert set(headline) == HEADLINE_KEYS, name
        assert set(headline["referral"]) == {"coverage"}, name
        s = scores[name]
        summary = s["fold_summary"]["f1_macro"]
        assert headline["accuracy"] == s["accuracy"]
        assert (headline["f1_lower"], headline["f1_mean"], headline["f1_upper"]) == (
            summary["ci_low"],
            summary["mean"],
            summary["ci_high"],
        )
        assert headline["f1_mean"] == pytest.approx(s["fold_f1_macro_mean"])  # the ranking's figure
        assert headline["recall_Viable-Tumor"] == s["per_class"]["Viable-Tumor"]["recall"]
        assert headline["referral"]["coverage"] == s["referral"]["coverage"]


def test_reports_hold_every_figure_of_their_model_as_in_the_comparison(evaluated: Evaluated) -> None:
    out = evaluated.out
    on_disk = json.loads((out / "comparison.json").read_text())["scores"]
    assert sorted(p.name for p in (out / REPORTS_DIR).iterdir()) == sorted(f"{m}.json" for m in MODELS)
    for name in MODELS:
        report = json.loads((out / REPORTS_DIR / f"{name}.json").read_text())
        assert report == on_disk[name], name
        # The figures the old metrics.json carried are all there, under their report names.
        for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted", "fold_f1_macro_std"):
            assert isinstance(report[key], float), (name, key)
        assert set(report["per_class"]) == set(CLASSES)
        assert {"precision", "recall", "f1", "support"} <= set(report["per_class"]["Viable-Tumor"])
        assert {"ece_before", "ece_after", "temperature"} <= set(report["calibration"])
        assert {"coverage", "accepted_accuracy"} <= set(report["referral"])
        assert "roc_auc_macro" in report["roc_pr"]
        assert "cpu_ms_per_tile" in report


def test_headline_figures_known_answer() -> None:
    scores = {
        "accuracy": 0.8,
        "fold_summary": {"f1_macro": {"n": 3, "mean": 0.7, "ci_low": 0.5, "ci_high": 0.9}},
        "per_class": {"Viable-Tumor": {"recall": 0.75}, "Non-Tumor": {"recall": 0.9}},
        "referral": {"coverage": 0.6, "accepted_accuracy": 0.95},
    }
    assert headline_metrics(scores, "Viable-Tumor") == {
        "accuracy": 0.8,
        "f1_lower": 0.5,
        "f1_mean": 0.7,
        "f1_upper": 0.9,
        "recall_Viable-Tumor": 0.75,
        "referral": {"coverage": 0.6},
    }
    # The recall column follows referral.target_class.
    assert headline_metrics(scores, "Non-Tumor")["recall_Non-Tumor"] == 0.9


def dvc(args: list[str], cwd: Path) -> str:
    result = subprocess.run(
        ["dvc", *args], cwd=cwd, env=venv_env(COLUMNS="160"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.integration
def test_dvc_metrics_show_prints_one_short_row_per_model_and_reads_the_reports(
    evaluated: Evaluated, tmp_path: Path
) -> None:
    """The real ``dvc metrics show`` on this layout, declared as dvc.yaml's evaluate stage declares it."""
    shutil.copytree(evaluated.out, tmp_path / "outputs" / "evaluate")
    stage = {
        "cmd": "bonetumor evaluate",
        "outs": ["outputs/evaluate/comparison.json", f"outputs/evaluate/{REPORTS_DIR}"],
        "metrics": [f"outputs/evaluate/{METRICS_DIR}"],
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": stage}}))
    dvc(["init", "--no-scm", "-q"], tmp_path)
    table = dvc(["metrics", "show"], tmp_path).splitlines()
    header = table[0].split()
    # DVC sorts the columns by name; the names were chosen so that the sorted order reads well.
    assert header == ["Path", "accuracy", "f1_lower", "f1_mean", "f1_upper", "recall_Viable-Tumor", "referral.coverage"]
    assert [row.split()[0] for row in table[1:]] == [f"outputs/evaluate/{METRICS_DIR}/{m}.json" for m in sorted(MODELS)]
    # The demo's seven models have names up to 13 characters long; these are up to 8: room to spare.
    assert max(len(line) for line in table) <= 160 - 5
    # DVC reads the reports as metrics too (what `dvc metrics diff --targets outputs/evaluate/reports` compares).
    shown = json.loads(dvc(["metrics", "show", "--json", f"outputs/evaluate/{REPORTS_DIR}"], tmp_path))
    (workspace,) = shown.values()  # one revision, the workspace (DVC names it "" there)
    files = workspace["data"]
    scores = evaluated.comparison["scores"]
    for name in MODELS:
        figures = files[f"outputs/evaluate/{REPORTS_DIR}/{name}.json"]["data"]
        assert figures["per_class"]["Viable-Tumor"] == scores[name]["per_class"]["Viable-Tumor"], name
        assert figures["fold_summary"]["f1_macro"]["ci_low"] == scores[name]["fold_summary"]["f1_macro"]["ci_low"]
