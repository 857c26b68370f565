"""The candidate protocol: what every model scored on the folds implements, and the data it is given.

A :class:`Candidate` is a recipe (the colour-histogram baseline, a torchvision architecture, the two-stage
classifier, a pruned VGG, an INT8 copy, the ensemble...). The cross-validation loop
(:mod:`bonetumor.training.cross_validation`) treats them all alike: for every fold it calls :meth:`Candidate.fit`
with the fold's :class:`FoldData` (and the fitted models of the candidates it builds on, :attr:`Candidate.bases`),
then asks the returned :class:`FittedModel` for the logits of the fold's validation tiles, for its CPU latency and,
where the candidate is exported, for a bundle. The refit on all training tiles runs the same :meth:`Candidate.fit`
on a :class:`TrainingSet` without validation tiles.

Adding a model is one module in this package that subclasses :class:`Candidate` and lists its ``from_config`` in
:data:`bonetumor.training.candidates.KINDS`, plus the params entry that switches it on.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import pandas as pd
import torch

from bonetumor.config import Config
from bonetumor.data.datasets import label_indices
from bonetumor.data.manifest import resolve_paths
from bonetumor.errors import DatasetError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.transforms.augment import AugmentPolicy
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.utils import EtaTimer

#: Where a candidate's entry goes in ``runs.json``: the bar to beat, a refittable architecture, or another model.
Section = Literal["baseline", "architectures", "candidates"]


class CandidateUnavailableError(DatasetError):
    """A candidate cannot be built from this data (for example a fold lacks a class one of its stages needs).

    The cross-validation loop leaves that candidate (and the candidates built on it) out, records why, and goes on
    with the others.
    """


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """The tiles one fit trains on.

    Attributes:
        name: ``fold-<k>`` or ``full`` (the refit).
        train_table: The balanced training table (``file``, ``label``, ``synthetic``; real and GAN tiles).
        fit_table: The rows to fit on: ``train_table`` less the early-stopping rows.
        stop_rows: Real tiles of whole groups held out to early-stop on, or None (no early stopping).
        stain: The stain normaliser fitted on the real training tiles, or None.
        seed: Seed of this fit (``train.seed`` + fold index in the folds, ``train.seed`` in the refit).
        steps: Fixed optimiser steps (the refit), or None for ``train.steps`` with early stopping.
    """

    name: str
    train_table: pd.DataFrame
    fit_table: pd.DataFrame
    stop_rows: pd.DataFrame | None
    stain: StainNormalizer | None
    seed: int
    steps: int | None = None

    @property
    def real_rows(self) -> pd.DataFrame:
        """The real (not GAN-made) rows of the training table."""
        return self.train_table[~self.train_table["synthetic"].astype(bool)]


@dataclasses.dataclass(frozen=True)
class FoldData(TrainingSet):
    """One fold: its training set and the validation tiles the fitted model is scored on.

    Attributes:
        fold: Fold index.
        n_folds: Number of folds.
        val_rows: The fold's validation rows of the manifest (``path``, ``label``, ``slide``, ``case``).
        val_groups: The slides or cases those rows come from.
        dataset_dir: The folder the manifest's paths are relative to.
    """

    fold: int = 0
    n_folds: int = 1
    val_rows: pd.DataFrame = dataclasses.field(default_factory=pd.DataFrame)
    val_groups: tuple[str, ...] = ()
    dataset_dir: Path = Path()

    @property
    def val_files(self) -> list[Path]:
        """The validation tiles' files."""
        return resolve_paths(self.val_rows, self.dataset_dir)

    def val_labels(self, classes: Sequence[str]) -> np.ndarray:
        """The validation tiles' class indices in ``classes`` order."""
        return np.asarray(label_indices(self.val_rows["label"], classes), dtype=np.int64)

    @property
    def title(self) -> str:
        """``fold 2/3``, for progress lines."""
        return f"fold {self.fold + 1}/{self.n_folds}"


@dataclasses.dataclass
class FitContext:
    """What a fit needs besides its tiles; the same for every candidate of a run.

    Attributes:
        config: The whole config (a candidate applies ``config.for_arch`` itself).
        policy: The augmentation policy.
        device: Where to train.
        timer: The stage's ETA timer, stepped per optimiser step.
        checkpoints: Folder of this candidate's checkpoints for this fit, or None (no checkpointing).
        fingerprint: Identifies what the fit computes from; a checkpoint made from anything else is not resumed.
        on_eval: Called with each evaluation's metrics (MLflow step metrics), or None.
        scratch: A folder that lives for this fold only (ONNX files of an INT8 candidate).
    """

    config: Config
    policy: AugmentPolicy
    device: torch.device
    timer: EtaTimer
    checkpoints: Path | None = None
    fingerprint: str = ""
    on_eval: Callable[[dict[str, float]], None] | None = None
    scratch: Path = dataclasses.field(default_factory=lambda: Path(tempfile.gettempdir()))


class FittedModel(Protocol):
    """A trained candidate: it predicts tiles, times itself and exports itself."""

    def logits(self, files: Sequence[Path]) -> np.ndarray:
        """Return ``(len(files), n_classes)`` float32 logits (softmax gives the class probabilities)."""
        ...

    def latency_ms(self, tile_size: int, batch: int) -> float:
        """Return the median CPU milliseconds per tile on a batch of ``batch`` preprocessed tiles."""
        ...

    def metrics(self) -> dict[str, float]:
        """Return figures of the fit worth logging on its fold run (best step, pruning ratios...)."""
        ...

    def tags(self) -> dict[str, str]:
        """Return tags for its fold run (how it was quantised...)."""
        ...

    def export(
        self,
        out_dir: Path,
        provenance: Mapping[str, Any] | None = None,
        referral: ReferralPolicy | None = None,
    ) -> Path:
        """Write the model into ``out_dir`` in a form that loads without this process, and return the folder.

        Args:
            out_dir: The folder to write.
            provenance: What made the model (data version, runs, scores...), recorded beside it.
            referral: The calibrated referral rule it is to be served with, recorded beside it.
        """
        ...


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Return the softmax of logits, row by row (float64)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


class Candidate(abc.ABC):
    """A model recipe scored on the folds.

    Attributes:
        name: The candidate's name: its output folder, its out-of-fold file, its MLflow run ``cv-<name>``.
        kind: What sort of model it is (``baseline``, ``architecture``, ``two_stage``...), recorded in runs.json.
        section: Where runs.json lists it.
        bases: Names of the candidates whose fitted fold models :meth:`fit` receives (empty for most).
        arch: The torchvision architecture it is built from, if any (its per-architecture settings apply).
    """

    kind: ClassVar[str]
    section: ClassVar[Section] = "candidates"
    #: params.yaml sections its parent MLflow run records.
    param_sections: ClassVar[tuple[str, ...]] = ("data", "preprocess", "split", "augment", "balance", "train")

    def __init__(self, name: str, arch: str | None = None, bases: Sequence[str] = ()) -> None:
        self.name = name
        self.arch = arch
        self.bases = tuple(bases)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def settings(self, config: Config) -> Config:
        """Return the config this candidate trains with (its architecture's ``per_arch`` overrides applied)."""
        return config.for_arch(self.arch) if self.arch else config

    @abc.abstractmethod
    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> FittedModel:
        """Train on ``data`` (a fold, or the full training set) and return the fitted model.

        Raises:
            CandidateUnavailableError: The data cannot train this candidate.
        """

    def planned_steps(self, config: Config, n_folds: int) -> int:
        """Return the optimiser steps its cross-validation runs at most (for the ETA); 0 when it has none."""
        return 0

    def mlflow_params(self, config: Config) -> dict[str, Any]:
        """Return what its parent MLflow run records as params besides :attr:`param_sections` and ``arch``."""
        return {}

    def run_tags(self) -> dict[str, str]:
        """Return tags its MLflow runs carry (for example where its starting weights came from)."""
        return {}

    def after_fold(
        self, fitted: FittedModel, fold: FoldData, oof: pd.DataFrame, out_dir: Path
    ) -> list[tuple[Path, str | None]]:
        """Write per-fold artifacts (a Grad-CAM gallery...) into ``out_dir``; return (file, MLflow folder) pairs."""
        return []

    def fold_record(self, fitted: FittedModel, fold: FoldData) -> dict[str, Any]:
        """Return what runs.json keeps of one fold besides its index and MLflow run (nothing by default)."""
        return {}

    def summary(self, folds: list[dict[str, Any]], scores: list[float], out_dir: Path) -> dict[str, Any]:
        """Return its runs.json entry (the loop adds ``run_id``); may write summary files into ``out_dir``.

        Args:
            folds: Per fold, ``fold``, ``run_id`` and :meth:`fold_record`.
            scores: Per fold, the macro-F1 of its validation tiles.
            out_dir: The candidate's output folder.
        """
        return {"base": self.arch, "kind": self.kind}

    def summary_artifacts(self, out_dir: Path) -> list[tuple[Path, str | None]]:
        """Return (file or folder, MLflow folder) pairs for its parent run; missing ones are skipped."""
        return []

    def combine_logits(self, members: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float], dict[str, str]]:
        """Return a fold's logits from its bases' out-of-fold logits, with the fold run's metrics and tags.

        Cross-validation fans out per fold and per architecture (a Kubeflow task each), so a candidate built on
        several architectures is scored when their folds are gathered, from their predictions alone.

        Raises:
            CandidateUnavailableError: This candidate needs its bases' fitted models, not just their predictions.
        """
        raise CandidateUnavailableError(
            f"{self.name} is built on {list(self.bases)}, and only a candidate that combines their predictions "
            "(the ensemble) can be built on more than one architecture"
        )


def median_step(best_steps: Sequence[float]) -> int:
    """Return the refit length: the median of the folds' best steps, rounded up, at least 1."""
    return max(1, math.ceil(statistics.median(best_steps)))
