"""The champion gate: the decision rule, its tags on real registry versions, and promotion by hand."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import bundle_metadata
from mlflow.tracking import MlflowClient

from bonetumor.config import TrackingConfig
from bonetumor.errors import ArtifactError, PromotionRefusedError
from bonetumor.registry.gate import GATE_PREFIX, GateDecision, GateMetrics, decide
from bonetumor.registry.model_registry import STATUS_TAG, champion_metrics, log_and_register, promote
from bonetumor.registry.promotions import promotion_history, rollback
from bonetumor.registry.tracking import setup_mlflow
from bonetumor.serving.predictor import save_bundle
from bonetumor.training.models import build_model


def metrics(
    f1: float,
    met: bool = True,
    data: str = "d1",
    folds: str = "f1",
    version: str = "",
    baseline: float | None = 0.4,
) -> GateMetrics:
    beats = None if baseline is None else f1 > baseline
    return GateMetrics(version, f1, 0.96 if met else 0.5, met, data, folds, baseline, beats)


def test_first_model_is_champion_only_when_its_referral_rule_meets_the_targets() -> None:
    assert decide(metrics(0.5), None, 0.95, "Viable-Tumor").promote
    refused = decide(metrics(0.9, met=False), None, 0.95, "Viable-Tumor")
    assert not refused.promote
    assert "the referral rule refers every tile" in refused.reason
    assert "Viable-Tumor recall (>= 0.950)" in refused.reason


def test_a_model_that_does_not_beat_the_baseline_stays_challenger() -> None:
    refused = decide(metrics(0.70, baseline=0.83), None, 0.95, "V")
    assert not refused.promote
    assert "does not beat the baseline's 0.8300" in refused.reason
    # A tie is not a win; and without a baseline score the requirement cannot be met.
    assert not decide(metrics(0.83, baseline=0.83), None, 0.95, "V").promote
    assert "(not scored)" in decide(metrics(0.9, baseline=None), None, 0.95, "V").reason
    # Switched off (register.require_beats_baseline: false), the other rules decide alone.
    assert decide(metrics(0.70, baseline=0.83), None, 0.95, "V", require_beats_baseline=False).promote
    winner = decide(metrics(0.90, baseline=0.83), None, 0.95, "V")
    assert winner.promote
    assert "baseline (colour-histogram random forest) 0.8300" in winner.reason


def test_a_better_macro_f1_on_the_same_data_and_folds_wins() -> None:
    champion = metrics(0.80, version="3")
    assert decide(metrics(0.81), champion, 0.95, "V").promote
    tie = decide(metrics(0.80), champion, 0.95, "V")
    assert not tie.promote
    assert "does not beat champion version 3's 0.8000" in tie.reason
    assert not decide(metrics(0.99, met=False), champion, 0.95, "V").promote


@pytest.mark.parametrize("other", [{"data": "d2"}, {"folds": "f2"}])
def test_scores_on_other_data_or_folds_are_not_comparable(other: dict[str, str]) -> None:
    decision = decide(metrics(0.99, **other), metrics(0.10, version="3"), 0.95, "V")  # type: ignore[arg-type]
    assert not decision.promote
    assert "not comparable" in decision.reason
    assert "bonetumor promote" in decision.reason


def test_gate_tags_round_trip() -> None:
    original = metrics(0.8125, version="7")
    tags = original.to_tags("candidate")
    assert tags[f"{GATE_PREFIX}candidate.beats_baseline"] == "True"
    assert GateMetrics.from_tags(tags, "7") == original
    # A version registered before the baseline existed reads as not scored against it.
    older = {k: v for k, v in tags.items() if "baseline" not in k}
    assert GateMetrics.from_tags(older, "7") == metrics(0.8125, version="7", baseline=None)
    with pytest.raises(ArtifactError, match="no readable gate tags"):
        GateMetrics.from_tags({}, "7")


def test_registry_reads_the_champion_and_promotion_by_hand(tmp_path: Path) -> None:
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="gate"), tmp_path)
    torch.manual_seed(0)
    bundle = save_bundle(build_model("resnet50", 3).eval(), bundle_metadata(), tmp_path / "bundle")
    assert champion_metrics("m", "champion") is None
    with mlflow.start_run():
        first = log_and_register(
            bundle, bundle_metadata(), "m", "champion", {**metrics(0.7).to_tags("candidate")}, description="first"
        )
        second = log_and_register(
            bundle, bundle_metadata(), "m", "challenger", {**metrics(0.9, data="d2").to_tags("candidate")}
        )
    client = MlflowClient()
    assert client.get_model_version("m", first.version).tags[STATUS_TAG] == "ready"
    current = champion_metrics("m", "champion")
    assert current == metrics(0.7, version=str(first.version))

    promoted = promote("m", str(second.version), "champion", "reviewed the new data set")
    assert str(client.get_model_version_by_alias("m", "champion").version) == str(second.version)
    # The gate's own record stays; the promotion is recorded beside it and in the alias history.
    assert f"{GATE_PREFIX}reason" not in promoted.tags  # registered by hand above, without a gate decision
    assert promoted.tags["bonetumor.promotion_reason"] == "reviewed the new data set"
    assert promoted.tags["bonetumor.role"] == "champion"
    assert "challenger" not in promoted.aliases
    demoted = client.get_model_version("m", first.version)
    assert demoted.tags["bonetumor.role"] == "former-champion"
    assert (
        demoted.tags["bonetumor.demoted_reason"] == f"replaced by version {second.version}: reviewed the new data set"
    )
    history = promotion_history("m")
    assert [(e.action, e.alias, e.from_version, e.to_version) for e in history] == [
        ("register", "champion", None, str(first.version)),
        ("register", "challenger", None, str(second.version)),
        ("promote", "champion", str(first.version), str(second.version)),
    ]
    assert history[-1].user  # the OS user when no MLflow user is set
    assert (history[-1].gate["to"] or {})["fold_f1_macro_mean"] == 0.9
    # Back to the earlier champion, by the history; and a lower-figure promotion needs --force.
    event = rollback("m", "champion", "the new data set was mislabelled")
    assert (event.from_version, event.to_version) == (str(second.version), str(first.version))
    assert str(client.get_model_version_by_alias("m", "champion").version) == str(first.version)
    promote("m", str(second.version), "champion", "relabelled and reviewed")  # higher figures: no --force needed
    with pytest.raises(PromotionRefusedError, match=r"is lower than @champion.*pass --force"):
        promote("m", str(first.version), "champion", "worse on purpose")
    forced = promote("m", str(first.version), "champion", "worse on purpose", force=True)
    assert forced.tags["bonetumor.role"] == "champion"
    assert promotion_history("m")[-1].forced is True

    # A version whose registration never finished cannot be promoted.
    client.set_model_version_tag("m", first.version, STATUS_TAG, "pending")
    with pytest.raises(ArtifactError, match="not 'ready'"):
        promote("m", str(first.version), "champion", "no")


def test_decision_tags_name_the_alias() -> None:
    tags = GateDecision(False, "why").to_tags("challenger")
    assert tags == {f"{GATE_PREFIX}decision": "challenger", f"{GATE_PREFIX}reason": "why"}
