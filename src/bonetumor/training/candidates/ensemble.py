"""The soft-vote ensemble of the architectures: the mean of their probabilities, tile by tile.

Built on each fold from that fold's architecture models, so it is scored on exactly the tiles they are. Its
logits are the log of the mean probabilities, so temperature scaling and the referral rule treat it like any other
model. It costs the sum of its members' latencies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bonetumor.config import Config
from bonetumor.errors import ConfigError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.training.candidates.base import Candidate, FitContext, FittedModel, TrainingSet, probabilities
from bonetumor.utils import write_json

#: Name of the soft-vote candidate.
ENSEMBLE = "ensemble"
#: Smallest mean probability turned into a logit.
PROBABILITY_FLOOR = 1e-12


def soft_vote(member_logits: Sequence[np.ndarray]) -> np.ndarray:
    """Return the log of the mean of the members' softmax probabilities (float32), row by row."""
    mean = np.mean([probabilities(logits) for logits in member_logits], axis=0)
    return np.log(np.clip(mean, PROBABILITY_FLOOR, 1.0)).astype(np.float32)


class EnsembleFitted:
    """Soft vote of fitted members.

    Args:
        members: Name to fitted model, in ``train.architectures`` order.
    """

    def __init__(self, members: Mapping[str, FittedModel]) -> None:
        self.members = dict(members)

    def logits(self, files: Sequence[Path]) -> np.ndarray:
        """Return the log of the members' mean probabilities."""
        return soft_vote([m.logits(files) for m in self.members.values()])

    def latency_ms(self, tile_size: int, batch: int) -> float:
        """Return the sum of the members' latencies (as each reports its own): it runs every one of them."""
        return float(sum(m.latency_ms(tile_size, batch) for m in self.members.values()))

    def metrics(self) -> dict[str, float]:
        """How many models vote."""
        return {"ensemble_members": float(len(self.members))}

    def tags(self) -> dict[str, str]:
        """Who votes."""
        return {"bonetumor.ensemble.members": ",".join(self.members)}

    def export(
        self,
        out_dir: Path,
        provenance: Mapping[str, Any] | None = None,
        referral: ReferralPolicy | None = None,
    ) -> Path:
        """Export every member into ``out_dir/<member>`` and write ``ensemble.json`` (members, rule).

        The provenance goes with every member; the referral rule (the ensemble's own) into ``ensemble.json``.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, member in self.members.items():
            member.export(out_dir / name, provenance)
        write_json(
            out_dir / "ensemble.json",
            {
                "members": list(self.members),
                "rule": "mean probability",
                "referral": None if referral is None else referral.to_dict(),
            },
        )
        return out_dir


class EnsembleCandidate(Candidate):
    """The soft vote of every architecture of ``train.architectures`` (when there are at least two)."""

    kind: ClassVar[str] = "ensemble"

    def __init__(self, members: Sequence[str]) -> None:
        super().__init__(ENSEMBLE, bases=members)

    @classmethod
    def from_config(cls, config: Config) -> list[Candidate]:
        """One ensemble of two or more architectures, none otherwise."""
        archs = list(config.train.architectures)
        return [cls(archs)] if len(archs) > 1 else []

    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> EnsembleFitted:
        """Combine the fold's member models; nothing is trained."""
        missing = [name for name in self.bases if name not in bases]
        if missing:
            raise ConfigError(
                f"ensemble: members {missing} were not fitted on {data.name}; expected all of {list(self.bases)}"
            )
        return EnsembleFitted({name: bases[name] for name in self.bases})

    def combine_logits(self, members: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float], dict[str, str]]:
        """The soft vote of the members' out-of-fold logits, as :class:`EnsembleFitted` votes on any tiles."""
        missing = [name for name in self.bases if name not in members]
        if missing:
            raise ConfigError(f"ensemble: no predictions of members {missing}; expected all of {list(self.bases)}")
        logits = soft_vote([members[name] for name in self.bases])
        return (
            logits,
            {"ensemble_members": float(len(self.bases))},
            {"bonetumor.ensemble.members": ",".join(self.bases)},
        )

    def summary(self, folds: list[dict[str, Any]], scores: list[float], out_dir: Path) -> dict[str, Any]:
        """Its members instead of a base architecture."""
        return {"base": None, "kind": self.kind, "members": list(self.bases)}
