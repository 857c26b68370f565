"""Temperature scaling, ECE, the referral rule and its threshold selection, on synthetic logits with known answers."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import beta

from bonetumor.config import ReferralConfig
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.evaluation.calibration import (
    TEMPERATURE_BOUNDS,
    ReferralPolicy,
    choose_referral,
    clopper_pearson_lower,
    clopper_pearson_upper,
    expected_calibration_error,
    fit_temperature,
    oof_arrays,
    plot_risk_coverage,
    referral_summary,
    reliability_diagram,
    reliability_table,
    risk_coverage,
    softmax,
    temperature_at_bound,
)

CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
NT, NVT, VT = 0, 1, 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def calibrated_sample(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a perfectly calibrated model: each label is drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, 3))
    probs = softmax(logits)
    labels = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return logits, labels


# The hand-computable case (calibrate off, probabilities given directly; logits = log p).
#   tile  true  probabilities (NT, NVT, VT)  call  confidence  note
HAND = [
    (VT, (0.05, 0.05, 0.90)),  # 0 VT  0.90
    (VT, (0.10, 0.10, 0.80)),  # 1 VT  0.80
    (VT, (0.10, 0.60, 0.30)),  # 2 NVT 0.60  missed target tile
    (VT, (0.10, 0.20, 0.70)),  # 3 VT  0.70
    (NT, (0.95, 0.02, 0.03)),  # 4 NT  0.95
    (NT, (0.50, 0.20, 0.30)),  # 5 NT  0.50  safe-class rule: P(VT)=0.30 > 0.2
    (NVT, (0.05, 0.85, 0.10)),  # 6 NVT 0.85
    (VT, (0.75, 0.03, 0.22)),  # 7 NT  0.75  safe-class rule and a missed target tile
    (NVT, (0.90, 0.05, 0.05)),  # 8 NT  0.90  wrong, but accepted
]


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([label for label, _ in HAND])
    probs = np.array([p for _, p in HAND])
    return probs, labels


def referral_config(**overrides: object) -> ReferralConfig:
    # No error claim and a point-estimate-like recall bound unless a test asks: confidence 0.5 is the median.
    values: dict[str, object] = {
        "calibrate": False,
        "target_recall": 0.75,
        "max_error": 1.0,
        "confidence": 0.5,
        "max_target_prob_when_safe": 0.2,
    }
    values.update(overrides)
    return ReferralConfig(**values)  # type: ignore[arg-type]


def policy(**overrides: object) -> ReferralPolicy:
    values: dict[str, object] = {
        "classes": CLASSES,
        "temperature": 1.5,
        "confidence_threshold": 0.5,
        "target_class": "Viable-Tumor",
        "target_recall": 0.95,
        "safe_class": "Non-Tumor",
        "max_target_prob_when_safe": 0.2,
        "n_tiles": 9,
        "coverage": 0.6,
        "accepted_accuracy": 0.9,
        "accepted_target_recall": float("nan"),
        "target_met": True,
    }
    values.update(overrides)
    return ReferralPolicy(**values)  # type: ignore[arg-type]


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
        assert min(image.size) > 100


# --- softmax and temperature -------------------------------------------------------------------------------------


def test_softmax_is_stable_and_tempered() -> None:
    probs = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]))
    assert np.isfinite(probs).all()
    assert probs[0] == pytest.approx([1.0, 0.0, 0.0])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    hot = softmax(np.array([[1.0, 2.0, 3.0]]), temperature=0.5)
    np.testing.assert_allclose(hot, softmax(np.array([[2.0, 4.0, 6.0]])))
    with pytest.raises(ValueError, match="temperature"):
        softmax(np.zeros((1, 3)), temperature=0.0)


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(true_temperature: float) -> None:
    logits, labels = calibrated_sample(20_000, seed=1)
    fitted = fit_temperature(logits * true_temperature, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)


def test_fit_temperature_of_calibrated_logits_is_near_one() -> None:
    logits, labels = calibrated_sample(20_000, seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_temperature_survives_tiny_and_separable_data(caplog: pytest.LogCaptureFixture) -> None:
    # One right tile: the NLL keeps falling as T shrinks, until it is 0 in floating point (near T = 0.04, where
    # the search stops): a sharpening temperature that makes the right class certain, not an error.
    low, high = TEMPERATURE_BOUNDS
    one = fit_temperature(np.array([[3.0, 0.0, 0.0]]), np.array([0]))
    assert low <= one < 0.1
    assert softmax(np.array([[3.0, 0.0, 0.0]]), one)[0, 0] == pytest.approx(1.0, abs=1e-12)
    # One wrong tile: the NLL keeps falling as T grows, towards log 3; the search stops at the upper bound.
    with caplog.at_level(logging.WARNING, logger="bonetumor.evaluation.calibration"):
        wrong = fit_temperature(np.array([[3.0, 0.0, 0.0]]), np.array([2]))
    assert wrong == pytest.approx(high, rel=0.01)
    assert temperature_at_bound(wrong)
    assert "bound" in caplog.text


def test_fit_temperature_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no tiles"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0, 0.0]]), np.array([0]))


# --- ECE and reliability -----------------------------------------------------------------------------------------


def test_ece_by_hand() -> None:
    # Bin (0.8, 0.9]: two tiles of confidence 0.9 and 0.8... use two bins to keep it simple.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bins=2: (0.5, 1] holds all four; accuracy 3/4, mean confidence 0.75 -> ECE 0.
    assert expected_calibration_error(probs, labels, 2) == pytest.approx(0.0, abs=1e-12)
    # bins=10: bin (0.8, 0.9] acc 0.5 conf 0.9; bin (0.5, 0.6] acc 1.0 conf 0.6 -> 0.5*0.4 + 0.5*0.4 = 0.4.
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(0.4)
    table = reliability_table(probs, labels, 10)
    assert table["count"].tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]


def test_temperature_scaling_lowers_ece_of_overconfident_logits() -> None:
    logits, labels = calibrated_sample(5_000, seed=3)
    overconfident = logits * 3.0
    temperature = fit_temperature(overconfident, labels)
    before = expected_calibration_error(softmax(overconfident), labels, 10)
    after = expected_calibration_error(softmax(overconfident, temperature), labels, 10)
    assert before > 0.1
    assert after < before / 3
    assert after < 0.03


def test_reliability_diagram_writes_png(tmp_path: Path) -> None:
    logits, labels = calibrated_sample(500, seed=4)
    out = reliability_diagram(
        softmax(logits * 3), softmax(logits), labels, 10, "resnet50: reliability", tmp_path / "rel.png"
    )
    assert out == tmp_path / "rel.png"
    assert_png(out)


# --- the referral rule -------------------------------------------------------------------------------------------


def test_safe_class_rule_refers_non_tumor_call_with_high_viable_probability() -> None:
    rule = policy(confidence_threshold=0.5)
    confidence, refer, reason = rule.decide(np.array([0.6, 0.05, 0.35]))
    assert confidence == pytest.approx(0.6)
    assert refer
    assert reason == "Non-Tumor call but P(Viable-Tumor)=0.350 exceeds 0.2"
    # Same confidence, but a Non-Viable-Tumor call: the rule is only for the safe class.
    assert rule.decide(np.array([0.05, 0.6, 0.35])) == (pytest.approx(0.6), False, "")
    # Non-Tumor call with little viable probability is accepted.
    assert rule.decide(np.array([0.6, 0.25, 0.15]))[1:] == (False, "")


def test_low_confidence_reason_and_both_reasons() -> None:
    rule = policy(confidence_threshold=0.8)
    _, refer, reason = rule.decide(np.array([0.1, 0.62, 0.28]))
    assert refer
    assert reason == "confidence 0.620 does not exceed the referral threshold 0.800"
    _, refer, reason = rule.decide(np.array([0.5, 0.1, 0.4]))
    assert refer
    assert reason.startswith("confidence 0.500 does not exceed")
    assert reason.endswith("; Non-Tumor call but P(Viable-Tumor)=0.400 exceeds 0.2")
    # Exactly at the threshold is referred (acceptance needs confidence strictly above it).
    assert rule.decide(np.array([0.1, 0.8, 0.1]))[1]


def test_decide_batch_matches_decide() -> None:
    probs, _ = hand_case()
    rule = policy(confidence_threshold=0.7)
    confidence, refer, reasons = rule.decide_batch(probs)
    for i, row in enumerate(probs):
        assert rule.decide(row) == (pytest.approx(confidence[i]), bool(refer[i]), reasons[i])
    assert refer.tolist() == [False, False, True, True, False, True, False, True, False]


def test_decide_rejects_logits() -> None:
    rule = policy()
    with pytest.raises(ValueError, match="calibrated_probs"):
        rule.decide(np.array([2.0, -1.0, 0.5]))
    with pytest.raises(ValueError, match="3 class columns"):
        rule.decide_batch(np.array([[0.5, 0.5]]))


def test_calibrated_probs_applies_the_temperature() -> None:
    logits = np.array([[2.0, 0.0, -1.0]])
    np.testing.assert_allclose(policy(temperature=2.0).calibrated_probs(logits), softmax(logits / 2.0))


# --- threshold selection -----------------------------------------------------------------------------------------


def test_clopper_pearson_bounds_match_their_closed_forms() -> None:
    # No failure in n trials: upper bound 1 - (1 - c)^(1/n). 58 error-free tiles cannot vouch for 5 % at 95 %, 59 can.
    upper = clopper_pearson_upper(np.array([0, 0, 2, 5, 0]), np.array([58, 59, 7, 5, 0]), 0.95)
    assert upper[0] == pytest.approx(1 - 0.05 ** (1 / 58))
    assert upper[0] > 0.05
    assert upper[1] == pytest.approx(1 - 0.05 ** (1 / 59))
    assert upper[1] <= 0.05
    assert upper[2] == pytest.approx(beta.ppf(0.95, 3, 5))
    assert upper[3] == 1.0  # every trial failed
    assert upper[4] == 1.0  # no trial: nothing is vouched for
    lower = clopper_pearson_lower(np.array([8, 0, 3, 0]), np.array([8, 4, 4, 0]), 0.9)
    assert lower[0] == pytest.approx(0.1 ** (1 / 8))
    assert lower[1] == 0.0
    assert lower[2] == pytest.approx(beta.ppf(0.1, 3, 2))
    assert math.isnan(lower[3])


def test_choose_referral_picks_lowest_threshold_meeting_the_recall_bound_by_hand() -> None:
    probs, labels = hand_case()
    chosen = choose_referral(np.log(probs), labels, CLASSES, referral_config())
    # Tiles 5 and 7 are always referred (safe-class rule). Accepted VT tiles at threshold 0 and 0.5: 0, 1, 2, 3
    # with tile 2 missed: 3/4, median bound 0.614 < 0.75. Threshold 0.6 (tile 2's confidence) refers tile 2:
    # 3/3, bound 0.5^(1/3) = 0.794 >= 0.75.
    assert chosen.temperature == 1.0
    assert chosen.confidence_threshold == pytest.approx(0.6)
    assert chosen.target_met
    assert chosen.n_tiles == 9
    # Accepted: tiles 0, 1, 3, 4, 6, 8 -> coverage 6/9; tile 8 is wrong -> accuracy 5/6.
    assert chosen.coverage == pytest.approx(6 / 9)
    assert chosen.accepted_accuracy == pytest.approx(5 / 6)
    assert chosen.accepted_target_recall == pytest.approx(1.0)
    assert chosen.accepted_recall_lower == pytest.approx(0.5 ** (1 / 3))
    assert chosen.accepted_error_upper == pytest.approx(beta.ppf(0.5, 2, 5))
    _, refer, _ = chosen.decide_batch(softmax(np.log(probs)))
    assert np.flatnonzero(refer).tolist() == [2, 5, 7]


def test_the_error_bound_raises_the_threshold_or_refers_everything() -> None:
    probs, labels = hand_case()
    # Recall no constraint; errors: 2 of 7 accepted at 0 (bound 0.364), 1 of 6 at 0.6 (bound 0.264).
    loose = choose_referral(np.log(probs), labels, CLASSES, referral_config(target_recall=0.0, max_error=0.3))
    assert loose.confidence_threshold == pytest.approx(0.6)
    assert loose.accepted_error_upper == pytest.approx(beta.ppf(0.5, 2, 5))
    # Below 0.264 no threshold with a Viable-Tumor tile left among the accepted ones qualifies: refer all.
    strict = choose_referral(np.log(probs), labels, CLASSES, referral_config(target_recall=0.0, max_error=0.25))
    assert strict.refers_everything
    assert not strict.target_met


def test_a_constant_predictor_refers_everything() -> None:
    # The failure the rule exists for: one class for every tile, equally confident. At 95 % the bound of 20 errors
    # in 30 accepted tiles is far above any useful error target, so nothing is accepted.
    labels = np.repeat([NT, NVT, VT], 10)
    logits = np.tile(np.log([[0.3, 0.3, 0.4]]), (30, 1))
    clinical = ReferralConfig(max_error=0.05, target_recall=0.95, confidence=0.95)
    for config in (ReferralConfig(), clinical):  # the sample's targets and the full protocol's
        chosen = choose_referral(logits, labels, CLASSES, config)
        assert chosen.refers_everything
        assert not chosen.target_met
        _, refer, reasons = chosen.decide_batch(chosen.calibrated_probs(logits))
        assert refer.all()
        assert f"error rate <= {config.max_error:g}" in reasons[0]


def test_choose_referral_lower_goal_accepts_everything_but_safe_rule() -> None:
    probs, labels = hand_case()
    chosen = choose_referral(np.log(probs), labels, CLASSES, referral_config(target_recall=0.6))
    assert chosen.confidence_threshold == 0.0
    assert chosen.coverage == pytest.approx(7 / 9)
    assert chosen.accepted_target_recall == pytest.approx(0.75)


def test_unattainable_target_refers_everything(caplog: pytest.LogCaptureFixture) -> None:
    # Every Viable-Tumor tile is called Non-Viable-Tumor with high confidence: no threshold can reach the recall.
    probs = np.array([[0.05, 0.9, 0.05], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    labels = np.array([VT, VT, NT, NVT])
    with caplog.at_level(logging.WARNING, logger="bonetumor.evaluation.calibration"):
        chosen = choose_referral(np.log(probs), labels, CLASSES, referral_config())
    assert not chosen.target_met
    assert chosen.confidence_threshold == 1.0
    assert chosen.coverage == 0.0
    assert math.isnan(chosen.accepted_accuracy)
    assert "Viable-Tumor recall bound >= 0.750" in caplog.text
    assert "recall bound 0.000" in caplog.text
    _, refer, reasons = chosen.decide_batch(probs)
    assert refer.all()
    assert all("every tile is referred" in r for r in reasons)


def test_no_target_tiles_refers_everything(caplog: pytest.LogCaptureFixture) -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    with caplog.at_level(logging.WARNING, logger="bonetumor.evaluation.calibration"):
        chosen = choose_referral(np.log(probs), np.array([NT, NVT]), CLASSES, referral_config())
    assert not chosen.target_met
    assert chosen.coverage == 0.0
    assert "none of the 2 out-of-fold tiles is an accepted Viable-Tumor tile" in caplog.text


def test_a_temperature_fit_at_its_bound_is_flagged() -> None:
    labels = np.repeat([NT, NVT, VT], 10)
    # Logits that always point at the wrong class: the fit flattens them as far as it may (T at its upper bound).
    wrong = 2.0 * np.eye(3)[(labels + 1) % 3]
    chosen = choose_referral(wrong, labels, CLASSES, referral_config(calibrate=True))
    assert chosen.temperature_at_bound
    assert temperature_at_bound(chosen.temperature)
    logits, labels = calibrated_sample(500, seed=1)
    assert not choose_referral(logits, labels, CLASSES, referral_config(calibrate=True)).temperature_at_bound


def test_choose_referral_calibrates_and_policy_holds_on_its_oof() -> None:
    logits, labels = calibrated_sample(3_000, seed=5)
    config = referral_config(calibrate=True, target_recall=0.9, max_error=0.2, confidence=0.95)
    chosen = choose_referral(logits * 2.0, labels, CLASSES, config)
    assert chosen.temperature == pytest.approx(2.0, rel=0.1)
    assert chosen.target_met
    # The rule's figures, recomputed by hand from its temperature and thresholds: accepted are the tiles whose
    # calibrated confidence exceeds the threshold, except Non-Tumor calls with P(Viable-Tumor) above 0.2.
    probs = softmax(logits * 2.0 / chosen.temperature)
    calls = probs.argmax(1)
    accepted = (probs.max(1) > chosen.confidence_threshold) & ~((calls == NT) & (probs[:, VT] > 0.2))
    assert 0 < accepted.sum() < len(labels)  # it refers some tiles and accepts others
    assert chosen.n_tiles == len(labels)
    assert chosen.coverage == pytest.approx(accepted.mean())
    assert chosen.accepted_accuracy == pytest.approx((calls == labels)[accepted].mean())
    accepted_vt = accepted & (labels == VT)
    assert chosen.accepted_target_recall == pytest.approx((calls[accepted_vt] == VT).mean())
    summary = referral_summary(chosen, chosen.calibrated_probs(logits * 2.0), labels)
    assert summary["coverage"] == pytest.approx(chosen.coverage)
    assert summary["accepted_target_recall"] == pytest.approx(chosen.accepted_target_recall)
    assert summary["accepted_target_recall"] >= 0.9
    assert summary["target_met"]
    # The bound, not the point estimate, meets the target: the accepted error rate is clearly below it.
    assert chosen.accepted_error_upper <= 0.2
    assert 1 - chosen.accepted_accuracy < chosen.accepted_error_upper


def test_choose_referral_rejects_unknown_class() -> None:
    with pytest.raises(ConfigError, match=r"referral\.target_class"):
        choose_referral(np.zeros((2, 3)), np.array([0, 1]), ("a", "b", "c"), referral_config())


# --- summary and risk-coverage -----------------------------------------------------------------------------------


def test_referral_summary_counts_by_reason() -> None:
    probs, labels = hand_case()
    summary = referral_summary(policy(temperature=1.0, confidence_threshold=0.75), probs, labels)
    # Low confidence (<= 0.75): tiles 2, 3, 5, 7; safe-class rule: 5, 7 -> 2 low only, 2 both.
    assert (summary["referred"], summary["accepted"]) == (4, 5)
    assert summary["referred_by_reason"] == {"low_confidence": 2, "safe_class_rule": 0, "both": 2}
    assert summary["referred_by_true_class"] == {"Non-Tumor": 1, "Non-Viable-Tumor": 0, "Viable-Tumor": 3}
    assert summary["accepted_accuracy"] == pytest.approx(4 / 5)
    assert summary["overall_accuracy"] == pytest.approx(6 / 9)
    assert summary["missed_target_accepted"] == 0
    assert summary["accepted_target_recall"] == pytest.approx(1.0)
    json.dumps(summary, allow_nan=False)


def test_risk_coverage_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    labels = np.array([0, 1, 0])
    coverage, risk, thresholds = risk_coverage(probs, labels)
    np.testing.assert_allclose(thresholds, [0.0, 0.7, 0.8])
    np.testing.assert_allclose(coverage, [1.0, 2 / 3, 1 / 3])
    np.testing.assert_allclose(risk, [1 / 3, 1 / 2, 0.0])


def test_plot_risk_coverage_writes_png(tmp_path: Path) -> None:
    probs, labels = hand_case()
    chosen = choose_referral(np.log(probs), labels, CLASSES, referral_config())
    assert_png(plot_risk_coverage(probs, labels, chosen, "resnet50: risk-coverage", tmp_path / "rc.png"))
    everything = policy(confidence_threshold=1.0, target_met=False, coverage=0.0)
    assert_png(plot_risk_coverage(probs, labels, everything, "refers all", tmp_path / "all.png"))


# --- serialisation -----------------------------------------------------------------------------------------------


def test_policy_round_trips_through_json() -> None:
    original = policy(accepted_target_recall=float("nan"))
    text = json.dumps(original.to_dict(), allow_nan=False)
    restored = ReferralPolicy.from_dict(json.loads(text))
    assert restored.to_dict() == original.to_dict()
    assert restored.classes == CLASSES
    assert math.isnan(restored.accepted_target_recall)
    chosen = choose_referral(np.log(hand_case()[0]), hand_case()[1], CLASSES, referral_config())
    assert ReferralPolicy.from_dict(json.loads(json.dumps(chosen.to_dict()))) == chosen


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"target_class": "Tumor"}, "target_class"),
        ({"safe_class": "Viable-Tumor"}, "safe_class"),
        ({"classes": "Non-Tumor"}, "classes"),
        ({"classes": ["Non-Tumor"]}, "classes"),
        ({"target_met": "yes"}, "target_met"),
        ({"n_tiles": -1}, "n_tiles"),
        ({"coverage": None}, "coverage"),
        ({"surprise": 1}, "surprise"),
        ({"temperature": None}, "temperature"),
    ],
)
def test_bad_policy_dict_raises_artifact_error_naming_field(change: dict[str, object], field: str) -> None:
    data = policy().to_dict() | change
    with pytest.raises(ArtifactError, match=field):
        ReferralPolicy.from_dict(data, source="models/referral_policy.json")


def test_a_rule_written_before_the_error_bound_still_loads() -> None:
    data = policy().to_dict()
    for name in ("max_error", "confidence", "accepted_error_upper", "accepted_recall_lower", "temperature_at_bound"):
        del data[name]
    restored = ReferralPolicy.from_dict(data)
    assert restored.max_error == 1.0
    assert not restored.temperature_at_bound


def test_policy_dict_missing_field_and_non_mapping() -> None:
    data = policy().to_dict()
    del data["confidence_threshold"]
    with pytest.raises(ArtifactError, match=r"missing field.*confidence_threshold"):
        ReferralPolicy.from_dict(data)
    with pytest.raises(ArtifactError, match="expected a mapping"):
        ReferralPolicy.from_dict([1, 2])  # type: ignore[arg-type]


# --- OOF file ----------------------------------------------------------------------------------------------------


def test_oof_arrays_reads_logits_in_class_order() -> None:
    frame = pd.DataFrame(
        {
            "label": ["Viable-Tumor", "Non-Tumor"],
            "logit_Viable-Tumor": [3.0, 0.0],
            "logit_Non-Tumor": [0.0, 2.0],
            "logit_Non-Viable-Tumor": [1.0, 1.0],
        }
    )
    logits, labels = oof_arrays(frame, CLASSES)
    np.testing.assert_array_equal(logits, [[0.0, 1.0, 3.0], [2.0, 1.0, 0.0]])
    assert labels.tolist() == [VT, NT]
    with pytest.raises(ArtifactError, match="logit_Non-Tumor"):
        oof_arrays(frame.drop(columns="logit_Non-Tumor"), CLASSES)
    with pytest.raises(ArtifactError, match="Tumour"):
        oof_arrays(frame.assign(label=["Tumour", "Non-Tumor"]), CLASSES)
