"""Uncertainty of evaluation metrics: Student-t intervals over folds and (grouped) bootstrap intervals.

Two sources of uncertainty are covered. Over cross-validation folds, each fold's metric is one draw of held-out
slides, so the mean over folds gets a Student-t interval with ``n_folds - 1`` degrees of freedom. Over pooled
predictions, the bootstrap resamples the units that are independent: tiles of one slide share its staining,
cutting and tumour, so when slide (or case) ids are given the bootstrap resamples whole slides; resampling
single tiles would treat correlated tiles as independent and give intervals that are too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy import stats as scipy_stats


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level {level} must lie strictly between 0 and 1 (e.g. 0.95)")


#: The range of every metric these intervals are computed for (accuracy, F1, precision, recall).
UNIT_INTERVAL: tuple[float, float] = (0.0, 1.0)


def fold_summary(
    values: Sequence[float | None], level: float = 0.95, bounds: tuple[float, float] | None = UNIT_INTERVAL
) -> dict[str, Any]:
    """Mean, sample standard deviation and Student-t confidence interval of a metric over folds.

    NaN (or None) values, such as a metric undefined on a fold, are dropped and counted in ``n_dropped``.

    Args:
        values: The metric on each fold.
        level: Confidence level of the interval, in (0, 1).
        bounds: The range the metric lives in; the interval is clipped to it (a t interval over 3 folds easily
            reaches past 1 otherwise, which no accuracy can). None: no clipping.

    Returns:
        ``{"n", "n_dropped", "mean", "std", "ci_low", "ci_high", "level"}``. ``std`` uses ``ddof=1``; with one
        value ``std`` and the interval are None, with none ``mean`` is None too. Zero spread gives a zero-width
        interval at the mean.

    Raises:
        ValueError: ``level`` is not in (0, 1).
    """
    _check_level(level)
    raw = [math.nan if v is None else float(v) for v in values]
    kept = np.array([v for v in raw if not math.isnan(v)], dtype=float)
    n = int(kept.size)
    summary: dict[str, Any] = {
        "n": n,
        "n_dropped": len(raw) - n,
        "mean": float(kept.mean()) if n else None,
        "std": None,
        "ci_low": None,
        "ci_high": None,
        "level": level,
    }
    if n >= 2:
        std = float(kept.std(ddof=1))
        half = float(scipy_stats.t.ppf((1 + level) / 2, df=n - 1)) * std / math.sqrt(n)
        low, high = summary["mean"] - half, summary["mean"] + half
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
        summary.update(std=std, ci_low=low, ci_high=high)
    return summary


def summarise_folds(per_fold: Sequence[dict[str, float]], level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Apply :func:`fold_summary` to every metric named in the per-fold dicts.

    Args:
        per_fold: One ``{metric: value}`` dict per fold. A metric missing from a fold counts as NaN there
            (dropped and counted).
        level: Confidence level of the intervals.

    Returns:
        ``{metric: fold_summary}``, metrics in first-seen order.
    """
    names: dict[str, None] = {}
    for fold in per_fold:
        names.update(dict.fromkeys(fold))
    return {name: fold_summary([fold.get(name, math.nan) for fold in per_fold], level) for name in names}


def bootstrap_ci(
    labels: Sequence[Any] | np.ndarray,
    preds: Sequence[Any] | np.ndarray,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric_fn(labels, preds)``.

    Args:
        labels: True labels (any type ``metric_fn`` accepts).
        preds: Predictions, one per label.
        metric_fn: ``metric_fn(labels_sample, preds_sample) -> float`` (for example
            :func:`bonetumor.evaluation.metrics.macro_f1`).
        level: Confidence level, in (0, 1).
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling.
        groups: Optional group id per tile (slide or case). When given, whole groups are resampled with
            replacement (a cluster bootstrap), because tiles of one slide are correlated.

    Returns:
        ``(low, high)``; NaN for both when no resample gives a finite metric (for example no tiles).

    Raises:
        ValueError: Lengths differ, ``n_boot < 1`` or ``level`` is not in (0, 1).
    """
    _check_level(level)
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot}; expected at least 1 bootstrap resample")
    y_true, y_pred = np.asarray(labels), np.asarray(preds)
    if y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(f"{y_true.shape[0]} labels but {y_pred.shape[0]} predictions; expected one per label")
    if y_true.shape[0] == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    if groups is None:
        members = None
    else:
        group_ids = np.asarray(groups)
        if group_ids.shape[0] != y_true.shape[0]:
            raise ValueError(f"{group_ids.shape[0]} group ids but {y_true.shape[0]} labels; expected one per tile")
        _, inverse = np.unique(group_ids, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]
    n_tiles = int(y_true.shape[0])
    estimates = np.empty(n_boot)
    for b in range(n_boot):
        if members is None:
            index = rng.integers(0, n_tiles, size=n_tiles)
        else:
            chosen = rng.integers(0, len(members), size=len(members))
            index = np.concatenate([members[g] for g in chosen])
        estimates[b] = float(metric_fn(y_true[index], y_pred[index]))
    finite = estimates[np.isfinite(estimates)]
    if finite.size == 0:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    low, high = np.quantile(finite, [alpha, 1 - alpha])
    return float(low), float(high)
