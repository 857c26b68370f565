"""The alias history on a real sqlite MLflow store: promotions, rollbacks, registrations, the JSONL mirror."""

from __future__ import annotations

import getpass
import itertools
import json
import os
import pwd
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import bundle_metadata
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient
from test_gate import metrics

from bonetumor.config import TrackingConfig
from bonetumor.errors import (
    ArtifactError,
    ConfigError,
    ModelNotFoundError,
    PromotionRefusedError,
    RegistryUnavailableError,
)
from bonetumor.registry.gate import GATE_PREFIX, GateMetrics
from bonetumor.registry.model_registry import STATUS_TAG, log_and_register, promote
from bonetumor.registry.promotions import (
    EVENT_PREFIX,
    MAX_EVENT_CHARS,
    ROLE_TAG,
    PromotionEvent,
    alias_holder,
    current_user,
    format_history,
    promotion_history,
    read_mirror,
    record_registration,
    rollback,
)
from bonetumor.registry.tracking import setup_mlflow
from bonetumor.serving.predictor import save_bundle
from bonetumor.training.models import build_model

USER_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "LOGNAME", "USER", "LNAME", "USERNAME")
_names = itertools.count(1)


@dataclass
class Registry:
    """One registered model in the module's sqlite store (its tables are created once, ~5 s)."""

    client: MlflowClient
    name: str
    mirror: Path
    source: Path

    def add(self, f1: float | None, decision: str = "challenger", reason: str = "", status: str = "ready") -> str:
        """A new model version with the gate's tags (``f1`` None: none, as before the gate existed)."""
        tags = {STATUS_TAG: status, f"{GATE_PREFIX}decision": decision, f"{GATE_PREFIX}reason": reason or decision}
        if f1 is not None:
            tags.update(metrics(f1).to_tags("candidate"))
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name)
        return str(self.client.create_model_version(self.name, source=str(self.source), tags=tags).version)

    def register(self, alias: str, f1: float | None, reason: str = "") -> str:
        """What the gate does in ``log_and_register``, without logging a model: a version, the alias, the event."""
        former = alias_holder(self.name, alias)
        number = self.add(f1, decision=alias, reason=reason or f"gate: {alias}")
        self.client.set_registered_model_alias(self.name, alias, number)
        record_registration(
            self.name,
            number,
            alias,
            reason or f"gate: {alias}",
            self.mirror,
            from_version=None if former is None else str(former.version),
        )
        return number

    def tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.name, version).tags)

    def holder(self, alias: str) -> str:
        return str(self.client.get_model_version_by_alias(self.name, alias).version)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("promotions")
    uri = f"sqlite:///{root}/mlflow.db"
    setup_mlflow(TrackingConfig(uri=uri, experiment="promotions"), root)
    return uri


@pytest.fixture
def registry(store: str, tmp_path: Path) -> Registry:
    mlflow.set_tracking_uri(store)
    return Registry(MlflowClient(), f"m{next(_names)}", tmp_path / "log" / "promotions.jsonl", tmp_path)


def test_promote_keeps_the_gate_record_clears_challenger_and_tags_the_demoted_version(registry: Registry) -> None:
    first = registry.register("champion", 0.70, "no champion yet")
    second = registry.register("challenger", 0.90, "not comparable: other data")
    promoted = promote(registry.name, second, "champion", "reviewed the new data set", mirror=registry.mirror)

    assert registry.holder("champion") == second
    assert "challenger" not in promoted.aliases
    with pytest.raises(MlflowException):
        registry.client.get_model_version_by_alias(registry.name, "challenger")
    new, old = registry.tags(second), registry.tags(first)
    # The gate's original record stays on both versions.
    assert (new[f"{GATE_PREFIX}decision"], new[f"{GATE_PREFIX}reason"]) == ("challenger", "not comparable: other data")
    assert (old[f"{GATE_PREFIX}decision"], old[f"{GATE_PREFIX}reason"]) == ("champion", "no champion yet")
    assert new[ROLE_TAG] == "champion"
    assert new["bonetumor.promotion_reason"] == "reviewed the new data set"
    assert new["bonetumor.promoted_by"] == current_user()
    assert datetime.fromisoformat(new["bonetumor.promoted_at"]).utcoffset() is not None
    assert old[ROLE_TAG] == "former-champion"
    assert old["bonetumor.demoted_reason"] == f"replaced by version {second}: reviewed the new data set"
    assert old["bonetumor.demoted_by"] == current_user()
    assert old["bonetumor.demoted_at"] == new["bonetumor.promoted_at"]

    event = promotion_history(registry.name, "champion")[-1]
    assert (event.action, event.from_version, event.to_version, event.forced) == ("promote", first, second, False)
    assert event.reason == "reviewed the new data set"
    assert event.gate["to"] == asdict(metrics(0.90, version=second))
    assert event.gate["from"] == asdict(metrics(0.70, version=first))
    assert datetime.fromisoformat(event.at).utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_promote_refuses_what_it_cannot_record(registry: Registry) -> None:
    first = registry.register("champion", 0.70)
    pending = registry.add(0.9, status="pending")
    with pytest.raises(ConfigError, match="needs a reason"):
        promote(registry.name, first, "champion", "  ")
    with pytest.raises(ModelNotFoundError, match="expected an existing version"):
        promote(registry.name, "99", "champion", "why")
    with pytest.raises(ArtifactError, match="not 'ready'"):
        promote(registry.name, pending, "champion", "why")
    assert registry.holder("champion") == first
    assert len(promotion_history(registry.name)) == 1


def test_a_store_that_does_not_answer_is_not_taken_for_no_holder(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = registry.register("champion", 0.80)
    worse = registry.add(0.70)

    def down(*args: object) -> None:
        raise MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", down)
    with pytest.raises(RegistryUnavailableError, match="did not answer"):
        promote(registry.name, worse, "champion", "would skip the figure check")
    monkeypatch.undo()
    assert registry.holder("champion") == first


def test_user_is_the_mlflow_user_else_the_os_user_even_without_user_set(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in USER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    os_user = pwd.getpwuid(os.getuid()).pw_name
    assert current_user() == os_user
    registry.register("champion", 0.7)
    second = registry.add(0.8)
    promote(registry.name, second, "champion", "by the OS user")
    assert promotion_history(registry.name)[-1].user == os_user
    assert registry.tags(second)["bonetumor.promoted_by"] == os_user

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    third = registry.add(0.9)
    promote(registry.name, third, "champion", "by the MLflow user")
    assert promotion_history(registry.name)[-1].user == "alice"
    assert registry.tags(third)["bonetumor.promoted_by"] == "alice"
    assert registry.tags(second)["bonetumor.demoted_by"] == "alice"

    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found")

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.setattr(getpass, "getuser", no_user)
    assert current_user() == "unknown"


def test_a_promotion_that_lowers_the_figures_needs_force_and_is_recorded_as_forced(registry: Registry) -> None:
    first = registry.register("champion", 0.80)
    worse = registry.add(0.70)
    with pytest.raises(PromotionRefusedError, match=r"0\.7000.*0\.8000.*--force"):
        promote(registry.name, worse, "champion", "the new data set is the right one")
    assert registry.holder("champion") == first
    assert [e.action for e in promotion_history(registry.name)] == ["register"]

    promote(registry.name, worse, "champion", "the new data set is the right one", force=True, mirror=registry.mirror)
    assert registry.holder("champion") == worse
    event = promotion_history(registry.name)[-1]
    assert event.forced
    assert (event.gate["from"] or {})["fold_f1_macro_mean"] == 0.80
    assert (event.gate["to"] or {})["fold_f1_macro_mean"] == 0.70
    assert "yes" in format_history([event]).splitlines()[1].split()

    # Force is only needed, and recorded, when the figures would drop; versions without gate tags are not compared.
    better = registry.add(0.75)
    promote(registry.name, better, "champion", "better again", force=True)
    assert not promotion_history(registry.name)[-1].forced
    untagged = registry.add(None)
    promote(registry.name, untagged, "champion", "registered before the gate")
    last = promotion_history(registry.name)[-1]
    assert (last.forced, last.gate["to"]) == (False, None)


def test_rollback_restores_the_previous_holder_and_records_it(registry: Registry) -> None:
    first = registry.register("champion", 0.70)
    with pytest.raises(PromotionRefusedError, match="names no version that held @champion before"):
        rollback(registry.name, "champion", "nothing to go back to")
    with pytest.raises(PromotionRefusedError, match="points at no version"):
        rollback(registry.name, "staging", "never set")
    second = registry.add(0.90)
    promote(registry.name, second, "champion", "reviewed")
    with pytest.raises(ConfigError, match="needs a reason"):
        rollback(registry.name, "champion", "")

    event = rollback(registry.name, "champion", "slides from the new scanner are misread", mirror=registry.mirror)
    assert registry.holder("champion") == first
    assert (event.action, event.from_version, event.to_version) == ("rollback", second, first)
    assert event.reason == "slides from the new scanner are misread"
    assert (event.gate["to"] or {})["fold_f1_macro_mean"] == 0.70  # never refused for figures
    assert promotion_history(registry.name)[-1] == event
    assert read_mirror(registry.mirror)[-1] == event
    restored, left = registry.tags(first), registry.tags(second)
    assert restored[ROLE_TAG] == "champion"
    assert restored["bonetumor.promotion_reason"].startswith(f"rollback from version {second}: slides")
    assert restored[f"{GATE_PREFIX}decision"] == "champion"
    assert left[ROLE_TAG] == "former-champion"
    assert left["bonetumor.demoted_reason"].startswith(f"replaced by version {first}: rollback")

    # The earlier holder must still be servable.
    registry.client.set_model_version_tag(registry.name, second, STATUS_TAG, "pending")
    with pytest.raises(ArtifactError, match="not 'ready'"):
        rollback(registry.name, "champion", "back again")
    assert registry.holder("champion") == first


def test_history_is_append_only_in_order_and_the_mirror_matches(registry: Registry) -> None:
    first = registry.register("champion", 0.70)
    snapshot = dict(registry.client.get_registered_model(registry.name).tags)
    second = registry.register("challenger", 0.75)
    promote(registry.name, second, "champion", "reviewed", mirror=registry.mirror)
    rollback(registry.name, "champion", "second thoughts", mirror=registry.mirror)

    tags = registry.client.get_registered_model(registry.name).tags
    keys = sorted(k for k in tags if k.startswith(EVENT_PREFIX))
    assert keys == [f"{EVENT_PREFIX}{n:06d}" for n in (1, 2, 3, 4)]
    assert all(tags[k] == v for k, v in snapshot.items())  # earlier events are never rewritten
    history = promotion_history(registry.name)
    assert [e.sequence for e in history] == [1, 2, 3, 4]
    assert [(e.action, e.alias, e.from_version, e.to_version) for e in history] == [
        ("register", "champion", None, first),
        ("register", "challenger", None, second),
        ("promote", "champion", first, second),
        ("rollback", "champion", second, first),
    ]
    assert [e.alias for e in promotion_history(registry.name, "challenger")] == ["challenger"]
    assert read_mirror(registry.mirror) == history
    lines = registry.mirror.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(tags[k]) for k in keys]
    assert [PromotionEvent.from_dict(e.to_dict()) for e in history] == history

    table = format_history(history).splitlines()
    assert table[0].split()[:4] == ["#", "at", "(UTC)", "action"]
    assert f"{first} -> {second}" in table[3]
    assert "0.7000 -> 0.7500" in table[3]
    assert table[4].endswith("second thoughts")
    assert format_history([]) == "no alias change recorded"
    assert promotion_history("no-such-model") == []


def test_a_long_reason_is_cut_to_fit_the_tag_and_says_so(registry: Registry) -> None:
    registry.register("champion", 0.7)
    second = registry.add(0.8)
    reason = 'é"\\' * 4000  # JSON escapes make the stored text longer than the reason
    promote(registry.name, second, "champion", reason)
    value = registry.client.get_registered_model(registry.name).tags[f"{EVENT_PREFIX}000002"]
    assert len(value) <= MAX_EVENT_CHARS
    event = promotion_history(registry.name)[-1]
    assert event.reason.startswith('é"\\é')
    assert len(value) > MAX_EVENT_CHARS - 12  # cut no more than needed
    assert event.reason.endswith(f"tag value; the reason had {len(reason)} characters]")


def test_damaged_records_are_named(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="lacks"):
        PromotionEvent.from_dict({"sequence": 1})
    mirror = tmp_path / "promotions.jsonl"
    mirror.write_text('{"sequence": 1}\n')
    with pytest.raises(ArtifactError, match=r"promotions.jsonl:1 is not a promotion event"):
        read_mirror(mirror)
    assert read_mirror(tmp_path / "absent.jsonl") == []


def test_registration_records_the_gate_event_and_demotes_the_former_champion(
    registry: Registry, one_torch_thread: None
) -> None:
    mlflow.set_experiment("promotions")
    torch.manual_seed(0)
    bundle = save_bundle(build_model("resnet50", 3).eval(), bundle_metadata(), registry.source / "bundle")
    gate = {**metrics(0.7).to_tags("candidate"), f"{GATE_PREFIX}decision": "champion"}
    with mlflow.start_run():
        first = log_and_register(
            bundle, bundle_metadata(), registry.name, "champion", {**gate, f"{GATE_PREFIX}reason": "no champion yet"}
        )
        second = log_and_register(
            bundle,
            bundle_metadata(),
            registry.name,
            "champion",
            {
                **metrics(0.8).to_tags("candidate"),
                f"{GATE_PREFIX}decision": "champion",
                f"{GATE_PREFIX}reason": "beats",
            },
            mirror=registry.mirror,
        )
    one, two = str(first.version), str(second.version)
    history = promotion_history(registry.name)
    assert [(e.action, e.alias, e.from_version, e.to_version, e.reason) for e in history] == [
        ("register", "champion", None, one, "no champion yet"),
        ("register", "champion", one, two, "beats"),
    ]
    assert history[1].gate["from"] == asdict(GateMetrics.from_tags(registry.tags(one), one))
    assert read_mirror(registry.mirror) == history[1:]  # only the second registration was given the mirror
    former, new = registry.tags(one), registry.tags(two)
    assert former[f"{GATE_PREFIX}decision"] == "champion"  # the gate's record at the time stays
    assert former[ROLE_TAG] == "former-champion"
    assert former["bonetumor.demoted_reason"] == f"replaced by version {two}: registration: beats"
    assert new[ROLE_TAG] == "champion"
    # The registered version rolls back like any other.
    assert rollback(registry.name, "champion", "regression").to_version == one
