"""The champion gate: does a newly trained model replace the served one?

A candidate becomes ``champion`` only when both hold:

* it was scored on the same data version and the same folds as the current champion, and its mean per-fold
  (out-of-fold) macro-F1 is higher; a champion scored on other data or folds cannot be compared, so the candidate
  waits as ``challenger`` until someone promotes it on purpose (``bonetumor promote``);
* its referral rule keeps the recall of the protected class (viable tumour) at or above the target on the
  out-of-fold predictions it accepts.

With no champion yet, only the second condition applies. Every decision, with both sides' figures, is written on
the model version as tags, so an auditor can read why a version is or is not served.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bonetumor.errors import ArtifactError

#: Tag namespace of the gate's decision on a model version.
GATE_PREFIX = "bonetumor.gate."


@dataclass(frozen=True)
class GateMetrics:
    """What the gate compares, for one model version.

    Attributes:
        version: Registered model version ("" for the candidate before registration).
        fold_f1_macro_mean: Mean per-fold out-of-fold macro-F1.
        target_recall: Recall of the protected class among accepted out-of-fold predictions.
        target_met: Whether the referral rule reached its recall target.
        data_version: Content hash of the data set it was cross-validated on.
        folds_digest: Hash of the folds file it was cross-validated on.
    """

    version: str
    fold_f1_macro_mean: float
    target_recall: float | None
    target_met: bool
    data_version: str
    folds_digest: str

    def to_tags(self, role: str) -> dict[str, str]:
        """Return the figures as model-version tags under ``bonetumor.gate.<role>.``."""
        return {
            f"{GATE_PREFIX}{role}.{key}": "" if value is None else str(value)
            for key, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str], version: str) -> GateMetrics:
        """Rebuild the figures a version was registered with from its ``bonetumor.gate.candidate.*`` tags.

        Raises:
            ArtifactError: A tag is missing or malformed (a version registered before the gate existed).
        """
        prefix = f"{GATE_PREFIX}candidate."
        try:
            recall = tags[f"{prefix}target_recall"]
            return cls(
                version=version,
                fold_f1_macro_mean=float(tags[f"{prefix}fold_f1_macro_mean"]),
                target_recall=float(recall) if recall else None,
                target_met=tags[f"{prefix}target_met"] == "True",
                data_version=tags[f"{prefix}data_version"],
                folds_digest=tags[f"{prefix}folds_digest"],
            )
        except (KeyError, ValueError) as exc:
            raise ArtifactError(
                f"model version {version} has no readable gate tags ({exc}); expected {prefix}fold_f1_macro_mean, "
                "target_recall, target_met, data_version and folds_digest"
            ) from exc


@dataclass(frozen=True)
class GateDecision:
    """The outcome: which alias the candidate gets, and why."""

    promote: bool
    reason: str

    def to_tags(self, alias: str) -> dict[str, str]:
        """Return the decision as model-version tags."""
        return {f"{GATE_PREFIX}decision": alias, f"{GATE_PREFIX}reason": self.reason}


def decide(candidate: GateMetrics, champion: GateMetrics | None, target: float, target_class: str) -> GateDecision:
    """Decide whether ``candidate`` replaces ``champion``.

    Args:
        candidate: The new model's figures.
        champion: The current champion's figures, or None when there is none.
        target: The recall target of the protected class (``referral.target_recall``).
        target_class: The protected class's name, for the reason.

    Returns:
        The decision with a one-sentence reason naming both sides' figures.
    """
    recall = "n/a" if candidate.target_recall is None else f"{candidate.target_recall:.3f}"
    if not candidate.target_met:
        return GateDecision(
            False,
            f"{target_class} recall of accepted out-of-fold predictions is {recall}, below the target {target:.3f}",
        )
    if champion is None:
        return GateDecision(
            True,
            f"no champion yet; {target_class} recall of accepted predictions {recall} meets the target {target:.3f}",
        )
    if (candidate.data_version, candidate.folds_digest) != (champion.data_version, champion.folds_digest):
        return GateDecision(
            False,
            f"champion version {champion.version} was scored on data {champion.data_version[:12]} / folds "
            f"{champion.folds_digest[:12]}, the candidate on data {candidate.data_version[:12]} / folds "
            f"{candidate.folds_digest[:12]}: not comparable; promote by hand after review (`bonetumor promote`)",
        )
    if candidate.fold_f1_macro_mean > champion.fold_f1_macro_mean:
        return GateDecision(
            True,
            f"mean per-fold macro-F1 {candidate.fold_f1_macro_mean:.4f} beats champion version {champion.version}'s "
            f"{champion.fold_f1_macro_mean:.4f} on the same data and folds; {target_class} recall {recall} meets "
            f"the target {target:.3f}",
        )
    return GateDecision(
        False,
        f"mean per-fold macro-F1 {candidate.fold_f1_macro_mean:.4f} does not beat champion version "
        f"{champion.version}'s {champion.fold_f1_macro_mean:.4f} on the same data and folds",
    )


def gate_document(candidate: GateMetrics, champion: GateMetrics | None, decision: GateDecision) -> dict[str, Any]:
    """Return the decision and both sides' figures as plain data (for ``champion.json``)."""
    return {
        "promoted": decision.promote,
        "reason": decision.reason,
        "candidate": dataclasses.asdict(candidate),
        "champion": None if champion is None else dataclasses.asdict(champion),
    }
