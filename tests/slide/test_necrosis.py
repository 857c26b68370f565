"""The necrosis estimate's interval and category on counts with a known answer, edge cases included."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from bonetumor.slide.necrosis import TileCall, clopper_pearson, necrosis_summary

CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")


def _summary(necrotic: int, viable: int, other: int = 0, referred: int = 0, bootstrap: int = 2000) -> dict:
    calls = (
        [TileCall("Non-Viable-Tumor", False, {"Non-Viable-Tumor": 0.9, "Viable-Tumor": 0.05})] * necrotic
        + [TileCall("Viable-Tumor", False, {"Non-Viable-Tumor": 0.05, "Viable-Tumor": 0.9})] * viable
        + [TileCall("Non-Tumor", False, {"Non-Viable-Tumor": 0.0, "Viable-Tumor": 0.0})] * other
        + [TileCall("Non-Tumor", True, {"Non-Viable-Tumor": 0.3, "Viable-Tumor": 0.3})] * referred
    )
    return necrosis_summary(calls, CLASSES, "Non-Viable-Tumor", "Viable-Tumor", 1.0, bootstrap=bootstrap)


def test_clopper_pearson_matches_scipy() -> None:
    expected = binomtest(7, 20).proportion_ci(0.95, method="exact")
    assert clopper_pearson(7, 20, 0.95) == pytest.approx((100 * expected.low, 100 * expected.high))
    assert clopper_pearson(0, 5, 0.95)[0] == 0.0
    assert clopper_pearson(5, 5, 0.95)[1] == 100.0


@pytest.mark.parametrize("bootstrap", [0, 2000])
def test_one_necrotic_tile_is_never_a_certain_good_response(bootstrap: int) -> None:
    summary = _summary(1, 0, bootstrap=bootstrap)
    assert summary["necrosis_percent"] == 100.0
    assert summary["necrosis_interval"][0] == pytest.approx(2.5, abs=0.01)  # a bootstrap alone gave [100, 100]
    assert summary["response"] == summary["response"] | {"category": "good responder", "certain": False}


def test_many_tumour_tiles_give_a_certain_category() -> None:
    summary = _summary(200, 5)
    assert summary["response"]["certain"] is True
    assert 90 < summary["necrosis_interval"][0] < summary["necrosis_percent"] < summary["necrosis_interval"][1]


def test_the_category_uses_unrounded_figures() -> None:
    summary = _summary(22499, 2501, bootstrap=0)  # 89.996 %
    assert summary["necrosis_percent"] == 90.0  # rounded for display ...
    assert summary["response"]["category"] == "poor responder"  # ... but below the cut-off
    assert "Estimated 89.996 % necrosis (< 90 %)" in summary["response"]["text"]


def test_the_interval_always_holds_the_referral_bounds() -> None:
    summary = _summary(40, 30, other=10, referred=8)
    low, high = summary["interval"]["referral_bounds"]
    assert low == pytest.approx(100 * 40 / 78, abs=0.01)
    assert high == pytest.approx(100 * 48 / 78, abs=0.01)
    assert summary["necrosis_interval"][0] <= low
    assert summary["necrosis_interval"][1] >= high
    assert summary["referred"] == {
        "tiles": 8,
        "share": 0.0909,
        "per_class": {"Non-Tumor": 8, "Non-Viable-Tumor": 0, "Viable-Tumor": 0},
    }


def test_no_tumour_means_no_percentage() -> None:
    summary = _summary(0, 0, other=12)
    assert summary["necrosis_percent"] is None
    assert summary["necrosis_interval"] is None
    assert summary["response"]["category"] == "no tumour found"
    assert summary["tumour_area_mm2"] == 0


def test_the_probability_estimate_sums_probabilities() -> None:
    summary = _summary(3, 1)
    assert summary["necrosis_percent"] == 75.0
    assert summary["necrosis_percent_from_probabilities"] == pytest.approx(100 * 2.75 / (2.75 + 1.05), abs=0.01)
