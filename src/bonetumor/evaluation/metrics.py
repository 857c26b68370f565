"""Classification metrics, as pure functions over label indices (scikit-learn underneath).

Macro averages run over the classes present in ``y_true`` or ``y_pred``: on a small validation fold that holds
no tile of a class (and never predicts it), that class has no defined precision or recall, and counting it as 0
would punish the model for the split, not for its predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


def _present(y_true: np.ndarray, y_pred: np.ndarray) -> list[int]:
    return sorted(set(np.asarray(y_true).tolist()) | set(np.asarray(y_pred).tolist()))


def macro_f1(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Macro-averaged F1 over the classes present in either labels or predictions."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.size == 0:
        return float("nan")
    _, _, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=_present(y_true, y_pred), average="macro", zero_division=0
    )
    return float(f1)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro and weighted precision/recall/F1, per-class precision/recall/F1/support, confusion matrix.

    Args:
        y_true: True class indices.
        y_pred: Predicted class indices.
        classes: Class names by index.

    Returns:
        A JSON-serialisable dict. ``confusion_matrix[i][j]`` counts tiles of class i predicted as class j.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = _present(y_true, y_pred)
    result: dict[str, Any] = {"n": int(y_true.size), "accuracy": float(accuracy_score(y_true, y_pred))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=average, zero_division=0)
        result[f"precision_{average}"] = float(p)
        result[f"recall_{average}"] = float(r)
        result[f"f1_{average}"] = float(f)
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), average=None, zero_division=0
    )
    result["per_class"] = {
        name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(classes)
    }
    result["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=list(range(len(classes)))).tolist()
    return result
