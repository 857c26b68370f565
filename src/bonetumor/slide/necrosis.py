"""The clinical answer of a slide: percent necrosis of the tumour, with an interval, and the response category.

After neoadjuvant chemotherapy an osteosarcoma resection is graded by necrotic / (necrotic + viable) tumour
area; by Huvos, at least 90 % necrosis is a good response. Here each tissue tile stands for one equal square of
the slide, so areas are tile counts times the tile area.

The interval combines two uncertainties:

- **Referred tiles counted either way.** A tile the referral rule sends to a pathologist may be any class. The
  lowest necrosis any assignment of them can give counts every referred tile as viable tumour; the highest counts
  every one as necrotic. (Counting one as Non-Tumor lies between.)
- **A bootstrap over tiles**: the slide's tiles resampled with replacement, for the sampling noise of a finite
  number of tiles.

The reported interval runs from the lowest assignment's lower limit to the highest one's upper limit, each the
wider of the bootstrap quantile and the exact binomial (Clopper-Pearson) limit: with few tumour tiles a bootstrap
has no spread, and one necrotic tile must not read as a certain good response. The bootstrap treats tiles as
independent, though necrosis forms regions, so its part of the interval is optimistic. The interval is not a
bound on the model's errors on accepted tiles: those are measured on the folds (README "Measured"), not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: What every answer says about itself.
DISCLAIMER = (
    "An estimate from a tile classifier, for a pathologist to confirm: decision support, not a diagnosis. It "
    "counts tiles, not cells, and the model's errors on accepted tiles are not in the interval."
)


@dataclass(frozen=True)
class TileCall:
    """The model's answer for one tissue tile.

    Attributes:
        label: The predicted class.
        referred: Whether the referral rule sends it to a pathologist.
        probabilities: Class name to probability.
    """

    label: str
    referred: bool
    probabilities: dict[str, float]


def _percent(necrotic: np.ndarray, viable: np.ndarray) -> np.ndarray:
    """100 * necrotic / (necrotic + viable), NaN where there is no tumour."""
    tumour = necrotic + viable
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tumour > 0, 100.0 * necrotic / np.where(tumour > 0, tumour, 1), np.nan)


def _bootstrap_counts(kinds: np.ndarray, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per resample, the counts of tiles of kind 0 (accepted necrotic), 1 (accepted viable) and 2 (referred)."""
    rng = np.random.default_rng(seed)
    n = len(kinds)
    # Multinomial resampling of the tile kinds is the same as resampling tiles, and needs no n x B matrix.
    shares = np.bincount(kinds, minlength=4)[:4] / n
    counts = rng.multinomial(n, shares, size=resamples)
    return counts[:, 0], counts[:, 1], counts[:, 2]


def necrosis_summary(
    calls: Sequence[TileCall],
    classes: Sequence[str],
    necrotic_class: str,
    viable_class: str,
    tile_area_mm2: float,
    *,
    good_response_percent: float = 90.0,
    bootstrap: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarise a slide's tile calls: counts, areas, percent necrosis with its interval, the response.

    Args:
        calls: One call per tissue tile.
        classes: The model's classes (for the count table, in order).
        necrotic_class: ``assess.necrotic_class``.
        viable_class: ``assess.viable_class``.
        tile_area_mm2: Area one tile stands for.
        good_response_percent: ``assess.good_response_percent``.
        bootstrap: Resamples (0 = none: the interval is the referral bounds).
        confidence_level: Level of the bootstrap quantiles.
        seed: Seed of the bootstrap.

    Returns:
        ``tiles`` (tissue tiles), ``tiles_per_class``, ``referred`` (count and share, and per class),
        ``tumour_tiles``, ``tumour_area_mm2``, ``tissue_area_mm2``, ``necrosis_percent`` (point, from every
        tile's label; None without tumour), ``necrosis_percent_from_probabilities``, ``necrosis_interval``,
        ``interval`` (its parts and method), ``response`` and ``disclaimer``.
    """
    labels = [c.label for c in calls]
    referred = np.array([c.referred for c in calls], dtype=bool)
    is_necrotic = np.array([label == necrotic_class for label in labels], dtype=bool)
    is_viable = np.array([label == viable_class for label in labels], dtype=bool)
    point = _percent(np.array(is_necrotic.sum()), np.array(is_viable.sum())).item()
    soft_n = sum(c.probabilities.get(necrotic_class, 0.0) for c in calls)
    soft_v = sum(c.probabilities.get(viable_class, 0.0) for c in calls)
    soft = _percent(np.array(soft_n), np.array(soft_v)).item()

    accepted_n = int((is_necrotic & ~referred).sum())
    accepted_v = int((is_viable & ~referred).sum())
    n_referred = int(referred.sum())
    low = _percent(np.array(accepted_n), np.array(accepted_v + n_referred)).item()
    high = _percent(np.array(accepted_n + n_referred), np.array(accepted_v)).item()
    interval = _interval(is_necrotic, is_viable, referred, point, (low, high), bootstrap, confidence_level, seed)
    tumour = int(is_necrotic.sum() + is_viable.sum())
    return {
        "tiles": len(calls),
        "tiles_per_class": {name: labels.count(name) for name in classes},
        "referred": {
            "tiles": n_referred,
            "share": round(n_referred / len(calls), 4) if calls else 0.0,
            "per_class": {name: int(sum(c.referred for c in calls if c.label == name)) for name in classes},
        },
        "tumour_tiles": tumour,
        "tumour_area_mm2": round(tumour * tile_area_mm2, 3),
        "tissue_area_mm2": round(len(calls) * tile_area_mm2, 3),
        "tile_area_mm2": round(tile_area_mm2, 6),
        "necrosis_percent": _rounded(point),
        "necrosis_percent_from_probabilities": _rounded(soft),
        "necrosis_interval": interval["combined"],
        "interval": interval,
        "response": _response(point, interval.pop("combined_raw"), good_response_percent, tumour),
        "disclaimer": DISCLAIMER,
    }


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 2)


def clopper_pearson(successes: int, trials: int, level: float) -> tuple[float, float]:
    """Exact two-sided binomial interval of ``successes`` out of ``trials``, in percent (NaN without trials)."""
    from scipy.stats import beta

    if trials == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    return 100.0 * low, 100.0 * high


def _interval(
    is_necrotic: np.ndarray,
    is_viable: np.ndarray,
    referred: np.ndarray,
    point: float,
    bounds: tuple[float, float],
    resamples: int,
    level: float,
    seed: int,
) -> dict[str, Any]:
    """The referral bounds, the bootstrap interval of the point estimate, and the combined interval.

    The combined interval never lies inside the referral bounds, and each end is widened to the exact binomial
    (Clopper-Pearson) limit of its count: with few tumour tiles, or all of them in one class, a bootstrap has no
    spread at all, and one necrotic tile must not make a "certain" good response. ``combined_raw`` keeps the
    unrounded ends for the category.
    """
    method = (
        "lowest: every referred tile counted as viable tumour; highest: every referred tile counted as necrotic; "
        f"each widened by a bootstrap over tiles ({resamples} resamples, {level:.0%} percentile) and to the exact "
        f"binomial ({level:.0%} Clopper-Pearson) limit of its count. The bootstrap resamples tiles as independent, "
        "though necrosis forms regions, so its part is optimistic"
    )
    parts: dict[str, Any] = {
        "referral_bounds": [_rounded(bounds[0]), _rounded(bounds[1])],
        "bootstrap": None,
        "confidence_level": level,
        "resamples": resamples,
        "method": method,
    }
    accepted_n = int((is_necrotic & ~referred).sum())
    trials = accepted_n + int((is_viable & ~referred).sum()) + int(referred.sum())
    if trials == 0 or (np.isnan(point) and np.isnan(bounds[1])):
        return parts | {"combined": None, "combined_raw": None}
    low = min(bounds[0], clopper_pearson(accepted_n, trials, level)[0])
    high = max(bounds[1], clopper_pearson(accepted_n + int(referred.sum()), trials, level)[1])
    if resamples > 0:
        alpha = (1.0 - level) / 2.0
        # Kinds: 0 accepted necrotic, 1 accepted viable, 2 referred, 3 accepted other (Non-Tumor).
        kinds = np.full(len(referred), 3)
        kinds[is_necrotic & ~referred] = 0
        kinds[is_viable & ~referred] = 1
        kinds[referred] = 2
        n, v, r = _bootstrap_counts(kinds, resamples, seed)
        lows, highs = _percent(n, v + r), _percent(n + r, v)
        if not np.isnan(lows).all():
            low = min(low, float(np.nanquantile(lows, alpha)))
        if not np.isnan(highs).all():
            high = max(high, float(np.nanquantile(highs, 1 - alpha)))
        # The point estimate's own bootstrap: referred tiles counted by their label.
        pn, pv, _ = _bootstrap_counts(np.where(is_necrotic, 0, np.where(is_viable, 1, 3)), resamples, seed)
        points = _percent(pn, pv)
        if not np.isnan(points).all():
            parts["bootstrap"] = [
                _rounded(float(np.nanquantile(points, alpha))),
                _rounded(float(np.nanquantile(points, 1 - alpha))),
            ]
    return parts | {"combined": [_rounded(low), _rounded(high)], "combined_raw": [low, high]}


def _response(point: float, interval: list[float] | None, threshold: float, tumour_tiles: int) -> dict[str, Any]:
    """The Huvos-style category of the estimate, and whether its interval crosses the threshold."""
    if tumour_tiles == 0 or np.isnan(point):
        return {
            "category": "no tumour found",
            "threshold_percent": threshold,
            "certain": False,
            "text": "No tile was called tumour (necrotic or viable), so percent necrosis is undefined; a pathologist "
            "should review the slide.",
        }
    # Unrounded values: 89.996 % is a poor response, whatever "90.0" the display shows.
    good = point >= threshold
    certain = interval is not None and ((interval[0] >= threshold) if good else (interval[1] < threshold))
    category = "good responder" if good else "poor responder"
    side = f">= {threshold:g} %" if good else f"< {threshold:g} %"
    shown = f"{point:.3f}" if abs(point - threshold) < 0.1 else f"{point:.1f}"  # 89.996 must not read "90.0"
    text = f"Estimated {shown} % necrosis ({side}): {category} (Huvos), an estimate for a pathologist to confirm."
    if not certain:
        text += f" The interval crosses {threshold:g} %, so the category is uncertain."
    return {"category": category, "threshold_percent": threshold, "certain": bool(certain), "text": text}
