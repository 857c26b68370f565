"""Calibration and referral: temperature scaling, reliability/ECE, the referral rule and risk-coverage.

A classifier that is right 90 % of the time is only useful to a pathologist if it also says *which* calls to
check. This module turns out-of-fold (OOF) logits into such a rule:

1. **Temperature scaling** (Guo et al., 2017): one scalar ``T > 0`` divides every logit so that the softmax
   confidences match the observed accuracy. It is fitted on OOF logits (tiles no fold's model trained on) by
   minimising the negative log-likelihood. It never changes the predicted class.
2. **Referral rule** on *calibrated* probabilities ``p`` of one tile, with confidence ``c = max_k p_k`` and
   predicted class ``argmax_k p_k``. A tile is **referred** to a pathologist when

   * ``c <= confidence_threshold`` (low confidence; a tile is accepted only when ``c`` is strictly above the
     threshold, so threshold 0 accepts every tile and threshold 1 refers every tile), or
   * the predicted class is ``safe_class`` and ``p[target_class] > max_target_prob_when_safe`` (a Non-Tumor call
     with a real chance of viable tumour).

   Every other tile is **accepted** (the model's call stands).
3. The threshold is chosen on the OOF predictions by :func:`choose_referral`: the lowest one at which the
   accepted tiles meet two targets *with a conservative bound*, not the point estimate. The Clopper-Pearson upper
   bound (one-sided, at ``referral.confidence``) of their error rate must not exceed ``max_error``, and the
   Clopper-Pearson lower bound of the recall of ``target_class`` among them must reach ``target_recall``. A few
   dozen OOF tiles cannot vouch for a 5 % error rate (zero errors in 58 tiles still leave an upper bound above
   5 % at 95 %), and the rule then says so by referring every tile. So does a constant predictor.

Labels are class indices (``0 .. len(classes) - 1``) throughout; :func:`oof_arrays` reads them, with the logits,
from a training stage's ``oof.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as _scipy_softmax
from scipy.stats import beta

from bonetumor.config import ReferralConfig
from bonetumor.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

#: Search range of the temperature. Outside it the fit is degenerate (perfectly separated or random logits).
TEMPERATURE_BOUNDS: tuple[float, float] = (0.01, 100.0)
#: How far a row of probabilities may sum away from 1 (float32 softmax outputs) before it is taken for logits.
_PROB_SUM_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


def _as_matrix(values: np.ndarray, what: str, n_classes: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (tiles x classes), got shape {array.shape}")
    if array.shape[1] < 2:
        raise ValueError(f"{what}: expected at least 2 class columns, got shape {array.shape}")
    if n_classes is not None and array.shape[1] != n_classes:
        raise ValueError(f"{what}: expected {n_classes} class columns, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return array


def _as_probs(values: np.ndarray, what: str, n_classes: int | None = None) -> np.ndarray:
    probs = _as_matrix(values, what, n_classes)
    if probs.size:
        sums = probs.sum(axis=1)
        if probs.min() < 0 or np.abs(sums - 1.0).max() > _PROB_SUM_TOLERANCE:
            raise ValueError(
                f"{what}: expected probabilities (non-negative rows summing to 1), got values in "
                f"[{probs.min():.3g}, {probs.max():.3g}] and row sums in [{sums.min():.4g}, {sums.max():.4g}]; "
                "for logits use softmax() or ReferralPolicy.calibrated_probs() first"
            )
    return probs


def _as_labels(labels: np.ndarray, n_rows: int, n_classes: int, what: str = "labels") -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n_rows:
        raise ValueError(f"{what}: expected a 1-D array of {n_rows} class indices, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what}: expected integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(f"{what}: class indices must lie in [0, {n_classes - 1}], got [{array.min()}, {array.max()}]")
    return array


# ---------------------------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Return ``softmax(logits / temperature)`` row by row, computed stably (max subtracted first).

    Args:
        logits: Array of shape ``(n, k)`` (or ``(k,)`` for one tile).
        temperature: The temperature ``T > 0``; ``T > 1`` softens over-confident outputs.

    Returns:
        Probabilities of the same shape, in float64.

    Raises:
        ValueError: ``temperature`` is not a positive finite number.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    return np.asarray(_scipy_softmax(scaled, axis=-1))


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    log_probs = log_softmax(logits / temperature, axis=1)
    return float(-log_probs[np.arange(labels.size), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the temperature that minimises the negative log-likelihood of ``softmax(logits / T)``.

    The NLL is convex in ``1 / T``, so a bounded scalar search over ``log T`` within :data:`TEMPERATURE_BOUNDS`
    finds the global minimum. With one tile, or logits that separate the classes perfectly, the NLL keeps
    falling as ``T`` shrinks; the fit then stops at the lower bound and logs a warning rather than failing.
    Whether to calibrate at all (``referral.calibrate``) is the caller's decision.

    Args:
        logits: Out-of-fold logits, shape ``(n, k)``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        The fitted temperature (1.0 when it fits no better than no scaling).

    Raises:
        ValueError: The arrays are empty, mis-shaped or hold non-finite values.
    """
    logits = _as_matrix(logits, "logits")
    labels = _as_labels(labels, logits.shape[0], logits.shape[1])
    if labels.size == 0:
        raise ValueError("logits: no tiles to fit a temperature on")
    low, high = TEMPERATURE_BOUNDS
    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(low), math.log(high)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = math.exp(float(result.x))
    # Guard against a failed search: never return a temperature that fits worse than leaving the logits alone.
    if _nll(logits, labels, temperature) > _nll(logits, labels, 1.0):
        return 1.0
    if temperature_at_bound(temperature):
        log.warning(
            "temperature fit stopped at its bound T=%.3g (%d tiles): the logits separate the classes perfectly "
            "or carry no signal, so the calibration is unreliable",
            temperature,
            labels.size,
        )
    return temperature


def temperature_at_bound(temperature: float) -> bool:
    """Whether a fitted temperature stopped at (within 1 % of) a bound of :data:`TEMPERATURE_BOUNDS`.

    At the upper bound the logits carry no signal (the calibrated probabilities are near uniform); at the lower
    bound they separate the OOF tiles perfectly. Either way the calibration is unreliable, and reports say so.
    """
    low, high = TEMPERATURE_BOUNDS
    return temperature <= low * 1.01 or temperature >= high / 1.01


# ---------------------------------------------------------------------------------------------------------------
# Conservative bounds of binomial proportions
# ---------------------------------------------------------------------------------------------------------------


def clopper_pearson_upper(failures: np.ndarray, trials: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound of a proportion (1 where there are no trials).

    ``P(rate <= bound) >= confidence`` for ``failures`` out of ``trials``: the ``confidence`` quantile of
    Beta(failures + 1, trials - failures); 1 when every trial failed.
    """
    k, n = np.asarray(failures, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = np.asarray(beta.ppf(confidence, k + 1.0, np.maximum(n - k, 1e-300)), dtype=np.float64)
    return np.where((n <= 0) | (k >= n), 1.0, bound)


def clopper_pearson_lower(successes: np.ndarray, trials: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a proportion (NaN where there are no trials, 0 with no success)."""
    k, n = np.asarray(successes, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = np.asarray(beta.ppf(1.0 - confidence, np.maximum(k, 1e-300), n - k + 1.0), dtype=np.float64)
    return np.where(n <= 0, np.nan, np.where(k <= 0, 0.0, bound))


# ---------------------------------------------------------------------------------------------------------------
# Reliability and expected calibration error
# ---------------------------------------------------------------------------------------------------------------


def reliability_table(probs: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """Bin the top-label confidences into ``bins`` equal-width bins over [0, 1].

    Bin ``b`` holds confidences in ``(b / bins, (b + 1) / bins]`` (the first bin also holds 0).

    Args:
        probs: Probabilities, shape ``(n, k)``.
        labels: True class indices, shape ``(n,)``.
        bins: Number of bins (>= 1).

    Returns:
        ``edges`` (``bins + 1``), and per bin ``count``, ``accuracy`` and mean ``confidence`` (NaN for empty bins).

    Raises:
        ValueError: Mis-shaped inputs or ``bins < 1``.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    probs = _as_probs(probs, "probs")
    labels = _as_labels(labels, probs.shape[0], probs.shape[1])
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(index, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / count
    return {"edges": edges, "count": count, "accuracy": accuracy, "confidence": mean_confidence}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """Top-label expected calibration error over equal-width confidence bins.

    ``ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|`` over the bins of :func:`reliability_table`.

    Args:
        probs: Probabilities, shape ``(n, k)``.
        labels: True class indices, shape ``(n,)``.
        bins: Number of bins (``evaluate.calibration_bins``).

    Returns:
        The ECE in [0, 1]; NaN when there are no tiles.
    """
    table = reliability_table(probs, labels, bins)
    total = int(table["count"].sum())
    if total == 0:
        return float("nan")
    used = table["count"] > 0
    gaps = np.abs(table["accuracy"][used] - table["confidence"][used])
    return float((table["count"][used] * gaps).sum() / total)


def reliability_diagram(
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    labels: np.ndarray,
    bins: int,
    title: str,
    out_png: str | Path,
) -> Path:
    """Draw accuracy against confidence per bin, before and after temperature scaling, side by side.

    Each panel shows the accuracy per bin (bars), the gap to the bin's mean confidence (red), the diagonal of
    perfect calibration, the number of tiles above each bar, and the ECE in the legend.

    Args:
        probs_before: Uncalibrated probabilities (``softmax(logits)``), shape ``(n, k)``.
        probs_after: Calibrated probabilities (``softmax(logits / T)``), same shape.
        labels: True class indices, shape ``(n,)``.
        bins: Number of confidence bins.
        title: Figure title.
        out_png: Where to write the PNG.

    Returns:
        ``out_png`` as a Path.
    """
    # Imported here so that serving, which only needs the referral rule, does not load matplotlib.
    from matplotlib.figure import Figure

    ece_before = expected_calibration_error(probs_before, labels, bins)
    ece_after = expected_calibration_error(probs_after, labels, bins)
    fig = Figure(figsize=(10, 4.6))
    panels = (
        (probs_before, "before temperature scaling", f"accuracy (ECE {ece_before:.3f})"),
        (probs_after, "after temperature scaling", f"accuracy (ECE {ece_after:.3f}, before {ece_before:.3f})"),
    )
    for axis, (probs, name, label) in zip(fig.subplots(1, 2, sharey=True), panels, strict=True):
        table = reliability_table(probs, labels, bins)
        width = 1.0 / bins
        centres = table["edges"][:-1] + width / 2
        used = table["count"] > 0
        axis.bar(centres[used], table["accuracy"][used], width=width, color="tab:blue", edgecolor="black", label=label)
        axis.bar(
            centres[used],
            table["confidence"][used] - table["accuracy"][used],
            bottom=table["accuracy"][used],
            width=width,
            color="tab:red",
            alpha=0.3,
            edgecolor="tab:red",
            hatch="//",
            label="gap to mean confidence",
        )
        axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        for x, acc, conf, n in zip(
            centres[used], table["accuracy"][used], table["confidence"][used], table["count"][used], strict=True
        ):
            axis.text(x, max(acc, conf) + 0.01, str(int(n)), ha="center", va="bottom", fontsize=7)
        axis.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (top-label probability)", title=name)
        axis.legend(loc="upper left", fontsize=8)
    fig.axes[0].set_ylabel("accuracy (numbers: tiles per bin)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


# ---------------------------------------------------------------------------------------------------------------
# Referral policy
# ---------------------------------------------------------------------------------------------------------------

_FLOAT_OR_NAN_FIELDS = ("accepted_accuracy", "accepted_target_recall", "accepted_error_upper", "accepted_recall_lower")


@dataclasses.dataclass(frozen=True)
class ReferralPolicy:
    """When to refer a tile to a pathologist, chosen on out-of-fold predictions (see the module docstring).

    The decision methods take **calibrated** probabilities: pass raw logits through :meth:`calibrated_probs`
    first (it applies ``temperature``). Probabilities from a plain softmax of the logits are only the calibrated
    ones when ``temperature`` is 1.

    Attributes:
        classes: Class names in model output order.
        temperature: Temperature applied to the logits before the softmax (1.0 = not calibrated).
        confidence_threshold: A tile is accepted only when its top-label confidence is strictly above this.
        target_class: The class whose recall the policy protects.
        target_recall: The recall of ``target_class`` among accepted OOF tiles the policy aimed for.
        safe_class: Calls of this class are referred when P(``target_class``) > ``max_target_prob_when_safe``.
        max_target_prob_when_safe: See ``safe_class``.
        n_tiles: Number of OOF tiles the policy was chosen on.
        coverage: Share of those tiles the policy accepts.
        accepted_accuracy: Accuracy on the accepted OOF tiles (NaN when none is accepted).
        accepted_target_recall: Recall of ``target_class`` on the accepted OOF tiles (NaN when none of them is
            of ``target_class``).
        target_met: Whether the accepted OOF tiles met both targets by their conservative bounds
            (``accepted_error_upper <= max_error`` and ``accepted_recall_lower >= target_recall``); False for the
            fallback that refers every tile.
        max_error: The largest error rate the accepted tiles may have (``referral.max_error``).
        confidence: One-sided confidence level of both Clopper-Pearson bounds (``referral.confidence``).
        accepted_error_upper: Clopper-Pearson upper bound of the accepted OOF tiles' error rate (NaN when none).
        accepted_recall_lower: Clopper-Pearson lower bound of their ``target_class`` recall (NaN when undefined).
        temperature_at_bound: The temperature fit stopped at a bound of :data:`TEMPERATURE_BOUNDS`: the
            calibration is unreliable (see :func:`temperature_at_bound`).

    The last five fields have defaults, so that a rule written before they existed still loads (as a rule that
    made no error claim).
    """

    classes: tuple[str, ...]
    temperature: float
    confidence_threshold: float
    target_class: str
    target_recall: float
    safe_class: str
    max_target_prob_when_safe: float
    n_tiles: int
    coverage: float
    accepted_accuracy: float
    accepted_target_recall: float
    target_met: bool
    max_error: float = 1.0
    confidence: float = 0.95
    accepted_error_upper: float = float("nan")
    accepted_recall_lower: float = float("nan")
    temperature_at_bound: bool = False

    def __post_init__(self) -> None:
        classes = self.classes
        if not (isinstance(classes, tuple) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
            raise ValueError(f"classes: expected a tuple of at least 2 non-empty names, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes: names must be unique, got {list(classes)}")
        for name in ("target_class", "safe_class"):
            value = getattr(self, name)
            if value not in classes:
                raise ValueError(f"{name}: {value!r} is not one of the classes {list(classes)}")
        if self.target_class == self.safe_class:
            raise ValueError(f"safe_class: must differ from target_class {self.target_class!r}")
        for name in (
            "temperature",
            "confidence_threshold",
            "target_recall",
            "max_target_prob_when_safe",
            "coverage",
            "max_error",
            "confidence",
            *_FLOAT_OR_NAN_FIELDS,
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name}: expected a number, got {value!r}")
            if math.isnan(value) and name in _FLOAT_OR_NAN_FIELDS:
                continue
            if name == "temperature":
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"temperature: expected a positive finite number, got {value!r}")
            elif not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
        if isinstance(self.n_tiles, bool) or not isinstance(self.n_tiles, int) or self.n_tiles < 0:
            raise ValueError(f"n_tiles: expected a non-negative integer, got {self.n_tiles!r}")
        for name in ("target_met", "temperature_at_bound"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")

    @property
    def target_index(self) -> int:
        """Index of ``target_class`` in ``classes``."""
        return self.classes.index(self.target_class)

    @property
    def safe_index(self) -> int:
        """Index of ``safe_class`` in ``classes``."""
        return self.classes.index(self.safe_class)

    @property
    def refers_everything(self) -> bool:
        """True for the fallback policy that accepts no tile (threshold 1: no confidence is above it)."""
        return self.confidence_threshold >= 1.0

    def to_dict(self) -> dict[str, Any]:
        """Return the policy as JSON-serialisable data (NaN figures become ``None``)."""
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        for name in _FLOAT_OR_NAN_FIELDS:
            if math.isnan(data[name]):
                data[name] = None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "referral policy") -> ReferralPolicy:
        """Rebuild and validate a policy written by :meth:`to_dict`.

        Args:
            data: The mapping (for example read from ``referral_policy.json`` or model metadata).
            source: Where the mapping came from, for error messages.

        Returns:
            The policy.

        Raises:
            ArtifactError: ``data`` is not a mapping, lacks or adds fields, or a field has an invalid value; the
                message names the field.
        """
        if not isinstance(data, Mapping):
            raise ArtifactError(f"{source}: expected a mapping of policy fields, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        expected = [f.name for f in fields]
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        unknown = sorted(set(data) - set(expected))
        if missing or unknown:
            raise ArtifactError(
                f"{source}: missing field(s) {missing}, unknown field(s) {unknown}; expected exactly {expected}"
            )
        values = dict(data)
        if not isinstance(values["classes"], (list, tuple)):
            raise ArtifactError(f"{source}: classes: expected a list of class names, got {values['classes']!r}")
        values["classes"] = tuple(values["classes"])
        for name in _FLOAT_OR_NAN_FIELDS:
            if name in values and values[name] is None:
                values[name] = float("nan")
        try:
            return cls(**values)
        except ValueError as exc:
            raise ArtifactError(f"{source}: {exc}") from exc

    def calibrated_probs(self, logits: np.ndarray) -> np.ndarray:
        """Return ``softmax(logits / temperature)``: the probabilities the decision methods expect.

        Args:
            logits: Shape ``(n, k)`` or ``(k,)`` with ``k = len(classes)``.

        Raises:
            ValueError: The last dimension is not ``len(classes)``.
        """
        array = np.asarray(logits, dtype=np.float64)
        if array.ndim not in (1, 2) or array.shape[-1] != len(self.classes):
            raise ValueError(
                f"logits: expected shape (n, {len(self.classes)}) or ({len(self.classes)},), got {array.shape}"
            )
        return softmax(array, self.temperature)

    def decide_batch(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Apply the referral rule to many tiles.

        Args:
            probs: **Calibrated** probabilities, shape ``(n, len(classes))`` (see :meth:`calibrated_probs`).

        Returns:
            ``(confidence, refer, reasons)``: the top-label confidence per tile (float array), whether the tile is
            referred (bool array), and a human-readable reason per tile (``""`` when accepted; several reasons are
            joined with ``"; "``).

        Raises:
            ValueError: ``probs`` is mis-shaped or does not hold probabilities (for example, logits).
        """
        probs = _as_probs(probs, "probs", len(self.classes))
        confidence = probs.max(axis=1)
        predicted = probs.argmax(axis=1)
        target_prob = probs[:, self.target_index]
        low = confidence <= self.confidence_threshold
        unsafe = (predicted == self.safe_index) & (target_prob > self.max_target_prob_when_safe)
        refer = low | unsafe
        reasons = [
            self._reason(float(confidence[i]), float(target_prob[i]), bool(low[i]), bool(unsafe[i])) if refer[i] else ""
            for i in range(probs.shape[0])
        ]
        return confidence, refer, reasons

    def decide(self, probs_row: np.ndarray) -> tuple[float, bool, str]:
        """Apply the referral rule to one tile.

        Args:
            probs_row: **Calibrated** probabilities of one tile, shape ``(len(classes),)``.

        Returns:
            ``(confidence, refer, reason)``; ``reason`` is ``""`` when the call is accepted.

        Raises:
            ValueError: ``probs_row`` is mis-shaped or does not hold probabilities.
        """
        row = np.asarray(probs_row, dtype=np.float64)
        if row.ndim != 1:
            raise ValueError(f"probs_row: expected a 1-D array of {len(self.classes)} probabilities, got {row.shape}")
        confidence, refer, reasons = self.decide_batch(row[None, :])
        return float(confidence[0]), bool(refer[0]), reasons[0]

    def _reason(self, confidence: float, target_prob: float, low: bool, unsafe: bool) -> str:
        parts = []
        if low:
            if self.refers_everything and not self.target_met:
                parts.append(
                    f"every tile is referred: on the out-of-fold predictions no confidence threshold kept the "
                    f"error rate <= {self.max_error:g} and {self.target_class} recall >= {self.target_recall:g} "
                    f"(Clopper-Pearson bounds at {self.confidence:g})"
                )
            else:
                parts.append(
                    f"confidence {confidence:.3f} does not exceed the referral threshold "
                    f"{self.confidence_threshold:.3f}"
                )
        if unsafe:
            parts.append(
                f"{self.safe_class} call but P({self.target_class})={target_prob:.3f} exceeds "
                f"{self.max_target_prob_when_safe:g}"
            )
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Threshold sweep, selection, risk-coverage
# ---------------------------------------------------------------------------------------------------------------


def _sweep(
    probs: np.ndarray, labels: np.ndarray, eligible: np.ndarray, target_index: int | None
) -> dict[str, np.ndarray]:
    """Figures of every candidate threshold ``t`` (0 and each distinct confidence, ascending).

    A tile is accepted at ``t`` when it is ``eligible`` (not referred by a threshold-free rule) and its confidence
    is strictly above ``t``. O(n log n): accepted tiles are a suffix of the eligible tiles sorted by confidence.
    """
    confidence = probs.max(axis=1)
    predicted = probs.argmax(axis=1)
    thresholds = np.unique(np.concatenate([[0.0], confidence]))
    order = np.argsort(confidence[eligible], kind="stable")
    sorted_conf = confidence[eligible][order]
    start = np.searchsorted(sorted_conf, thresholds, side="right")

    def accepted_sum(indicator: np.ndarray) -> np.ndarray:
        cumulative = np.concatenate([[0.0], np.cumsum(indicator[eligible][order].astype(np.float64))])
        return np.asarray(cumulative[-1] - cumulative[start])

    n = labels.size
    accepted = accepted_sum(np.ones(n))
    correct = accepted_sum(predicted == labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = {
            "thresholds": thresholds,
            "accepted": accepted,
            "coverage": accepted / n if n else np.zeros_like(accepted),
            "accuracy": correct / accepted,
        }
        if target_index is not None:
            is_target = labels == target_index
            target_total = accepted_sum(is_target)
            target_hit = accepted_sum(is_target & (predicted == target_index))
            result["target_total"] = target_total
            result["target_recall"] = target_hit / target_total
    return result


def _safe_rule(probs: np.ndarray, target_index: int, safe_index: int, max_target_prob: float) -> np.ndarray:
    return np.asarray((probs.argmax(axis=1) == safe_index) & (probs[:, target_index] > max_target_prob))


def choose_referral(
    logits: np.ndarray, labels: np.ndarray, classes: Sequence[str], config: ReferralConfig
) -> ReferralPolicy:
    """Fit the temperature and choose the lowest confidence threshold whose accepted tiles meet both targets.

    Definitions, on the OOF tiles after temperature scaling (``T`` from :func:`fit_temperature` when
    ``config.calibrate``, else 1):

    * confidence ``c_i = max_k p_ik``; prediction ``argmax_k p_ik``;
    * a tile is **accepted** at threshold ``t`` when ``c_i > t`` and it is not referred by the safe-class rule
      (predicted ``safe_class`` with ``p_i[target_class] > max_target_prob_when_safe``);
    * the **error bound** at ``t`` is the one-sided Clopper-Pearson upper bound, at ``config.confidence``, of the
      error rate of the accepted tiles; the **recall bound** the Clopper-Pearson lower bound of the recall of
      ``target_class`` among them (accepted tiles of true ``target_class`` predicted as it / accepted tiles of
      true ``target_class``; undefined, and not met, when no accepted tile is of ``target_class``);
    * **coverage** = accepted tiles / all tiles; **accepted accuracy** = correct accepted tiles / accepted tiles.

    Candidates are 0 (accept all) and every distinct OOF confidence. The chosen threshold is the lowest candidate
    with ``error bound <= max_error`` and ``recall bound >= target_recall``; since the accepted set only shrinks
    as ``t`` rises, that is the candidate with the highest coverage. Neither figure is monotone in ``t``, so every
    candidate is checked. When no candidate meets both (always the case for a constant predictor, whose accepted
    tiles are wrong two times in three), the policy falls back to threshold 1.0, which refers every tile, with
    ``target_met=False``, and a warning says what was reached.

    Args:
        logits: OOF logits, shape ``(n, len(classes))``.
        labels: True class indices, shape ``(n,)``.
        classes: Class names in model output order.
        config: The ``referral`` section of params.yaml.

    Returns:
        The policy, with the OOF figures at the chosen threshold.

    Raises:
        ConfigError: ``target_class`` or ``safe_class`` is not in ``classes``.
        ValueError: The arrays are empty or mis-shaped.
    """
    classes = tuple(classes)
    for name in ("target_class", "safe_class"):
        if getattr(config, name) not in classes:
            raise ConfigError(f"referral.{name}={getattr(config, name)!r} is not one of the classes {list(classes)}")
    logits = _as_matrix(logits, "logits", len(classes))
    labels = _as_labels(labels, logits.shape[0], len(classes))
    if labels.size == 0:
        raise ValueError("logits: no out-of-fold tiles to choose a referral threshold on")
    temperature = fit_temperature(logits, labels) if config.calibrate else 1.0
    at_bound = bool(config.calibrate and temperature_at_bound(temperature))
    probs = softmax(logits, temperature)
    target_index, safe_index = classes.index(config.target_class), classes.index(config.safe_class)
    unsafe = _safe_rule(probs, target_index, safe_index, config.max_target_prob_when_safe)
    sweep = _sweep(probs, labels, ~unsafe, target_index)
    candidates = _Candidates.of(sweep, config.confidence)
    n_tiles = int(labels.size)
    # A tiny tolerance so that a bound equal to its target counts as meeting it whatever the rounding.
    met = (sweep["accepted"] > 0) & (candidates.error_upper <= config.max_error + 1e-12)
    met &= np.nan_to_num(candidates.recall_lower, nan=-1.0) >= config.target_recall - 1e-12
    if met.any():
        policy = _referral_policy(int(np.argmax(met)), candidates, classes, temperature, at_bound, n_tiles, config)
        _log_referral(policy, config)
        return policy
    _warn_targets_not_met(candidates, labels, target_index, config)
    return _referral_policy(None, candidates, classes, temperature, at_bound, n_tiles, config)


@dataclasses.dataclass(frozen=True)
class _Candidates:
    """The candidate thresholds of a sweep with a target class, and the conservative bounds at each.

    Attributes:
        sweep: :func:`_sweep`'s figures per threshold.
        error_upper: Clopper-Pearson upper bound of the accepted tiles' error rate.
        recall_lower: Clopper-Pearson lower bound of their target-class recall (NaN when undefined).
    """

    sweep: dict[str, np.ndarray]
    error_upper: np.ndarray
    recall_lower: np.ndarray

    @classmethod
    def of(cls, sweep: dict[str, np.ndarray], confidence: float) -> _Candidates:
        """Bound the figures of every threshold of ``sweep`` at one-sided ``confidence``."""
        accepted = sweep["accepted"]
        errors = accepted - np.nan_to_num(sweep["accuracy"] * accepted)
        error_upper = clopper_pearson_upper(errors, accepted, confidence)
        target_total = sweep["target_total"]
        recall_lower = clopper_pearson_lower(
            np.nan_to_num(sweep["target_recall"] * target_total), target_total, confidence
        )
        return cls(sweep, error_upper, recall_lower)


def _referral_policy(
    k: int | None,
    candidates: _Candidates,
    classes: tuple[str, ...],
    temperature: float,
    at_bound: bool,
    n_tiles: int,
    config: ReferralConfig,
) -> ReferralPolicy:
    """Return the policy of candidate ``k``, or (``None``) the fallback that refers every tile."""
    sweep = candidates.sweep
    return ReferralPolicy(
        classes=classes,
        temperature=temperature,
        confidence_threshold=1.0 if k is None else float(sweep["thresholds"][k]),
        target_class=config.target_class,
        target_recall=config.target_recall,
        safe_class=config.safe_class,
        max_target_prob_when_safe=config.max_target_prob_when_safe,
        n_tiles=n_tiles,
        coverage=0.0 if k is None else float(sweep["coverage"][k]),
        accepted_accuracy=float("nan") if k is None else float(sweep["accuracy"][k]),
        accepted_target_recall=float("nan") if k is None else float(sweep["target_recall"][k]),
        target_met=k is not None,
        max_error=config.max_error,
        confidence=config.confidence,
        accepted_error_upper=float("nan") if k is None else float(candidates.error_upper[k]),
        accepted_recall_lower=float("nan") if k is None else float(candidates.recall_lower[k]),
        temperature_at_bound=at_bound,
    )


def _log_referral(policy: ReferralPolicy, config: ReferralConfig) -> None:
    """Log the chosen threshold and its figures on the out-of-fold tiles."""
    log.info(
        "referral threshold %.4f (T=%.3f): coverage %.3f, accepted accuracy %.3f (error bound %.3f <= %.3f), "
        "%s recall %.3f (bound %.3f >= %.3f)",
        policy.confidence_threshold,
        policy.temperature,
        policy.coverage,
        policy.accepted_accuracy,
        policy.accepted_error_upper,
        config.max_error,
        config.target_class,
        policy.accepted_target_recall,
        policy.accepted_recall_lower,
        config.target_recall,
    )


def _warn_targets_not_met(
    candidates: _Candidates, labels: np.ndarray, target_index: int, config: ReferralConfig
) -> None:
    """Warn that no threshold meets both targets, and say what came closest."""
    accepted, error_upper, recall_lower = candidates.sweep["accepted"], candidates.error_upper, candidates.recall_lower
    thresholds = candidates.sweep["thresholds"]
    n_target = int((labels == target_index).sum())
    with_target = (accepted > 0) & ~np.isnan(recall_lower)
    if n_target == 0 or not with_target.any():
        reached = f"none of the {labels.size} out-of-fold tiles is an accepted {config.target_class} tile"
    else:
        # The threshold that comes closest: the smallest error bound among those with a defined recall bound.
        best = int(np.argmin(np.where(with_target, error_upper, np.inf)))
        reached = (
            f"closest: threshold {thresholds[best]:.3f} accepts {int(accepted[best])} tiles with error "
            f"bound {error_upper[best]:.3f} and {config.target_class} recall bound {recall_lower[best]:.3f}"
        )
    log.warning(
        "referral targets not met: no confidence threshold keeps the error bound <= %.3f and the %s recall bound "
        ">= %.3f (Clopper-Pearson at %.2f, %d out-of-fold tiles; %s); the policy refers every tile",
        config.max_error,
        config.target_class,
        config.target_recall,
        config.confidence,
        labels.size,
        reached,
    )


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Selective-classification curve: error rate among accepted tiles as the confidence threshold rises.

    For each threshold ``t`` (0 and each distinct confidence, ascending), tiles with confidence strictly above
    ``t`` are accepted; thresholds that accept no tile are left out (their risk is undefined). No safe-class rule
    applies here: the curve shows the confidence ranking alone.

    Args:
        probs: Probabilities, shape ``(n, k)``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        ``(coverage, risk, thresholds)``, aligned, coverage descending from 1.
    """
    probs = _as_probs(probs, "probs")
    labels = _as_labels(labels, probs.shape[0], probs.shape[1])
    sweep = _sweep(probs, labels, np.ones(labels.size, dtype=bool), None)
    keep = sweep["accepted"] > 0
    return sweep["coverage"][keep], 1.0 - sweep["accuracy"][keep], sweep["thresholds"][keep]


def referral_summary(policy: ReferralPolicy, probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Figures of the policy on a set of tiles, for the evaluation report.

    Args:
        policy: The referral policy.
        probs: **Calibrated** probabilities (``policy.calibrated_probs(logits)``), shape ``(n, len(classes))``.
        labels: True class indices, shape ``(n,)``.

    Returns:
        A JSON-serialisable dict: ``n_tiles``, ``accepted``, ``referred``, ``coverage``, ``overall_accuracy``
        (all tiles), ``accepted_accuracy``, ``accepted_target_recall`` (NaN when undefined), ``target_recall_goal``,
        ``target_met``, ``missed_target_accepted`` (accepted tiles of ``target_class`` called something else),
        ``referred_by_reason`` (``low_confidence``, ``safe_class_rule``, ``both``: disjoint counts) and
        ``referred_by_true_class``, plus the policy's ``temperature`` and ``confidence_threshold``.
    """
    probs = _as_probs(probs, "probs", len(policy.classes))
    labels = _as_labels(labels, probs.shape[0], len(policy.classes))
    confidence, refer, _ = policy.decide_batch(probs)
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    low = confidence <= policy.confidence_threshold
    unsafe = _safe_rule(probs, policy.target_index, policy.safe_index, policy.max_target_prob_when_safe)
    accepted = ~refer
    accepted_target = accepted & (labels == policy.target_index)
    n_accepted = int(accepted.sum())
    n_accepted_target = int(accepted_target.sum())
    recall = float((predicted[accepted_target] == policy.target_index).mean()) if n_accepted_target else float("nan")
    n = int(labels.size)
    return {
        "n_tiles": n,
        "temperature": policy.temperature,
        "confidence_threshold": policy.confidence_threshold,
        "accepted": n_accepted,
        "referred": int(refer.sum()),
        "coverage": n_accepted / n if n else float("nan"),
        "overall_accuracy": float(correct.mean()) if n else float("nan"),
        "accepted_accuracy": float(correct[accepted].mean()) if n_accepted else float("nan"),
        "accepted_target_recall": recall,
        "target_recall_goal": policy.target_recall,
        "target_met": bool(n_accepted_target and recall >= policy.target_recall - 1e-12),
        "missed_target_accepted": int((accepted_target & (predicted != policy.target_index)).sum()),
        "referred_by_reason": {
            "low_confidence": int((low & ~unsafe).sum()),
            "safe_class_rule": int((unsafe & ~low).sum()),
            "both": int((low & unsafe).sum()),
        },
        "referred_by_true_class": {name: int((refer & (labels == i)).sum()) for i, name in enumerate(policy.classes)},
    }


def plot_risk_coverage(
    probs: np.ndarray, labels: np.ndarray, policy: ReferralPolicy, title: str, out_png: str | Path
) -> Path:
    """Plot risk and target recall against coverage, with the conservative bounds the rule decides on.

    Left: error rate among accepted tiles against coverage, for the confidence threshold alone and with the
    safe-class rule, the Clopper-Pearson upper bound (at the policy's confidence) of the latter, and the policy's
    ``max_error``. Right: recall of ``target_class`` among accepted tiles against coverage (with the safe-class
    rule), its Clopper-Pearson lower bound, and the goal. The star is the policy on these tiles.

    Args:
        probs: **Calibrated** probabilities, shape ``(n, len(classes))``.
        labels: True class indices, shape ``(n,)``.
        policy: The chosen policy.
        title: Figure title.
        out_png: Where to write the PNG.

    Returns:
        ``out_png`` as a Path.
    """
    from matplotlib.figure import Figure  # here: serving, which only needs the referral rule, skips matplotlib

    probs = _as_probs(probs, "probs", len(policy.classes))
    labels = _as_labels(labels, probs.shape[0], len(policy.classes))
    coverage, risk, _ = risk_coverage(probs, labels)
    unsafe = _safe_rule(probs, policy.target_index, policy.safe_index, policy.max_target_prob_when_safe)
    sweep = _sweep(probs, labels, ~unsafe, policy.target_index)
    summary = referral_summary(policy, probs, labels)
    with_rule = sweep["accepted"] > 0
    shown = _Candidates.of({k: v[with_rule] for k, v in sweep.items()}, policy.confidence)
    fig = Figure(figsize=(10, 4.4))
    left, right = fig.subplots(1, 2)
    _plot_risk(left, coverage, risk, shown, policy)
    _plot_target_recall(right, shown, policy)
    _plot_policy_point(left, right, summary, policy)
    left.set(xlim=(0, 1.02), ylim=(0, 1.05), xlabel="coverage (share of tiles accepted)", ylabel="risk (error rate)")
    right.set(xlim=(0, 1.02), ylim=(0, 1.05), xlabel="coverage (share of tiles accepted)", ylabel="recall")
    left.legend(fontsize=7, loc="upper left")
    right.legend(fontsize=7, loc="lower left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return Path(out_png)


def _plot_risk(ax: Axes, coverage: np.ndarray, risk: np.ndarray, shown: _Candidates, policy: ReferralPolicy) -> None:
    """Draw the risk curves, without and with the safe-class rule, the latter's upper bound, and ``max_error``."""
    sweep = shown.sweep
    ax.plot(coverage, risk, drawstyle="steps-post", label="confidence threshold only")
    ax.plot(
        sweep["coverage"],
        1.0 - sweep["accuracy"],
        drawstyle="steps-post",
        label=f"with the {policy.safe_class} rule",
    )
    ax.plot(
        sweep["coverage"],
        shown.error_upper,
        drawstyle="steps-post",
        linestyle=":",
        color="tab:orange",
        label=f"its upper bound (Clopper-Pearson, {policy.confidence:.0%})",
    )
    ax.axhline(policy.max_error, color="tab:red", linestyle="--", label=f"max error {policy.max_error:g}")


def _plot_target_recall(ax: Axes, shown: _Candidates, policy: ReferralPolicy) -> None:
    """Draw the target class's recall among accepted tiles (with the safe-class rule), its lower bound, the goal."""
    sweep = shown.sweep
    ax.plot(
        sweep["coverage"],
        sweep["target_recall"],
        drawstyle="steps-post",
        color="tab:orange",
        label=f"{policy.target_class} recall among accepted",
    )
    ax.plot(
        sweep["coverage"],
        shown.recall_lower,
        drawstyle="steps-post",
        linestyle=":",
        color="tab:orange",
        label=f"its lower bound (Clopper-Pearson, {policy.confidence:.0%})",
    )
    ax.axhline(policy.target_recall, color="tab:red", linestyle="--", label=f"goal {policy.target_recall:g}")


def _plot_policy_point(left: Axes, right: Axes, summary: dict[str, Any], policy: ReferralPolicy) -> None:
    """Star the policy on these tiles in both panels (only a legend entry when it refers every tile)."""
    point_label = (
        f"policy: threshold {policy.confidence_threshold:.3f}, coverage {summary['coverage']:.2f}"
        if summary["accepted"]
        else "policy: every tile referred"
    )
    if summary["accepted"]:
        left.plot(summary["coverage"], 1.0 - summary["accepted_accuracy"], "k*", markersize=14, label=point_label)
        if not math.isnan(summary["accepted_target_recall"]):
            right.plot(summary["coverage"], summary["accepted_target_recall"], "k*", markersize=14, label=point_label)
    else:
        left.plot([], [], "k*", label=point_label)


# ---------------------------------------------------------------------------------------------------------------
# OOF file
# ---------------------------------------------------------------------------------------------------------------


def oof_arrays(oof: pd.DataFrame, classes: Sequence[str], source: str = "oof.csv") -> tuple[np.ndarray, np.ndarray]:
    """Return the logits (``logit_<class>`` columns, in class order) and label indices of an OOF table.

    Args:
        oof: The frame read by :func:`bonetumor.evaluation.evaluate.read_oof`.
        classes: Class names in model output order.
        source: Where the frame came from, for error messages.

    Raises:
        ArtifactError: Logit columns are missing (an OOF file from before logits were written), hold non-finite
            values, or a label is not a class.
    """
    columns = [f"logit_{name}" for name in classes]
    missing = [c for c in [*columns, "label"] if c not in oof.columns]
    if missing:
        raise ArtifactError(f"{source}: missing column(s) {missing}; rerun `bonetumor train` to write logits")
    logits = oof[columns].to_numpy(dtype=np.float64)
    if not np.isfinite(logits).all():
        raise ArtifactError(f"{source}: logit columns hold NaN or infinite values; rerun `bonetumor train`")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(v) for v in oof["label"] if v not in index})
    if unknown:
        raise ArtifactError(f"{source}: labels {unknown} are not in the class set {list(classes)}")
    labels = np.array([index[v] for v in oof["label"]], dtype=np.int64)
    return logits, labels
