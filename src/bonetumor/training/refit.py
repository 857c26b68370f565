"""The refit: the winning recipe applied to every training tile, for the model that is registered and served.

Each fold model saw only (k-1)/k of the slides, and picking the fold with the best validation score would pick
partly on luck. The cross-validation estimates how well the *recipe* generalises; the served model is that recipe
applied to every training tile (GAN-balanced the same way, stain-normalised to a target fitted on those tiles, from
the same starting weights), trained for the folds' median best step, since without a validation set there is
nothing to stop early on. The schedule spans ``train.steps`` as in the folds, so step ``s`` of the refit uses the
learning rate step ``s`` of a fold used.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bonetumor.config import Config
from bonetumor.data.datasets import load_training_table
from bonetumor.training.candidates import Candidate, FitContext, FittedModel, TrainingSet
from bonetumor.training.engine import select_device
from bonetumor.transforms.augment import AugmentPolicy
from bonetumor.transforms.stain import fit_from_files
from bonetumor.utils import EtaTimer

#: The balance stage's name of the set of every training tile.
FULL_SET = "full"


def full_training_set(
    config: Config, balance_dir: str | Path, dataset_dir: str | Path, policy: AugmentPolicy, steps: int
) -> TrainingSet:
    """Return every training tile (the balanced ``full`` set), with a stain target fitted on its real tiles.

    Args:
        config: Uses ``train.seed``.
        balance_dir: The balance stage's output.
        dataset_dir: The folder the manifest's paths are relative to.
        policy: The augmentation policy (its stain normalisation method).
        steps: Optimiser steps of the refit (the folds' median best step).
    """
    table = load_training_table(balance_dir, FULL_SET, dataset_dir)
    real = table.loc[~table["synthetic"], "file"]
    stain = fit_from_files(policy.stain_normalization, list(real), seed=config.train.seed)
    return TrainingSet(FULL_SET, table, table, None, stain, config.train.seed, steps=steps)


def refit(
    candidate: Candidate,
    data: TrainingSet,
    config: Config,
    policy: AugmentPolicy,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
) -> FittedModel:
    """Fit ``candidate`` on ``data`` for ``data.steps`` steps with its own progress line and ETA.

    Args:
        candidate: The winner (an architecture).
        data: :func:`full_training_set`.
        config: The whole config.
        policy: The augmentation policy.
        on_eval: Called with each evaluation's metrics (training loss on the refit).
        checkpoint_dir: With ``train.checkpoint``, a killed refit resumes from its checkpoint here.
        fingerprint: Identifies what the refit computes from; another one's checkpoint is not resumed.
    """
    context = FitContext(
        config=config,
        policy=policy,
        device=select_device(config.train.device),
        timer=EtaTimer(data.steps or config.train.steps),
        checkpoints=checkpoint_dir,
        fingerprint=fingerprint,
        on_eval=on_eval,
    )
    return candidate.fit(data, context, {})
