"""Every model scored on the folds, each one implementation of the candidate protocol (:mod:`.base`).

=============  ===================================================  =====================================
module         candidates                                           switched on by
=============  ===================================================  =====================================
``baseline``   ``baseline``: colour histograms into a random forest  always (the bar to beat)
``network``    one per architecture (``resnet50``, ``vgg19_bn``...)  ``train.architectures``
``ensemble``   ``ensemble``: soft vote of the architectures           two or more architectures
``two_stage``  ``two_stage_<arch>``: tumour?, then viable?            ``candidates.two_stage``
``pruned``     ``<vgg>_pruned``: filters pruned, fine-tuned           ``candidates.pruned_vgg19``
``int8``       ``<arch>_int8``: ONNX Runtime INT8                     ``candidates.int8``
=============  ===================================================  =====================================

:func:`build_candidates` asks every kind of :data:`KINDS`, in order, which candidates params.yaml asks for. A
candidate built on others (:attr:`Candidate.bases`) comes after them.
"""

from __future__ import annotations

from collections.abc import Callable

from bonetumor.config import Config
from bonetumor.errors import ConfigError
from bonetumor.training.candidates.base import (
    Candidate,
    CandidateUnavailableError,
    FitContext,
    FittedModel,
    FoldData,
    TrainingSet,
)
from bonetumor.training.candidates.baseline import BaselineCandidate
from bonetumor.training.candidates.ensemble import EnsembleCandidate
from bonetumor.training.candidates.int8 import Int8Candidate
from bonetumor.training.candidates.network import NetworkCandidate
from bonetumor.training.candidates.pruned import PrunedCandidate
from bonetumor.training.candidates.two_stage import TwoStageCandidate

#: Kind name to the function that reads params.yaml and returns that kind's candidates (maybe none).
KINDS: dict[str, Callable[[Config], list[Candidate]]] = {
    "baseline": BaselineCandidate.from_config,
    "architecture": NetworkCandidate.from_config,
    "ensemble": EnsembleCandidate.from_config,
    "two_stage": TwoStageCandidate.from_config,
    "pruned": PrunedCandidate.from_config,
    "int8": Int8Candidate.from_config,
}

__all__ = [
    "KINDS",
    "Candidate",
    "CandidateUnavailableError",
    "FitContext",
    "FittedModel",
    "FoldData",
    "TrainingSet",
    "build_candidates",
]


def build_candidates(config: Config) -> list[Candidate]:
    """Return every candidate params.yaml asks for, each after the candidates it is built on.

    Raises:
        ConfigError: Two candidates share a name, or one is built on a candidate that is not there.
    """
    candidates = [candidate for kind in KINDS.values() for candidate in kind(config)]
    names: set[str] = set()
    for candidate in candidates:
        if candidate.name in names:
            raise ConfigError(f"two candidates are named {candidate.name!r}; expected unique names")
        missing = [base for base in candidate.bases if base not in names]
        if missing:
            raise ConfigError(
                f"candidate {candidate.name!r} is built on {missing}, which no earlier candidate provides; "
                f"expected them among {sorted(names)}"
            )
        names.add(candidate.name)
    return candidates
