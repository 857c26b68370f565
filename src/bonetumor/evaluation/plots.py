"""Evaluation figures and tables: confusion matrices, ROC/PR curves, per-class reports, model comparisons.

Comparisons are grouped bar charts with confidence-interval error bars.

Every figure is drawn with matplotlib's object API (:class:`~matplotlib.figure.Figure`), never pyplot, so no
global figure state leaks between calls or threads and no display backend is needed. Numbers come from
scikit-learn; the functions here only arrange and draw them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)


def normalise_rows(matrix: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Divide each row of a confusion matrix by its sum (row ``i`` then holds the rates of true class ``i``).

    The diagonal becomes the recall of each class. A row without any tile (a class absent from the labels) stays
    all zero instead of dividing by zero.

    Args:
        matrix: Square counts, ``matrix[i][j]`` = tiles of true class i predicted as class j.

    Returns:
        A float array of the same shape.

    Raises:
        ValueError: The matrix is not square or has negative entries.
    """
    counts = np.asarray(matrix, dtype=float)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {counts.shape}")
    if (counts < 0).any():
        raise ValueError("confusion matrix holds negative counts; expected counts >= 0")
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def plot_confusion(
    matrix: Sequence[Sequence[int]] | np.ndarray, classes: Sequence[str], title: str, out_png: str | Path
) -> Path:
    """Draw a confusion matrix as counts and as row-normalised rates (recall on the diagonal), cells annotated.

    Args:
        matrix: ``matrix[i][j]`` counts tiles of true class i predicted as class j.
        classes: Class names by index.
        title: Figure title.
        out_png: Where to write the PNG (its folder must exist).

    Returns:
        ``out_png`` as a Path.

    Raises:
        ValueError: The matrix is not square or does not have one row per class.
    """
    counts = np.asarray(matrix, dtype=float)
    rates = normalise_rows(counts)
    if counts.shape[0] != len(classes):
        raise ValueError(
            f"confusion matrix is {counts.shape[0]}x{counts.shape[1]} but there are {len(classes)} classes"
        )
    fig = Figure(figsize=(10, 4.2))
    for axis, data, fmt, label, vmax in zip(
        fig.subplots(1, 2),
        (counts, rates),
        ("{:.0f}", "{:.2f}"),
        ("counts", "row-normalised (recall on the diagonal)"),
        (max(float(counts.max(initial=0.0)), 1.0), 1.0),
        strict=True,
    ):
        # Rates share one fixed 0..1 scale so that figures of different models compare by colour.
        image = axis.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=axis, fraction=0.046)
        for i in range(len(classes)):
            for j in range(len(classes)):
                dark = data[i, j] > vmax / 2
                axis.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color="white" if dark else "black")
        axis.set_xticks(range(len(classes)), list(classes), rotation=20, fontsize=8)
        axis.set_yticks(range(len(classes)), list(classes), fontsize=8)
        axis.set(xlabel="predicted", ylabel="true", title=label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


def _label_indices(labels: Sequence[Any] | np.ndarray, classes: Sequence[str], what: str) -> np.ndarray:
    """Return labels as class indices; accepts indices or class names."""
    array = np.asarray(labels)
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() >= len(classes)):
            raise ValueError(f"{what}: class index out of range 0..{len(classes) - 1}")
        return array.astype(int)
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(v) for v in array.tolist()} - set(lookup))
    if unknown:
        raise ValueError(f"{what}: unknown class name(s) {unknown}; expected one of {list(classes)}")
    return np.array([lookup[str(v)] for v in array.tolist()], dtype=int)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def plot_roc_pr(
    probs: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    classes: Sequence[str],
    title: str,
    out_png: str | Path,
) -> dict[str, Any]:
    """Draw one-vs-rest ROC and precision-recall curves per class and return their areas.

    A class with no tile in ``labels`` has neither a ROC curve nor an average precision (no positives), and a class
    that every tile belongs to has no ROC curve (no negatives): those areas are None and the class is left out of
    the macro averages and of the plot.

    Args:
        probs: ``(n, len(classes))`` predicted probabilities (or any score that ranks tiles per class).
        labels: ``n`` true labels, as class indices or class names.
        classes: Class names by index.
        title: Figure title.
        out_png: Where to write the PNG (its folder must exist).

    Returns:
        ``{"roc_auc": {class: auc | None}, "average_precision": {class: ap | None}, "roc_auc_macro": float | None,
        "average_precision_macro": float | None}``; macro values average the classes that have a value.

    Raises:
        ValueError: ``probs`` is not ``(n, len(classes))``, holds non-finite values, or ``labels`` do not match.
    """
    scores = np.asarray(probs, dtype=float)
    y = _label_indices(labels, classes, "labels")
    if scores.ndim != 2 or scores.shape != (y.size, len(classes)):
        raise ValueError(f"probs has shape {scores.shape}; expected ({y.size}, {len(classes)}) to match labels/classes")
    if not np.isfinite(scores).all():
        raise ValueError("probs holds NaN or infinite values; expected finite probabilities")
    roc_auc: dict[str, float | None] = {}
    average_precision: dict[str, float | None] = {}
    fig = Figure(figsize=(11, 4.6))
    roc_axis, pr_axis = fig.subplots(1, 2)
    for i, name in enumerate(classes):
        positive = y == i
        n_pos = int(positive.sum())
        roc_auc[name] = None
        average_precision[name] = None
        if n_pos == 0:
            continue
        average_precision[name] = float(average_precision_score(positive, scores[:, i]))
        precision, recall, _ = precision_recall_curve(positive, scores[:, i])
        pr_axis.step(recall, precision, where="post", label=f"{name} (AP={average_precision[name]:.3f})")
        if n_pos < y.size:
            roc_auc[name] = float(roc_auc_score(positive, scores[:, i]))
            fpr, tpr, _ = roc_curve(positive, scores[:, i])
            roc_axis.plot(fpr, tpr, label=f"{name} (AUC={roc_auc[name]:.3f})")
    roc_axis.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=0.8, label="chance")
    roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one vs rest)")
    roc_axis.set(xlim=(0, 1), ylim=(0, 1.02))
    pr_axis.set(xlabel="recall", ylabel="precision", title="Precision-recall (one vs rest)")
    pr_axis.set(xlim=(0, 1), ylim=(0, 1.02))
    for axis in (roc_axis, pr_axis):
        axis.legend(loc="lower right" if axis is roc_axis else "lower left", fontsize=8)
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return {
        "roc_auc": roc_auc,
        "average_precision": average_precision,
        "roc_auc_macro": _mean_or_none(list(roc_auc.values())),
        "average_precision_macro": _mean_or_none(list(average_precision.values())),
    }


def per_class_report(
    labels: np.ndarray | Sequence[Any], preds: np.ndarray | Sequence[Any], classes: Sequence[str]
) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, their macro and weighted averages, and accuracy.

    Every class in ``classes`` is reported (scikit-learn's classification_report with ``zero_division=0``): a
    class without tiles and never predicted has zeros and support 0, and counts as 0 in the macro average. (This
    differs from :func:`bonetumor.evaluation.metrics.classification_metrics`, whose macro average skips such a class; on
    pooled out-of-fold predictions every class is present and both agree.)

    Args:
        labels: True labels, as class indices or names.
        preds: Predicted labels, as class indices or names.
        classes: Class names by index.

    Returns:
        ``{"per_class": {class: {"precision", "recall", "f1", "support"}}, "macro": {...}, "weighted": {...},
        "accuracy": float, "n": int}``, plain JSON types.

    Raises:
        ValueError: Labels and predictions differ in length or hold unknown classes.
    """
    y_true = _label_indices(labels, classes, "labels")
    y_pred = _label_indices(preds, classes, "predictions")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} labels but {y_pred.size} predictions; expected one prediction per label")
    raw = classification_report(
        y_true,
        y_pred,
        labels=list(range(len(classes))),
        target_names=list(classes),
        zero_division=0,
        output_dict=True,
    )

    def entry(values: dict[str, float]) -> dict[str, Any]:
        return {
            "precision": float(values["precision"]),
            "recall": float(values["recall"]),
            "f1": float(values["f1-score"]),
            "support": int(values["support"]),
        }

    return {
        "per_class": {name: entry(raw[name]) for name in classes},
        "macro": entry(raw["macro avg"]),
        "weighted": entry(raw["weighted avg"]),
        "accuracy": float(accuracy_score(y_true, y_pred)) if y_true.size else float("nan"),
        "n": int(y_true.size),
    }


def report_markdown(report: dict[str, Any], classes: Sequence[str]) -> str:
    """Render :func:`per_class_report` output as a markdown table (one row per class, then the averages)."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    rows = [(name, report["per_class"][name]) for name in classes]
    rows += [("**macro avg**", report["macro"]), ("**weighted avg**", report["weighted"])]
    for name, values in rows:
        lines.append(
            f"| {name} | {values['precision']:.3f} | {values['recall']:.3f} | {values['f1']:.3f} | "
            f"{values['support']} |"
        )
    lines.append("")
    lines.append(f"Accuracy: {report['accuracy']:.3f} (n={report['n']})")
    return "\n".join(lines) + "\n"


def plot_comparison(
    scores: Mapping[str, Mapping[str, float | None]], metrics: Sequence[str], title: str, out_png: str | Path
) -> Path:
    """Draw grouped bars (one group per metric, one bar per model) with confidence-interval error bars.

    Args:
        scores: ``{model: {metric: mean, metric + "_ci_low": low, metric + "_ci_high": high}}``; a missing or None
            bound draws the bar without an error bar, a missing or None mean leaves the bar out.
        metrics: The metric names to draw, in order.
        title: Figure title.
        out_png: Where to write the PNG (its folder must exist).

    Returns:
        ``out_png`` as a Path.

    Raises:
        ValueError: No model or no metric is given.
    """
    if not scores or not metrics:
        raise ValueError(f"nothing to compare: {len(scores)} model(s), {len(metrics)} metric(s); expected >= 1 of each")
    models = list(scores)
    width = 0.8 / len(models)
    x = np.arange(len(metrics))
    top, bottom = 1.0, 0.0
    fig = Figure(figsize=(max(6.0, 1.6 * len(metrics) * max(1, len(models)) / 2 + 2), 4.4))
    axis = fig.subplots()
    for k, model in enumerate(models):
        values = scores[model]
        means, lower, upper, has_ci = [], [], [], []
        for metric in metrics:
            mean = values.get(metric)
            low, high = values.get(f"{metric}_ci_low"), values.get(f"{metric}_ci_high")
            means.append(np.nan if mean is None else float(mean))
            # A bar without both bounds gets no error bar (a zero-width one would read as certainty).
            if mean is not None and low is not None and high is not None:
                lower.append(max(float(mean) - float(low), 0.0))
                upper.append(max(float(high) - float(mean), 0.0))
                has_ci.append(True)
            else:
                lower.append(0.0)
                upper.append(0.0)
                has_ci.append(False)
        mean_arr, low_arr, high_arr = np.array(means), np.array(lower), np.array(upper)
        shown = ~np.isnan(mean_arr)
        top = max(top, float(np.max(mean_arr + high_arr, initial=top, where=shown)))
        bottom = min(bottom, float(np.min(mean_arr - low_arr, initial=bottom, where=shown)))
        positions = x - 0.4 + width * (k + 0.5)
        bars = axis.bar(positions, mean_arr, width, label=model)
        axis.bar_label(
            bars,
            labels=[f"{m:.3f}" if ok else "" for m, ok in zip(means, shown, strict=True)],
            label_type="center",  # inside the bar, clear of the error bar
            fontsize=7,
        )
        ci = np.array(has_ci)
        if ci.any():
            axis.errorbar(
                positions[ci], mean_arr[ci], yerr=[low_arr[ci], high_arr[ci]], fmt="none", ecolor="black", capsize=3
            )
    axis.set_xticks(x, list(metrics), fontsize=9)
    axis.set(ylabel="score", title=title)
    # Scores in [0, 1] share one fixed axis across figures; a quantity outside it (a loss, kappa) widens it.
    axis.set_ylim(bottom * 1.1, top * 1.1)
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)
