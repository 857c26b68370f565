"""Evaluate: score the out-of-fold predictions of every model, calibrate them, choose the referral rule, rank.

Out-of-fold (OOF) predictions come from models that never saw the tile's slide and whose epoch was chosen on
other slides, so the fold's tiles neither trained nor selected the model that scores them.

For each model (the colour-histogram baseline, every trained architecture, and candidates built from them on the
same folds: the soft-vote ensemble of the architectures) this stage writes:

* pooled metrics and per-fold metrics with mean, standard deviation and a confidence interval over folds;
* the confusion matrix (counts and row-normalised), a per-class precision/recall/F1 report, one-vs-rest ROC and
  PR curves with AUC;
* temperature scaling fitted on the OOF logits, the reliability diagram with ECE before and after, the referral
  rule (``referral`` params) and its risk-coverage curve; the rule is stored and travels with the model;
* the Grad-CAM galleries the train stage drew with each fold's model on that fold's validation tiles.

Two per-model JSON files carry the figures to DVC. ``metrics/<model>.json`` (the stage's DVC metrics) holds only
the headline figures, so that ``dvc metrics show`` prints one short row per model; ``reports/<model>.json`` holds
every figure (the model's entry in ``comparison.json``), which ``dvc metrics diff --targets
outputs/evaluate/reports`` compares.

The ranking uses the mean per-fold macro-F1 (each fold is one draw of held-out slides), then pooled accuracy,
then the order of ``train.architectures``; the winner, which the register stage refits, is the best single
architecture. The baseline is not ranked: it is the bar (``beats_baseline`` per architecture, which the champion
gate reads). ``comparison.md`` puts our figures beside the baseline's and the ones the paper reports, and says
where each architecture's starting weights came from and whether a temperature fit hit its bound.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bonetumor.config import Config, save_resolved
from bonetumor.data.datasets import label_indices
from bonetumor.errors import ArtifactError
from bonetumor.evaluation.calibration import (
    ReferralPolicy,
    choose_referral,
    expected_calibration_error,
    oof_arrays,
    plot_risk_coverage,
    referral_summary,
    reliability_diagram,
    softmax,
)
from bonetumor.evaluation.metrics import classification_metrics, macro_f1
from bonetumor.evaluation.plots import per_class_report, plot_comparison, plot_confusion, plot_roc_pr, report_markdown
from bonetumor.evaluation.stats import summarise_folds
from bonetumor.faults import fault_point
from bonetumor.registry.tracking import require_run, setup_mlflow
from bonetumor.training.candidates.baseline import BASELINE
from bonetumor.training.candidates.baseline import describe as describe_baseline
from bonetumor.training.cross_validation import RUNS_FILE
from bonetumor.utils import atomic_dir, read_json, write_json
from bonetumor.utils import format_interval as _ci
from bonetumor.utils import format_number as _fmt

log = logging.getLogger(__name__)

#: Folder of the headline figures, one ``<model>.json`` each: the stage's DVC metrics.
METRICS_DIR = "metrics"
#: Folder of every figure of a model, one ``<model>.json`` each (its entry in ``comparison.json``).
REPORTS_DIR = "reports"
COMPARISON_FILE = "comparison.json"
COMPARISON_MD_FILE = "comparison.md"
REFERRAL_DIR = "referral"
#: Figures the paper reports (Arunachalam et al. 2019 and the paper this project follows), as quoted in the
#: project's issue tracker; None where no figure was quoted. Our figures come from grouped folds, theirs from
#: random tile splits (tiles of one slide on both sides), which the README explains.
PAPER = {
    "resnet50": {"accuracy": 0.942, "test_accuracy": 0.90, "test_recall_Viable-Tumor": 0.89},
    "vgg19": {"accuracy": 0.918, "test_accuracy": 0.79, "test_recall_Viable-Tumor": 0.59},
}


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


def score_oof(oof: pd.DataFrame, classes: Sequence[str], level: float = 0.95) -> dict[str, Any]:
    """Pooled metrics over all OOF predictions, and per-fold metrics with mean, sd and a CI over folds.

    ``fold_summary`` holds, per metric (accuracy, macro/weighted F1, per-class recall), the fold values' n, mean,
    standard deviation and a Student-t confidence interval at ``level``.
    """
    y_true = np.array(label_indices(oof["label"], classes))
    y_pred = np.array(label_indices(oof["prediction"], classes))
    metrics = classification_metrics(y_true, y_pred, classes)
    per_fold: list[dict[str, float]] = []
    for fold in sorted(oof["fold"].unique()):
        rows = (oof["fold"] == fold).to_numpy()
        fold_metrics = classification_metrics(y_true[rows], y_pred[rows], classes)
        entry = {
            "accuracy": fold_metrics["accuracy"],
            "f1_macro": macro_f1(y_true[rows], y_pred[rows]),
            "f1_weighted": fold_metrics["f1_weighted"],
        }
        for name, values in fold_metrics["per_class"].items():
            if values["support"]:  # recall of a class the fold does not hold is undefined, not 0
                entry[f"recall_{name}"] = values["recall"]
        per_fold.append(entry)
    metrics["fold_f1_macro"] = [f["f1_macro"] for f in per_fold]
    metrics["fold_f1_macro_mean"] = float(statistics.fmean(metrics["fold_f1_macro"]))
    metrics["fold_f1_macro_std"] = float(statistics.stdev(metrics["fold_f1_macro"])) if len(per_fold) > 1 else 0.0
    metrics["fold_summary"] = summarise_folds(per_fold, level)
    return metrics


def rank_architectures(scores: dict[str, dict[str, Any]], order: Sequence[str]) -> list[str]:
    """Rank architectures: mean per-fold macro-F1, then pooled accuracy (both descending), then ``order``."""
    return sorted(
        scores, key=lambda a: (-scores[a]["fold_f1_macro_mean"], -scores[a]["accuracy"], list(order).index(a))
    )


def comparison_markdown(
    scores: dict[str, dict[str, Any]],
    ranking: list[str],
    candidates: list[str],
    classes: Sequence[str],
    level: float,
    target_class: str,
    init: dict[str, str] | None = None,
    baseline: str | None = None,
) -> str:
    """Return the comparison report: our models side by side, the paper's figures beside ours, per-class tables.

    Args:
        scores: Every model's scores (:func:`_evaluate_model`).
        ranking: The architectures, best first.
        candidates: The other models scored on the same folds.
        classes: Class names in output order.
        level: Confidence level of the fold intervals.
        target_class: The referral rule's protected class.
        init: Per architecture, where its starting weights came from (``bonetumor.init``).
        baseline: The baseline's name in ``scores`` (None: no baseline was scored).
    """
    rows = [*([baseline] if baseline is not None else []), *ranking, *candidates]
    lines = _md_header(scores, ranking, candidates, init, baseline)
    lines += _md_overall(scores, ranking, rows, level)
    lines += _md_paper(scores, rows, target_class)
    for name in rows:
        lines += _md_model(name, scores[name], classes, target_class)
    return "\n".join(lines) + "\n"


def _md_header(
    scores: dict[str, dict[str, Any]],
    ranking: list[str],
    candidates: list[str],
    init: dict[str, str] | None,
    baseline: str | None,
) -> list[str]:
    """The winner, the candidates, the baseline bar, where weights started, temperature warnings."""
    lines = [
        "# Model comparison (out-of-fold predictions, folds grouped by slide or patient)",
        "",
        f"Winner (refit and registered): **{ranking[0]}**, by mean per-fold macro-F1, then pooled accuracy.",
        f"Candidates evaluated on the same folds: {', '.join(candidates) or 'none'}.",
        "CPU ms/tile: median time per tile of the fold-0 model on this machine's CPU (batch "
        "`candidates.latency_batch`), with its test-time views; the ensemble runs every architecture, the baseline "
        "its histograms and forest.",
        "",
    ]
    if baseline is not None:
        bar = scores[baseline]["fold_f1_macro_mean"]
        lines.append(
            f"Baseline to beat ({baseline}: colour histograms into a random forest, same folds): mean per-fold "
            f"macro-F1 **{bar:.3f}**. "
            + "; ".join(
                f"{a} {scores[a]['fold_f1_macro_mean']:.3f} "
                + ("beats it" if scores[a]["fold_f1_macro_mean"] > bar else "**does not beat it**")
                for a in ranking
            )
            + "."
        )
    for arch, tag in (init or {}).items():
        if tag.startswith("scratch"):
            lines.append(f"{arch} started from random initialisation: `bonetumor.init = {tag}`.")
        else:
            lines.append(f"{arch} started from `{tag}`.")
    bounded = [n for n, s in scores.items() if s.get("calibration", {}).get("temperature_at_bound")]
    if bounded:
        lines.append(
            f"**Temperature fit at its bound** for {', '.join(bounded)}: their logits carry no usable confidence "
            "signal (or separate the tiles perfectly); their calibrated probabilities are unreliable."
        )
    return lines


def _md_overall(scores: dict[str, dict[str, Any]], ranking: list[str], rows: list[str], level: float) -> list[str]:
    """The overall table: every model's pooled and per-fold figures, calibration, referral and latency."""
    pct = f"{level:.0%}"
    lines = [
        "",
        f"## Overall ({pct} CI over folds in brackets)",
        "",
        "| model | accuracy | macro-F1 | weighted-F1 | per-fold macro-F1 | per-fold accuracy | ROC AUC (macro) "
        "| ECE before -> after | referral coverage | accuracy of accepted | delta accuracy vs winner "
        "| CPU ms/tile |",
        "|---" * 12 + "|",
    ]
    best = scores[ranking[0]]["accuracy"]
    for name in rows:
        s = scores[name]
        cal = s.get("calibration", {})
        ref = s.get("referral", {})
        lines.append(
            f"| {name} | {s['accuracy']:.3f} | {s['f1_macro']:.3f} | {s['f1_weighted']:.3f} | "
            f"{_ci(s['fold_summary'].get('f1_macro'))} | {_ci(s['fold_summary'].get('accuracy'))} | "
            f"{_fmt(s.get('roc_pr', {}).get('roc_auc_macro'))} | "
            f"{_fmt(cal.get('ece_before'))} -> {_fmt(cal.get('ece_after'))} | "
            f"{_fmt(ref.get('coverage'))} | {_fmt(ref.get('accepted_accuracy'))} | "
            f"{s['accuracy'] - best:+.3f} | {_fmt(s.get('cpu_ms_per_tile'), 1)} |"
        )
    return lines


def _md_paper(scores: dict[str, dict[str, Any]], rows: list[str], target_class: str) -> list[str]:
    """The paper's figures beside ours."""
    lines = [
        "",
        "## The paper's figures beside ours",
        "",
        "The paper split tiles at random, so tiles of one slide sat in training and test; ours never share a slide "
        "(or patient) across a fold, which is harder and honest. n/a: the paper quotes no such figure.",
        "",
        f"| model | accuracy (paper, CV) | accuracy (ours, OOF) | accuracy (paper, 177-tile test) | "
        f"recall {target_class} (paper, test) | recall {target_class} (ours, OOF) |",
        "|---" * 6 + "|",
    ]
    for name in rows:
        paper = PAPER.get(name, {})
        s = scores[name]
        lines.append(
            f"| {name} | {_fmt(paper.get('accuracy'))} | {s['accuracy']:.3f} | {_fmt(paper.get('test_accuracy'))} | "
            f"{_fmt(paper.get(f'test_recall_{target_class}'))} | {s['per_class'][target_class]['recall']:.3f} |"
        )
    return lines


def _md_model(name: str, s: dict[str, Any], classes: Sequence[str], target_class: str) -> list[str]:
    """One model's per-class report, confusion matrix and referral rule."""
    lines = ["", f"## {name}: per class", "", report_markdown(s["report"], classes).rstrip(), ""]
    lines.append("Confusion matrix (rows true, columns predicted):")
    lines.append("")
    lines.append("| true \\ predicted | " + " | ".join(classes) + " |")
    lines.append("|---" * (len(classes) + 1) + "|")
    for label, row in zip(classes, s["confusion_matrix"], strict=True):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    ref = s.get("referral", {})
    if ref:
        bound_note = " (at its bound: unreliable)" if s["calibration"].get("temperature_at_bound") else ""
        verdict = "targets met" if ref.get("target_met") else "targets not met by any threshold: every tile is referred"
        lines += [
            "",
            f"Referral: temperature {_fmt(s['calibration']['temperature'])}{bound_note}, confidence threshold "
            f"{_fmt(ref.get('confidence_threshold'))}; {ref.get('referred', 'n/a')} of {s['n']} tiles referred; "
            f"accepted accuracy {_fmt(ref.get('accepted_accuracy'))} (error upper bound "
            f"{_fmt(ref.get('accepted_error_upper'))} vs max {_fmt(ref.get('max_error'))}), {target_class} "
            f"recall of accepted {_fmt(ref.get('accepted_target_recall'))} (lower bound "
            f"{_fmt(ref.get('accepted_recall_lower'))} vs target {_fmt(ref.get('target_recall_goal'))}): "
            f"{verdict}.",
        ]
    return lines


def _balance_report(comparison: dict[str, Any], balance_dir: str | Path | None) -> str:
    """Record the balance gate's decision in ``comparison`` and return its Markdown report ("" without one)."""
    from bonetumor.data.datasets import DECISION_FILE, read_decision

    if balance_dir is None or not (Path(balance_dir) / DECISION_FILE).is_file():
        return ""
    decision = read_decision(balance_dir)
    comparison["balance"] = {"use_synthetic": decision["use_synthetic"], "reason": decision["reason"]}
    report = Path(balance_dir) / "ablation.md"
    return "\n" + report.read_text(encoding="utf-8") if report.is_file() else ""


def headline_metrics(scores: dict[str, Any], target_class: str) -> dict[str, Any]:
    """Return one model's headline figures, the row ``dvc metrics show`` prints for it.

    DVC prints a row per metrics file and a column per (dotted) key, sorted by name, all on one line: the keys are
    few and short, so that the table of the demo's models fits a 160-column terminal (about 135 wide), and they
    sort into reading order. Pooled out-of-fold accuracy; the per-fold macro-F1 mean between the bounds of its
    interval over the folds (the figure the ranking and the baseline bar use); the out-of-fold recall of the
    referral rule's protected class; the fraction of tiles the referral rule accepts, under the same dotted name
    as in the report. Every other figure (accuracy of the accepted tiles included) is in the model's report.

    Args:
        scores: The model's scores (:func:`_evaluate_model`, with ``referral``).
        target_class: The referral rule's protected class (``referral.target_class``).

    Returns:
        ``{"accuracy", "f1_lower", "f1_mean", "f1_upper", "recall_<target_class>", "referral": {"coverage"}}``.
    """
    summary = scores["fold_summary"]["f1_macro"]
    return {
        "accuracy": scores["accuracy"],
        "f1_lower": summary["ci_low"],
        "f1_mean": summary["mean"],
        "f1_upper": summary["ci_high"],
        f"recall_{target_class}": scores["per_class"][target_class]["recall"],
        "referral": {"coverage": scores["referral"]["coverage"]},
    }


def _scalar_figures(scores: dict[str, Any]) -> dict[str, Any]:
    """The overall scalar figures logged to MLflow as ``oof_<name>`` (per-class figures are added apart)."""
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
    flat: dict[str, Any] = {k: scores[k] for k in keep}
    summary = scores["fold_summary"].get("f1_macro", {})
    flat["fold_f1_macro_ci_low"] = summary.get("ci_low")
    flat["fold_f1_macro_ci_high"] = summary.get("ci_high")
    flat["roc_auc_macro"] = scores["roc_pr"].get("roc_auc_macro")
    flat["average_precision_macro"] = scores["roc_pr"].get("average_precision_macro")
    flat["ece_before"] = scores["calibration"]["ece_before"]
    flat["ece_after"] = scores["calibration"]["ece_after"]
    flat["temperature"] = scores["calibration"]["temperature"]
    flat["cpu_ms_per_tile"] = scores.get("cpu_ms_per_tile")
    flat["referral_coverage"] = scores["referral"]["coverage"]
    flat["referral_accepted_accuracy"] = scores["referral"]["accepted_accuracy"]
    return flat


def _evaluate_model(name: str, oof: pd.DataFrame, config: Config, plots: Path, referral_dir: Path) -> dict[str, Any]:
    """Score, plot, calibrate and choose the referral rule for one model's OOF predictions."""
    classes = config.data.classes
    scores = score_oof(oof, classes, config.evaluate.confidence_level)
    y_true = np.array(label_indices(oof["label"], classes))
    y_pred = np.array(label_indices(oof["prediction"], classes))
    scores["report"] = per_class_report(y_true, y_pred, classes)
    plot_confusion(
        scores["confusion_matrix"],
        classes,
        f"{name}: out-of-fold confusion matrix (n={len(oof)})",
        plots / f"{name}_confusion_matrix.png",
    )
    probs = oof[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
    scores["roc_pr"] = plot_roc_pr(
        probs, y_true, classes, f"{name}: one-vs-rest (out-of-fold)", plots / f"{name}_roc_pr.png"
    )

    logits, labels = oof_arrays(oof, classes, source=f"{name} out-of-fold predictions")
    policy = choose_referral(logits, labels, classes, config.referral)
    calibrated = policy.calibrated_probs(logits)
    bins = config.evaluate.calibration_bins
    scores["calibration"] = {
        "temperature": policy.temperature,
        "temperature_at_bound": policy.temperature_at_bound,
        "ece_before": expected_calibration_error(softmax(logits), labels, bins),
        "ece_after": expected_calibration_error(calibrated, labels, bins),
    }
    reliability_diagram(
        softmax(logits),
        calibrated,
        labels,
        bins,
        f"{name}: reliability (out-of-fold)",
        plots / f"{name}_reliability.png",
    )
    plot_risk_coverage(
        calibrated, labels, policy, f"{name}: risk-coverage (out-of-fold)", plots / f"{name}_risk_coverage.png"
    )
    scores["referral"] = {**referral_summary(policy, calibrated, labels), **_policy_figures(policy)}
    write_json(referral_dir / f"{name}.json", policy.to_dict())
    return scores


def _policy_figures(policy: ReferralPolicy) -> dict[str, Any]:
    return {
        "confidence_threshold": policy.confidence_threshold,
        "coverage": policy.coverage,
        "accepted_accuracy": policy.accepted_accuracy,
        "accepted_target_recall": policy.accepted_target_recall,
        "target_met": policy.target_met,
        "max_error": policy.max_error,
        "confidence": policy.confidence,
        "accepted_error_upper": policy.accepted_error_upper,
        "accepted_recall_lower": policy.accepted_recall_lower,
    }


def run_evaluation(
    config: Config,
    train_dir: str | Path,
    out_dir: str | Path,
    project_dir: str | Path,
    balance_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate every architecture and candidate on the OOF predictions, log all to MLflow, rank.

    Args:
        config: Uses ``data.classes``, ``train.architectures``, ``evaluate``, ``referral`` and ``tracking``.
        train_dir: The train stage's output (``runs.json``, ``<candidate>/oof.csv``, ``<arch>/gradcam/``).
        out_dir: Output folder: ``metrics/<model>.json`` (the headline figures, DVC metrics),
            ``reports/<model>.json`` (every figure), ``comparison.json``, ``comparison.md``, ``plots/``
            (confusion, ROC/PR, reliability, risk-coverage, Grad-CAM, comparison bars) and
            ``referral/<model>.json`` (the calibrated referral rule).
        project_dir: Base folder for a relative tracking URI.
        balance_dir: The balance stage's output: its gate decision goes into ``comparison.json`` and its report
            (``ablation.md``: the GANs' quality, the ablation, the decision) into ``comparison.md``. None: neither.

    Returns:
        The comparison: ranking, winner and every model's metrics.
    """
    train_dir = Path(train_dir)
    runs, archs = _read_runs(config, train_dir)
    setup_mlflow(config.tracking, project_dir)
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "train", "evaluate", "referral", "tracking"))
        for folder in ("plots", REPORTS_DIR, METRICS_DIR, REFERRAL_DIR):
            (tmp / folder).mkdir()
        baseline = BASELINE if isinstance(runs.get("baseline"), dict) else None
        candidates = list(runs.get("candidates") or {})
        names = [*([baseline] if baseline is not None else []), *archs, *candidates]
        latency = dict(runs.get("latency_ms") or {})
        scores = {name: _score_model(name, config, train_dir, tmp, latency.get(name)) for name in names}
        ranking = rank_architectures({a: scores[a] for a in archs}, config.train.architectures)
        _plot_comparison(scores, config.evaluate.confidence_level, tmp / "plots" / "comparison.png")
        comparison = _comparison(config, runs, archs, candidates, baseline, scores, ranking)
        balance_report = _balance_report(comparison, balance_dir)
        write_json(tmp / COMPARISON_FILE, comparison)
        markdown = comparison_markdown(
            scores,
            ranking,
            candidates,
            config.data.classes,
            config.evaluate.confidence_level,
            config.referral.target_class,
            init=comparison["init"],
            baseline=baseline,
        )
        (tmp / COMPARISON_MD_FILE).write_text(markdown + balance_report, encoding="utf-8")
        for name, s in scores.items():
            write_json(tmp / METRICS_DIR / f"{name}.json", headline_metrics(s, config.referral.target_class))
        fault_point("evaluate")
        for arch in archs:
            _log_to_run(runs["architectures"][arch]["run_id"], arch, scores[arch], ranking, tmp)
            if baseline is not None:
                MlflowClient().set_tag(
                    runs["architectures"][arch]["run_id"],
                    "bonetumor.beats_baseline",
                    str(comparison["beats_baseline"][arch]),
                )
        if baseline is not None:
            _log_to_run(runs["baseline"]["run_id"], baseline, scores[baseline], ranking, tmp)
    log.info("winner: %s (ranking %s)", ranking[0], ranking)
    return comparison


def _read_runs(config: Config, train_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """Read runs.json and return it with the architectures it holds, in ``train.architectures`` order.

    Raises:
        ArtifactError: The file is missing or malformed, or holds none of the configured architectures.
    """
    runs = read_json(train_dir / RUNS_FILE, "training runs file")
    if not isinstance(runs, dict) or not isinstance(runs.get("architectures"), dict):
        raise ArtifactError(f"{train_dir / RUNS_FILE}: no 'architectures' mapping; rerun `bonetumor train`")
    archs = [a for a in config.train.architectures if a in runs["architectures"]]
    if not archs:
        raise ArtifactError(
            f"{train_dir / RUNS_FILE} lists none of {list(config.train.architectures)}; rerun `bonetumor train`"
        )
    return runs, archs


def _score_model(name: str, config: Config, train_dir: Path, out: Path, latency: float | None) -> dict[str, Any]:
    """Score one model's out-of-fold file, write its report, copy its Grad-CAM galleries into the plots."""
    plots = out / "plots"
    scores = _evaluate_model(
        name, read_oof(train_dir / name / "oof.csv", config.data.classes), config, plots, out / REFERRAL_DIR
    )
    scores["cpu_ms_per_tile"] = latency
    write_json(out / REPORTS_DIR / f"{name}.json", scores)
    for gallery in sorted((train_dir / name / "gradcam").glob("*.png")):
        shutil.copy2(gallery, plots / f"{name}_gradcam_{gallery.name}")
    log.info(
        "%s: accuracy=%.3f macro-F1=%.3f per-fold macro-F1=%s ECE %.3f -> %.3f, referral coverage %.2f",
        name,
        scores["accuracy"],
        scores["f1_macro"],
        _ci(scores["fold_summary"].get("f1_macro")),
        scores["calibration"]["ece_before"],
        scores["calibration"]["ece_after"],
        scores["referral"]["coverage"],
    )
    return scores


def _plot_comparison(scores: dict[str, dict[str, Any]], level: float, out_png: Path) -> None:
    """Bars of every model's per-fold means with their confidence intervals."""
    metrics = ["accuracy", "f1_macro", "f1_weighted"]
    rows = {}
    for name, s in scores.items():
        summary = s["fold_summary"]
        rows[name] = {m: summary.get(m, {}).get("mean") for m in metrics} | {
            f"{m}_ci_{side}": summary.get(m, {}).get(f"ci_{side}") for m in metrics for side in ("low", "high")
        }
    plot_comparison(rows, metrics, f"Per-fold means with {level:.0%} CI", out_png)


def _comparison(
    config: Config,
    runs: dict[str, Any],
    archs: list[str],
    candidates: list[str],
    baseline: str | None,
    scores: dict[str, dict[str, Any]],
    ranking: list[str],
) -> dict[str, Any]:
    """Return comparison.json: the runs scored, ranking, winner, baseline bar, who beats it, every score."""
    bar = None if baseline is None else scores[baseline]["fold_f1_macro_mean"]
    beats = {} if bar is None else {n: scores[n]["fold_f1_macro_mean"] > bar for n in [*archs, *candidates]}
    return {
        # The training runs these scores come from: register refuses a comparison of other runs.
        "cv_run_ids": {arch: runs["architectures"][arch]["run_id"] for arch in archs},
        "ranking": ranking,
        "candidates": candidates,
        "winner": ranking[0],
        "selection": "fold_f1_macro_mean, then accuracy",
        "init": {arch: str(runs["architectures"][arch].get("init", "unknown")) for arch in archs},
        "baseline": None
        if baseline is None
        else {
            "name": baseline,
            "what": describe_baseline(config.baseline),
            "fold_f1_macro_mean": scores[baseline]["fold_f1_macro_mean"],
            "accuracy": scores[baseline]["accuracy"],
            "f1_macro": scores[baseline]["f1_macro"],
        },
        "beats_baseline": beats,
        "scores": scores,
    }


def _log_to_run(run_id: str, arch: str, scores: dict[str, Any], ranking: list[str], out: Path) -> None:
    """Add the evaluation to the finished cross-validation run ``run_id``, without reopening it.

    Through the client, not ``mlflow.start_run(run_id=...)``: reopening marks the run RUNNING again, and an
    evaluation killed meanwhile would leave a finished run looking stuck.
    """
    require_run(run_id, f"{arch} cross-validation run")
    client = MlflowClient()
    flat = {k: v for k, v in _scalar_figures(scores).items() if v is not None}
    for name, values in scores["per_class"].items():
        flat.update({f"{name}_{m}": values[m] for m in ("precision", "recall", "f1")})
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"oof_{k}", float(v), now, 0) for k, v in flat.items()])
    client.set_tag(run_id, "bonetumor.rank", str(ranking.index(arch) + 1) if arch in ranking else "baseline")
    for plot in sorted((out / "plots").glob(f"{arch}_*.png")):
        client.log_artifact(run_id, str(plot), "evaluation")
    client.log_artifact(run_id, str(out / "plots" / "comparison.png"), "evaluation")
    client.log_artifact(run_id, str(out / REPORTS_DIR / f"{arch}.json"), "evaluation")
    client.log_artifact(run_id, str(out / REFERRAL_DIR / f"{arch}.json"), "evaluation/referral")
    client.log_artifact(run_id, str(out / COMPARISON_MD_FILE), "evaluation")
