"""The champion gate: does a newly trained model replace the served one?

A candidate becomes ``champion`` only when all hold:

* its referral rule found a confidence threshold whose accepted out-of-fold predictions meet the error and
  protected-class (viable tumour) recall targets by their conservative bounds; a rule that must refer every tile
  (a constant predictor's, for one) does not pass;
* with ``register.require_beats_baseline`` (the default), its mean per-fold macro-F1 beats the colour-histogram
  baseline's on the same folds (``beats_baseline``);
* it was scored on the same data version and the same folds as the current champion, and its mean per-fold
  (out-of-fold) macro-F1 is higher; a champion scored on other data or folds cannot be compared, so the candidate
  waits as ``challenger`` until someone promotes it on purpose (``bonetumor promote``).

With no champion yet, the last condition does not apply. Every decision, with both sides' figures, is written on
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
        target_met: Whether the referral rule met its error and recall targets (by their bounds).
        data_version: Content hash of the data set it was cross-validated on.
        folds_digest: Hash of the folds file it was cross-validated on.
        baseline_fold_f1_macro_mean: The baseline's mean per-fold macro-F1 on the same folds (None: not scored,
            e.g. a version registered before the baseline existed).
        beats_baseline: Whether ``fold_f1_macro_mean`` is higher than the baseline's (None: no baseline).
    """

    version: str
    fold_f1_macro_mean: float
    target_recall: float | None
    target_met: bool
    data_version: str
    folds_digest: str
    baseline_fold_f1_macro_mean: float | None = None
    beats_baseline: bool | None = None

    def to_tags(self, role: str) -> dict[str, str]:
        """Return the figures as model-version tags under ``bonetumor.registry.gate.<role>.``."""
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
            # Absent on versions registered before the baseline existed.
            baseline = tags.get(f"{prefix}baseline_fold_f1_macro_mean", "")
            beats = tags.get(f"{prefix}beats_baseline", "")
            return cls(
                version=version,
                fold_f1_macro_mean=float(tags[f"{prefix}fold_f1_macro_mean"]),
                target_recall=float(recall) if recall else None,
                target_met=tags[f"{prefix}target_met"] == "True",
                data_version=tags[f"{prefix}data_version"],
                folds_digest=tags[f"{prefix}folds_digest"],
                baseline_fold_f1_macro_mean=float(baseline) if baseline else None,
                beats_baseline=None if not beats else beats == "True",
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


def decide(
    candidate: GateMetrics,
    champion: GateMetrics | None,
    target: float,
    target_class: str,
    require_beats_baseline: bool = True,
) -> GateDecision:
    """Decide whether ``candidate`` replaces ``champion``.

    Args:
        candidate: The new model's figures.
        champion: The current champion's figures, or None when there is none.
        target: The recall target of the protected class (``referral.target_recall``).
        target_class: The protected class's name, for the reason.
        require_beats_baseline: Keep a candidate that does not beat the baseline as challenger.

    Returns:
        The decision with a one-sentence reason naming both sides' figures.
    """
    recall = "n/a" if candidate.target_recall is None else f"{candidate.target_recall:.3f}"
    if not candidate.target_met:
        return GateDecision(
            False,
            "the referral rule refers every tile: no confidence threshold's accepted out-of-fold predictions meet "
            f"the error and {target_class} recall (>= {target:.3f}) targets by their Clopper-Pearson bounds",
        )
    baseline = candidate.baseline_fold_f1_macro_mean
    versus = "" if baseline is None else f"; baseline (colour-histogram random forest) {baseline:.4f}"
    if require_beats_baseline and candidate.beats_baseline is not True:
        return GateDecision(
            False,
            f"mean per-fold macro-F1 {candidate.fold_f1_macro_mean:.4f} does not beat the baseline's "
            + ("(not scored)" if baseline is None else f"{baseline:.4f} (colour-histogram random forest, same folds)"),
        )
    if champion is None:
        return GateDecision(
            True,
            f"no champion yet; mean per-fold macro-F1 {candidate.fold_f1_macro_mean:.4f}{versus}; referral targets "
            f"met ({target_class} recall of accepted predictions {recall})",
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


def registration_allowed(comparison: dict[str, Any], min_macro_f1: float) -> tuple[bool, str]:
    """Whether the evaluation allows the refit and registration of its winner, and why.

    Args:
        comparison: ``comparison.json`` (``winner`` and ``scores``).
        min_macro_f1: ``register.min_macro_f1``.

    Returns:
        ``(allowed, reason)``: allowed when there is a winner whose mean per-fold macro-F1 reaches the minimum.
    """
    winner = comparison.get("winner")
    if not winner or winner not in comparison.get("scores", {}):
        return False, "no architecture finished its cross-validation, so there is nothing to register"
    try:
        f1 = float(comparison["scores"][winner]["fold_f1_macro_mean"])
    except (KeyError, TypeError, ValueError):
        return False, f"the evaluation has no mean per-fold macro-F1 (fold_f1_macro_mean) for its winner {winner!r}"
    relation = ">=" if f1 >= min_macro_f1 else "<"
    return (
        f1 >= min_macro_f1,
        f"{winner}: mean per-fold macro-F1 {f1:.3f} {relation} register.min_macro_f1 {min_macro_f1}",
    )
