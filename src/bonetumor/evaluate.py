"""Evaluate: score the out-of-fold predictions of every architecture and pick the best.

Out-of-fold (OOF) predictions come from models that never saw the tile's slide and whose epoch was chosen on
other slides, so the fold's tiles neither trained nor selected the model that scores them.
Metrics are computed pooled over all folds and per fold; the ranking uses the mean per-fold macro-F1 (each
fold is one draw of held-out slides), then pooled accuracy, then the order of ``train.architectures``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bonetumor.config import Config, save_resolved
from bonetumor.datasets import label_indices
from bonetumor.errors import ArtifactError
from bonetumor.metrics import classification_metrics, macro_f1
from bonetumor.tracking import require_run, setup_mlflow
from bonetumor.train import RUNS_FILE
from bonetumor.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
COMPARISON_FILE = "comparison.json"
COMPARISON_MD_FILE = "comparison.md"


def read_oof(path: str | Path, classes: Sequence[str]) -> pd.DataFrame:
    """Read an out-of-fold predictions file and check it has a probability column per class.

    Raises:
        ArtifactError: The file is missing, unreadable or lacks columns.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError as exc:
        raise ArtifactError(f"out-of-fold predictions not found at {path}; run `bonetumor train` first") from exc
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise ArtifactError(f"{path}: unreadable out-of-fold predictions ({exc}); rerun `bonetumor train`") from exc
    expected = ["path", "label", "fold", "prediction"] + [f"prob_{c}" for c in classes]
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise ArtifactError(f"{path}: missing column(s) {missing}; expected {expected}")
    return frame


def score_oof(oof: pd.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """Pooled metrics over all OOF predictions plus macro-F1 per fold, with its mean and standard deviation."""
    y_true = np.array(label_indices(oof["label"], classes))
    y_pred = np.array(label_indices(oof["prediction"], classes))
    metrics = classification_metrics(y_true, y_pred, classes)
    per_fold = [
        macro_f1(y_true[(oof["fold"] == fold).to_numpy()], y_pred[(oof["fold"] == fold).to_numpy()])
        for fold in sorted(oof["fold"].unique())
    ]
    metrics["fold_f1_macro"] = per_fold
    metrics["fold_f1_macro_mean"] = float(statistics.fmean(per_fold))
    metrics["fold_f1_macro_std"] = float(statistics.stdev(per_fold)) if len(per_fold) > 1 else 0.0
    return metrics


def rank_architectures(scores: dict[str, dict[str, Any]], order: Sequence[str]) -> list[str]:
    """Rank architectures: mean per-fold macro-F1, then pooled accuracy (both descending), then ``order``."""
    return sorted(
        scores, key=lambda a: (-scores[a]["fold_f1_macro_mean"], -scores[a]["accuracy"], list(order).index(a))
    )


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str, out_png: str | Path) -> Path:
    """Draw the confusion matrix as counts and as row-normalised rates (recall on the diagonal)."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig = Figure(figsize=(10, 4.2))
    for axis, data, fmt, label in zip(
        fig.subplots(1, 2), (counts, rates), ("{:.0f}", "{:.2f}"), ("counts", "row-normalised"), strict=True
    ):
        image = axis.imshow(data, cmap="Blues", vmin=0, vmax=max(float(data.max()), 1e-9))
        fig.colorbar(image, ax=axis, fraction=0.046)
        for i in range(len(classes)):
            for j in range(len(classes)):
                dark = data[i, j] > data.max() / 2
                axis.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color="white" if dark else "black")
        axis.set_xticks(range(len(classes)), classes, rotation=20, fontsize=8)
        axis.set_yticks(range(len(classes)), classes, fontsize=8)
        axis.set(xlabel="predicted", ylabel="true", title=label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


def _comparison_markdown(scores: dict[str, dict[str, Any]], ranking: list[str], classes: Sequence[str]) -> str:
    lines = [
        "# Architecture comparison (out-of-fold, grouped folds)",
        "",
        f"Winner: **{ranking[0]}** (mean per-fold macro-F1, then pooled accuracy).",
        "",
        "| architecture | accuracy | macro-F1 | weighted-F1 | per-fold macro-F1 (mean +/- sd) | "
        + " | ".join(f"recall {c}" for c in classes)
        + " |",
        "|---" * (5 + len(classes)) + "|",
    ]
    for arch in ranking:
        s = scores[arch]
        lines.append(
            f"| {arch} | {s['accuracy']:.3f} | {s['f1_macro']:.3f} | {s['f1_weighted']:.3f} | "
            f"{s['fold_f1_macro_mean']:.3f} +/- {s['fold_f1_macro_std']:.3f} | "
            + " | ".join(f"{s['per_class'][c]['recall']:.3f}" for c in classes)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _dvc_metrics(scores: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "fold_f1_macro_mean",
        "fold_f1_macro_std",
    )
    return {k: scores[k] for k in keep} | {"per_class": scores["per_class"]}


def run_evaluation(
    config: Config, train_dir: str | Path, out_dir: str | Path, project_dir: str | Path
) -> dict[str, Any]:
    """Score every architecture's OOF predictions, plot confusion matrices, log all to MLflow, rank.

    Args:
        config: Uses ``data.classes``, ``train.architectures`` and ``tracking``.
        train_dir: The train stage's output (``runs.json`` and ``<arch>/oof.csv``).
        out_dir: Output folder: ``metrics.json`` (DVC metrics), ``comparison.json``, ``comparison.md``,
            ``plots/<arch>_confusion_matrix.png`` and ``reports/<arch>.json``.
        project_dir: Base folder for a relative tracking URI.

    Returns:
        The comparison: ranking, winner and every architecture's metrics.
    """
    train_dir = Path(train_dir)
    classes = config.data.classes
    runs = read_json(train_dir / RUNS_FILE, "training runs file")
    if not isinstance(runs, dict) or not isinstance(runs.get("architectures"), dict):
        raise ArtifactError(f"{train_dir / RUNS_FILE}: no 'architectures' mapping; rerun `bonetumor train`")
    archs = [a for a in config.train.architectures if a in runs["architectures"]]
    if not archs:
        raise ArtifactError(
            f"{train_dir / RUNS_FILE} lists none of {list(config.train.architectures)}; rerun `bonetumor train`"
        )
    setup_mlflow(config.tracking, project_dir)
    scores: dict[str, dict[str, Any]] = {}
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "train", "tracking"))
        (tmp / "plots").mkdir()
        for arch in archs:
            oof = read_oof(train_dir / arch / "oof.csv", classes)
            scores[arch] = score_oof(oof, classes)
            write_json(tmp / "reports" / f"{arch}.json", scores[arch])
            plot_confusion(
                scores[arch]["confusion_matrix"],
                classes,
                f"{arch}: out-of-fold confusion matrix (n={len(oof)})",
                tmp / "plots" / f"{arch}_confusion_matrix.png",
            )
            log.info(
                "%s: accuracy=%.3f macro-F1=%.3f per-fold macro-F1=%.3f+/-%.3f",
                arch,
                scores[arch]["accuracy"],
                scores[arch]["f1_macro"],
                scores[arch]["fold_f1_macro_mean"],
                scores[arch]["fold_f1_macro_std"],
            )
        ranking = rank_architectures(scores, config.train.architectures)
        comparison = {
            # The training runs these scores come from: register refuses a comparison of other runs.
            "cv_run_ids": {arch: runs["architectures"][arch]["run_id"] for arch in archs},
            "ranking": ranking,
            "winner": ranking[0],
            "selection": "fold_f1_macro_mean, then accuracy",
            "scores": scores,
        }
        write_json(tmp / COMPARISON_FILE, comparison)
        (tmp / COMPARISON_MD_FILE).write_text(_comparison_markdown(scores, ranking, classes), encoding="utf-8")
        write_json(tmp / METRICS_FILE, {arch: _dvc_metrics(scores[arch]) for arch in archs})
        for arch in archs:
            run_id = runs["architectures"][arch]["run_id"]
            require_run(run_id, f"{arch} cross-validation run")
            with mlflow.start_run(run_id=run_id):
                flat = {k: v for k, v in _dvc_metrics(scores[arch]).items() if k != "per_class"}
                for name, values in scores[arch]["per_class"].items():
                    flat.update({f"{name}_{m}": values[m] for m in ("precision", "recall", "f1")})
                mlflow.log_metrics({f"oof_{k}": float(v) for k, v in flat.items()})
                mlflow.set_tag("bonetumor.rank", str(ranking.index(arch) + 1))
                mlflow.log_artifact(str(tmp / "plots" / f"{arch}_confusion_matrix.png"), "evaluation")
                mlflow.log_artifact(str(tmp / "reports" / f"{arch}.json"), "evaluation")
                mlflow.log_artifact(str(tmp / COMPARISON_MD_FILE), "evaluation")
    log.info("winner: %s (ranking %s)", ranking[0], ranking)
    return comparison
