import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from bonetumor.evaluation.metrics import macro_f1
from bonetumor.evaluation.stats import bootstrap_ci, fold_summary, summarise_folds


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def test_fold_summary_matches_scipy_t_interval() -> None:
    values = [0.81, 0.74, 0.9, 0.68, 0.77]
    summary = fold_summary(values, level=0.9)
    low, high = scipy_stats.t.interval(0.9, df=4, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert summary["n"] == 5
    assert summary["n_dropped"] == 0
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["ci_low"] == pytest.approx(low)
    assert summary["ci_high"] == pytest.approx(high)
    wider = fold_summary(values, level=0.99)
    assert wider["ci_high"] - wider["ci_low"] > high - low


def test_fold_summary_single_fold_has_no_spread() -> None:
    summary = fold_summary([0.8])
    assert summary["mean"] == 0.8
    assert summary["std"] is None
    assert summary["ci_low"] is None
    assert summary["ci_high"] is None


def test_fold_summary_drops_and_counts_nan() -> None:
    summary = fold_summary([0.8, math.nan, 0.6, None])
    assert summary["n"] == 2
    assert summary["n_dropped"] == 2
    assert summary["mean"] == pytest.approx(0.7)
    assert fold_summary([math.nan])["mean"] is None


def test_fold_summary_zero_spread_gives_point_interval() -> None:
    summary = fold_summary([0.5, 0.5, 0.5])
    assert (summary["ci_low"], summary["ci_high"]) == (0.5, 0.5)


def test_fold_summary_rejects_bad_level() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        fold_summary([0.1, 0.2], level=95)


def test_summarise_folds_covers_every_metric_and_counts_missing() -> None:
    per_fold = [{"f1": 0.8, "accuracy": 0.9}, {"f1": 0.6, "accuracy": 0.7}, {"f1": 0.7}]
    summary = summarise_folds(per_fold, level=0.95)
    assert list(summary) == ["f1", "accuracy"]
    assert summary["f1"]["n"] == 3
    assert summary["f1"]["mean"] == pytest.approx(0.7)
    assert summary["accuracy"]["n"] == 2
    assert summary["accuracy"]["n_dropped"] == 1


def test_bootstrap_ci_contains_point_estimate_and_repeats_with_seed() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    preds = np.where(rng.random(300) < 0.8, labels, rng.integers(0, 3, 300))
    point = macro_f1(labels, preds)
    low, high = bootstrap_ci(labels, preds, macro_f1, level=0.95, n_boot=200, seed=1)
    assert low < point < high
    assert high - low < 0.2
    assert bootstrap_ci(labels, preds, macro_f1, level=0.95, n_boot=200, seed=1) == (low, high)


def test_grouped_bootstrap_is_wider_on_clustered_errors() -> None:
    # 10 slides of 30 tiles; a slide is either all right or all wrong: only 10 independent outcomes, not 300.
    groups = np.repeat(np.arange(10), 30)
    labels = np.zeros(300, dtype=int)
    preds = np.where(groups < 6, 0, 1)
    point = accuracy(labels, preds)
    tile_low, tile_high = bootstrap_ci(labels, preds, accuracy, 0.95, n_boot=400, seed=0)
    slide_low, slide_high = bootstrap_ci(labels, preds, accuracy, 0.95, n_boot=400, seed=0, groups=groups)
    assert tile_low <= point <= tile_high
    assert slide_low <= point <= slide_high
    assert slide_high - slide_low > 2 * (tile_high - tile_low)


def test_bootstrap_ci_rejects_mismatched_lengths_and_handles_empty() -> None:
    with pytest.raises(ValueError, match="labels"):
        bootstrap_ci([0, 1], [0], accuracy)
    with pytest.raises(ValueError, match="group ids"):
        bootstrap_ci([0, 1], [0, 1], accuracy, groups=["a"])
    low, high = bootstrap_ci([], [], accuracy)
    assert math.isnan(low)
    assert math.isnan(high)
