"""The paper's two-stage classifier: tumour or not, then viable or not, combined into three classes.

Stage 1 tells tumour from non-tumour tiles, stage 2 viable from non-viable tumour on tumour tiles only; the product
rule combines them into the three class probabilities, returned as log-probabilities so that every consumer of
logits (``predict_logits``, softmax, temperature scaling, ONNX export) works unchanged. Both stages are the same
architecture (``candidates.two_stage_arch``), trained with the plain models' recipe, transforms and views.
A fold whose training tiles lack a class of one stage cannot train that stage: the candidate is then left out.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms import v2

from bonetumor.config import Config
from bonetumor.data.datasets import TileDataset, label_indices
from bonetumor.errors import ConfigError, DatasetError
from bonetumor.training.candidates.base import (
    Candidate,
    CandidateUnavailableError,
    FitContext,
    FittedModel,
    TrainingSet,
)
from bonetumor.training.candidates.network import INIT_TAG, TorchFitted, fit_title
from bonetumor.training.engine import FitResult, fit
from bonetumor.training.models import InitWeights, build_model, resolve_weights
from bonetumor.transforms.augment import AugmentPolicy, build_train_transform
from bonetumor.transforms.preprocess import tensor_tail, tile_ops
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import TestTimeViews
from bonetumor.utils import EtaTimer, seed_everything

log = logging.getLogger(__name__)

#: Smallest log-probability :class:`TwoStageModel` outputs: P = 0 would give -inf and NaN in softmax and losses.
LOG_PROB_FLOOR = -80.0


@dataclasses.dataclass(frozen=True)
class ClassRoles:
    """Where the three classes of the two-stage rule sit in the model's output order.

    Attributes:
        safe: Index of the non-tumour class (``referral.safe_class``).
        other: Index of the non-viable tumour class (the class that is neither of the other two).
        target: Index of the viable tumour class (``referral.target_class``).
    """

    safe: int
    other: int
    target: int


def class_roles(classes: Sequence[str], safe_class: str, target_class: str) -> ClassRoles:
    """Locate the non-tumour, non-viable and viable classes for the two-stage rule.

    Args:
        classes: Class names in model output order (``data.classes``); exactly three.
        safe_class: The non-tumour class (``referral.safe_class``).
        target_class: The viable tumour class (``referral.target_class``).

    Returns:
        The index of each role in ``classes``.

    Raises:
        ConfigError: Not exactly three classes, or ``safe_class``/``target_class`` missing or equal.
    """
    names = list(classes)
    if len(names) != 3:
        raise ConfigError(
            f"the two-stage classifier needs exactly 3 classes in data.classes (non-tumour, non-viable tumour, "
            f"viable tumour), got {len(names)}: {names}"
        )
    for field, value in (("safe_class", safe_class), ("target_class", target_class)):
        if value not in names:
            raise ConfigError(f"referral.{field}={value!r} is not in data.classes {names}")
    if safe_class == target_class:
        raise ConfigError(
            f"referral.safe_class and referral.target_class are both {safe_class!r}; the two-stage classifier needs "
            "the non-tumour class and the viable tumour class"
        )
    safe, target = names.index(safe_class), names.index(target_class)
    (other,) = (i for i in range(3) if i not in (safe, target))
    return ClassRoles(safe=safe, other=other, target=target)


class TwoStageModel(nn.Module):
    """Two binary classifiers combined into three class log-probabilities.

    ``stage1`` outputs two logits, (non-tumour, tumour); ``stage2`` outputs two logits, (non-viable, viable), and
    is only meaningful on tumour tiles. With ``pt = P(tumour)`` and ``pv = P(viable | tumour)``:
    ``P(safe) = 1 - pt``, ``P(other) = pt * (1 - pv)``, ``P(target) = pt * pv``. :meth:`forward` returns the logs of
    these (computed with ``log_softmax``, floored at :data:`LOG_PROB_FLOOR`) in the order of ``classes``; their
    softmax is the three probabilities again, since they already sum to 1.

    Args:
        stage1: Tumour classifier (2 outputs: non-tumour, tumour).
        stage2: Viability classifier (2 outputs: non-viable, viable).
        classes: Class names in output order (three).
        safe_class: The non-tumour class.
        target_class: The viable tumour class.

    Attributes:
        roles: Output index of each class role.
        histories: Per stage (``stage1``, ``stage2``), the evaluation metrics of its training, when trained by
            :func:`fit_two_stage` (not part of the state dict).
        best_steps: Per stage, the optimiser step whose weights it holds.

    Raises:
        ConfigError: See :func:`class_roles`.
    """

    def __init__(
        self, stage1: nn.Module, stage2: nn.Module, classes: Sequence[str], safe_class: str, target_class: str
    ) -> None:
        super().__init__()
        self.roles = class_roles(classes, safe_class, target_class)
        self.classes = tuple(classes)
        self.stage1 = stage1
        self.stage2 = stage2
        self.histories: dict[str, list[dict[str, float]]] = {}
        self.best_steps: dict[str, int] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(N, 3)`` class log-probabilities, in the order of ``classes``."""
        # float32 before log_softmax: stage logits may come out of a bfloat16/float16 autocast region.
        tumour = torch.log_softmax(self.stage1(x).float(), dim=1)
        viable = torch.log_softmax(self.stage2(x).float(), dim=1)
        by_role = {
            self.roles.safe: tumour[:, 0],
            self.roles.other: tumour[:, 1] + viable[:, 0],
            self.roles.target: tumour[:, 1] + viable[:, 1],
        }
        return torch.stack([by_role[i] for i in range(3)], dim=1).clamp(min=LOG_PROB_FLOOR)


def build_two_stage(arch: str, config: Config, weights: str | InitWeights | None = None) -> TwoStageModel:
    """Build an untrained two-stage model of ``arch`` (both stages), as :func:`fit_two_stage` trains it.

    Also what loading a saved two-stage state dict needs: ``build_two_stage(arch, config, "none")`` then
    ``load_state_dict``.

    Args:
        arch: Architecture of both stages (key of :data:`bonetumor.training.models.ARCHITECTURES`).
        config: Uses ``data.classes``, ``referral.safe_class``/``target_class`` and ``train`` (dropout,
            weights, trainable).
        weights: Overrides ``train.weights`` (``none`` to skip loading pretrained weights).

    Raises:
        ConfigError: Unknown architecture or classes unfit for the two-stage rule.
        WeightsUnavailableError: Pretrained weights are missing or do not fit.
    """
    train = config.train
    class_roles(config.data.classes, config.referral.safe_class, config.referral.target_class)  # fail early
    chosen = train.weights if weights is None else weights
    stages = [build_model(arch, 2, train.dropout, chosen, train.trainable) for _ in range(2)]
    return TwoStageModel(
        stages[0], stages[1], config.data.classes, config.referral.safe_class, config.referral.target_class
    )


def _binary_datasets(
    fit_table: pd.DataFrame,
    stop_table: pd.DataFrame | None,
    config: Config,
    policy: AugmentPolicy,
    stain: StainNormalizer | None,
) -> dict[str, tuple[TileDataset, TileDataset | None]]:
    """Return the (training, early-stopping) datasets of stage 1 and stage 2 with 0/1 labels."""
    classes = config.data.classes
    roles = class_roles(classes, config.referral.safe_class, config.referral.target_class)
    train_transform = build_train_transform(config.preprocess, policy, stain=stain)
    eval_transform = v2.Compose(tensor_tail(config.preprocess))
    prepare = v2.Compose(tile_ops(config.preprocess.tile_size, stain))

    def split(table: pd.DataFrame, what: str) -> dict[str, tuple[list[Path], list[int]]]:
        for column in ("file", "label"):
            if column not in table.columns:
                raise DatasetError(f"{what}: no {column!r} column; expected a training table with file and label")
        # Validates the names against data.classes (and says which are unknown) before any binary relabelling.
        index = np.asarray(label_indices(list(table["label"]), classes), dtype=np.int64)
        files = [Path(f) for f in table["file"]]
        tumour = index != roles.safe
        return {
            "stage1": (files, tumour.astype(int).tolist()),
            "stage2": (
                [f for f, t in zip(files, tumour, strict=True) if t],
                (index[tumour] == roles.target).astype(int).tolist(),
            ),
        }

    fit_parts = split(fit_table, "fit_table")
    stop_parts = split(stop_table, "stop_table") if stop_table is not None and len(stop_table) else None
    meaning = {"stage1": ("non-tumour", "tumour"), "stage2": ("non-viable tumour", "viable tumour")}
    datasets: dict[str, tuple[TileDataset, TileDataset | None]] = {}
    for stage, (files, labels) in fit_parts.items():
        missing = [meaning[stage][b] for b in (0, 1) if b not in labels]
        if missing:
            raise DatasetError(
                f"two-stage {stage}: the training table has no {' and no '.join(missing)} tiles; each stage needs "
                f"both of its classes ({classes[roles.safe]!r}, {classes[roles.other]!r}, {classes[roles.target]!r})"
            )
        stop: TileDataset | None = None
        if stop_parts is not None and stop_parts[stage][0]:
            stop = TileDataset(stop_parts[stage][0], stop_parts[stage][1], eval_transform, prepare)
        datasets[stage] = (TileDataset(files, labels, train_transform, prepare), stop)
    return datasets


def fit_two_stage(
    arch: str,
    fit_table: pd.DataFrame,
    stop_table: pd.DataFrame | None,
    config: Config,
    policy: AugmentPolicy,
    stain: StainNormalizer | None,
    device: torch.device,
    name: str,
    timer: EtaTimer | None = None,
    *,
    seed: int | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    init: InitWeights | None = None,
) -> TwoStageModel:
    """Train the two-stage classifier of one fold: stage 1 on every tile, stage 2 on the tumour tiles.

    Both stages are ``arch`` networks with two outputs, trained by :func:`bonetumor.training.engine.fit` with the plain
    models' recipe (``config.train``: steps, learning rate, schedule, patience, two-phase fine-tuning...) and
    their transforms (the augmentation policy and the fold's stain normaliser for training, the evaluation
    transform and test-time views for early stopping). Stage 1 learns non-tumour (``referral.safe_class``) vs
    the two tumour classes; stage 2 learns ``referral.target_class`` (viable) vs the remaining class on tumour
    rows only. Each early-stops on the matching rows of ``stop_table`` (none when it is None or has no such rows).

    Args:
        arch: Architecture of both stages.
        fit_table: Training rows (``file``, ``label``; synthetic rows included).
        stop_table: Early-stopping rows (``file``, ``label``), or None for no early stopping.
        config: The whole config.
        policy: The augmentation policy.
        stain: The fold's fitted stain normaliser, or None.
        device: Where to train.
        name: Label for progress lines, e.g. ``two_stage_resnet50 fold 1/3``.
        timer: Shared ETA timer (each stage steps it per step, so it counts ``2 * steps`` per call).
        seed: When given, :func:`bonetumor.utils.seed_everything` runs with it before building each stage.
        on_eval: Called with each evaluation's metrics, keys prefixed ``stage1_``/``stage2_`` (``step`` kept;
            stage 2 steps continue after stage 1's, so one MLflow run gets both curves on one step axis).
        checkpoint_dir: Per-stage checkpoints go to ``<checkpoint_dir>/stage1`` and ``/stage2``.
        fingerprint: Identifies the data, as for :func:`bonetumor.training.engine.fit` (the stage is appended).
        init: Where both stages' weights start (resolved from ``train.weights`` when None).

    Returns:
        The trained model (without views) in eval mode on ``device``, with ``histories`` and ``best_steps``.

    Raises:
        ConfigError: Classes unfit for the two-stage rule, or a stain/policy mismatch.
        DatasetError: A label is not a class, or a stage lacks one of its two classes in ``fit_table``.
    """
    datasets = _binary_datasets(fit_table, stop_table, config, policy, stain)
    views = TestTimeViews.from_config(config.preprocess)
    titles = {"stage1": "stage 1/2 (tumour?)", "stage2": "stage 2/2 (viable?)"}
    stages: dict[str, nn.Module] = {}
    results: dict[str, FitResult] = {}
    offset = 0
    for stage, (train_set, stop_set) in datasets.items():
        if seed is not None:
            seed_everything(seed)
        model = build_model(
            arch, 2, config.train.dropout, init if init is not None else config.train.weights, config.train.trainable
        )

        def report(stats: dict[str, float], prefix: str = stage, shift: int = offset) -> None:
            if on_eval is not None:
                renamed = {f"{prefix}_{k}": v for k, v in stats.items() if k != "step"}
                on_eval({"step": stats["step"] + shift, **renamed})

        log.info(
            "%s %s: %d training tiles, %s early-stopping tiles",
            name,
            titles[stage],
            len(train_set),
            len(stop_set) if stop_set is not None else "no",
        )
        results[stage] = fit(
            model,
            train_set,
            stop_set,
            config.train,
            device,
            config.train.steps,
            f"{name} {titles[stage]}",
            report if on_eval is not None else None,
            timer,
            arch=arch,
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / stage,
            fingerprint=f"{fingerprint}-{stage}",
            views=views,
        )
        stages[stage] = results[stage].model
        offset += config.train.steps
    model = TwoStageModel(
        stages["stage1"],
        stages["stage2"],
        config.data.classes,
        config.referral.safe_class,
        config.referral.target_class,
    )
    model.histories = {stage: result.history for stage, result in results.items()}
    model.best_steps = {stage: result.best_step for stage, result in results.items()}
    return model.to(device).eval()


class TwoStageCandidate(Candidate):
    """The two-stage classifier of ``candidates.two_stage_arch``, named ``two_stage_<arch>``."""

    kind: ClassVar[str] = "two_stage"

    def __init__(self, arch: str, init: InitWeights) -> None:
        super().__init__(f"two_stage_{arch}", arch=arch)
        self.network = arch
        self.init = init

    @classmethod
    def from_config(cls, config: Config) -> list[Candidate]:
        """One candidate with ``candidates.two_stage``, none otherwise."""
        if not config.candidates.two_stage:
            return []
        arch = config.candidates.two_stage_arch
        return [cls(arch, resolve_weights(arch, config.train.weights))]

    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> TorchFitted:
        """Train both stages on ``data``; a stage without both of its classes makes the candidate unavailable."""
        config = self.settings(context.config)
        try:
            model = fit_two_stage(
                self.network,
                data.fit_table,
                data.stop_rows,
                config,
                context.policy,
                data.stain,
                context.device,
                f"{self.name} {fit_title(data)}",
                context.timer,
                seed=data.seed,
                on_eval=context.on_eval,
                checkpoint_dir=context.checkpoints if config.train.checkpoint else None,
                fingerprint=context.fingerprint,
                init=self.init,
            )
        except DatasetError as exc:
            raise CandidateUnavailableError(str(exc)) from exc
        return TorchFitted(model, self.network, config, data.stain, context.device)

    def planned_steps(self, config: Config, n_folds: int) -> int:
        """Two fits of ``train.steps`` per fold."""
        return 2 * n_folds * self.settings(config).train.steps

    param_sections: ClassVar[tuple[str, ...]] = (*Candidate.param_sections, "candidates")

    def run_tags(self) -> dict[str, str]:
        """Where both stages' starting weights came from."""
        return {INIT_TAG: self.init.tag}
