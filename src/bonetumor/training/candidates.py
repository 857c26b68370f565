"""Candidate models scored beside the plain architectures: two-stage, pruned VGG, INT8 ONNX, and CPU latency.

Each fold of the train stage can build, after its plain architectures:

- The paper's two-stage classifier (:class:`TwoStageModel`, :func:`fit_two_stage`): stage 1 tells tumour from
  non-tumour tiles, stage 2 viable from non-viable tumour on tumour tiles only; the product rule combines them into
  the three class probabilities, returned as log-probabilities so that every consumer of logits (``predict_logits``,
  softmax, temperature scaling, ONNX export) works unchanged.
- A structurally pruned and fine-tuned VGG (:func:`fit_pruned_vgg`), smaller and faster on a CPU.
- An INT8 ONNX copy of any model (:func:`int8_classifier`), statically calibrated on training tiles, run through
  ONNX Runtime with the shared preprocessing (:func:`onnx_logits`).

:func:`cpu_latency_ms` times any of them on the CPU the same way, and :func:`candidate_name` names their
out-of-fold files. Torch and ONNX Runtime only: the train stage does the MLflow tracking.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn
from torchvision.transforms import v2

from bonetumor.config import Config, PreprocessConfig
from bonetumor.data.datasets import TileDataset, label_indices
from bonetumor.errors import ConfigError, DatasetError
from bonetumor.training.engine import FitResult, fit
from bonetumor.training.export import OnnxClassifier, QuantizedModel, export_onnx, measure_latency, quantize_int8
from bonetumor.training.models import InitWeights, build_model
from bonetumor.training.pruning import PruneSummary, prune_vgg
from bonetumor.transforms.augment import AugmentPolicy, build_train_transform
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import build_eval_transform, tensor_tail, tile_ops
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import TestTimeViews
from bonetumor.utils import EtaTimer, seed_everything

log = logging.getLogger(__name__)

CandidateKind = Literal["two_stage", "pruned", "int8"]
#: Candidate kinds, as :func:`candidate_name` takes them.
TWO_STAGE: CandidateKind = "two_stage"
PRUNED: CandidateKind = "pruned"
INT8: CandidateKind = "int8"
CANDIDATE_KINDS: tuple[CandidateKind, ...] = (TWO_STAGE, PRUNED, INT8)
#: Architectures :func:`fit_pruned_vgg` accepts (structured pruning is written for torchvision's VGG layout).
PRUNABLE_ARCHITECTURES: frozenset[str] = frozenset({"vgg19", "vgg19_bn"})
#: Smallest log-probability :class:`TwoStageModel` outputs: P = 0 would give -inf and NaN in softmax and losses.
LOG_PROB_FLOOR = -80.0


def candidate_name(kind: CandidateKind, arch: str) -> str:
    """Return the name of a candidate model (its output folder and out-of-fold file stem).

    Args:
        kind: ``two_stage``, ``pruned`` or ``int8``.
        arch: The architecture the candidate is built from.

    Returns:
        ``two_stage_<arch>``, ``<arch>_pruned`` or ``<arch>_int8``.

    Raises:
        ConfigError: Unknown kind.
    """
    if kind == TWO_STAGE:
        return f"two_stage_{arch}"
    if kind == PRUNED:
        return f"{arch}_pruned"
    if kind == INT8:
        return f"{arch}_int8"
    raise ConfigError(f"unknown candidate kind {kind!r}; expected one of {list(CANDIDATE_KINDS)}")


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


def fit_pruned_vgg(
    model: nn.Module,
    arch: str,
    train_set: torch.utils.data.Dataset[Any],
    stop_set: torch.utils.data.Dataset[Any] | None,
    config: Config,
    device: torch.device,
    name: str,
    timer: EtaTimer | None = None,
    *,
    on_eval: Callable[[dict[str, float]], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    views: TestTimeViews | None = None,
) -> tuple[nn.Module, PruneSummary]:
    """Prune a trained VGG's weakest filters (``candidates.prune_amount``) and fine-tune the smaller model.

    Fine-tuning runs :func:`bonetumor.training.engine.fit` for ``candidates.prune_finetune_steps`` steps (also the
    schedule length) with ``config.train`` otherwise, except: no head-only phase (the head is trained already),
    and with two-phase fine-tuning configured (``head_steps > 0``, pretrained weights) the learning rate is
    ``lr * finetune_lr_factor``, the rate the backbone was fine-tuned at, so the surviving pretrained filters
    adapt rather than being retrained. Parameters frozen by ``trainable`` stay frozen.

    Args:
        model: The fold's trained VGG (left unchanged).
        arch: ``vgg19`` or ``vgg19_bn``.
        train_set: The fold's augmented training set (3-class labels), as the plain model trained on.
        stop_set: The early-stopping set, or None.
        config: Uses ``candidates`` (prune_amount, prune_finetune_steps), ``preprocess.input_size`` and ``train``.
        device: Where to fine-tune.
        name: Label for progress lines.
        timer: Shared ETA timer (stepped per fine-tuning step).
        on_eval: Called with each fine-tuning evaluation's metrics.
        checkpoint_dir: Checkpoint folder of the fine-tuning, as for :func:`bonetumor.training.engine.fit`.
        fingerprint: Identifies the data, as for :func:`bonetumor.training.engine.fit`.
        views: Test-time views of the early-stopping evaluation.

    Returns:
        The pruned, fine-tuned model (eval mode, on ``device``) and what pruning changed (rebuild the module from
        ``summary.plan_after`` with :func:`bonetumor.training.pruning.build_pruned_vgg`).

    Raises:
        ConfigError: ``arch`` is not a VGG, or the model is not the project's VGG.
    """
    if arch not in PRUNABLE_ARCHITECTURES:
        raise ConfigError(
            f"candidates.pruned_vgg19: cannot prune arch {arch!r}; structured pruning is only implemented for "
            f"{sorted(PRUNABLE_ARCHITECTURES)}"
        )
    size = config.preprocess.input_size
    # Torch-Pruning traces a forward pass: the example must live where the model's weights do.
    weight_device = next(model.parameters()).device
    example = torch.zeros(1, 3, size, size, device=weight_device)
    pruned, summary = prune_vgg(model, config.candidates.prune_amount, example)
    log.info(
        "%s: pruned %.0f%% of each convolution's filters: %.1fM -> %.1fM parameters (%.0f%%), MACs %.0f%%",
        name,
        100 * summary.amount,
        summary.params_before / 1e6,
        summary.params_after / 1e6,
        100 * summary.params_ratio,
        100 * summary.macs_ratio,
    )
    train = config.train
    steps = config.candidates.prune_finetune_steps
    finetune = dataclasses.replace(
        train,
        head_steps=0,
        lr=train.lr * train.finetune_lr_factor if train.head_steps > 0 else train.lr,
        eval_every=min(train.eval_every, steps),
    )
    result = fit(
        pruned,
        train_set,
        stop_set,
        finetune,
        device,
        steps,
        name,
        on_eval,
        timer,
        schedule_steps=steps,
        arch=arch,
        checkpoint_dir=checkpoint_dir,
        fingerprint=f"{fingerprint}-pruned-{summary.plan_after}",
        views=views,
    )
    return result.model.eval(), summary


def select_calibration_files(table: pd.DataFrame, n: int, seed: int = 0) -> list[Path]:
    """Pick up to ``n`` real training tiles for INT8 calibration, spread evenly over the classes.

    Synthetic (GAN) rows are skipped when the table has a ``synthetic`` column: the quantised model should see
    the activation ranges of real tiles. Classes take turns, each in a seeded random order, so a small ``n``
    still covers every class.

    Args:
        table: A training table (``file``, ``label``, optionally ``synthetic``).
        n: Most tiles to return.
        seed: Seed of the order within each class.

    Returns:
        The chosen files.

    Raises:
        DatasetError: The table lacks a ``file`` or ``label`` column.
    """
    for column in ("file", "label"):
        if column not in table.columns:
            raise DatasetError(f"calibration table: no {column!r} column; expected a training table")
    rows = table[~table["synthetic"].astype(bool)] if "synthetic" in table.columns else table
    rng = np.random.default_rng(seed)
    queues = [
        list(group["file"].to_numpy()[rng.permutation(len(group))]) for _, group in rows.groupby("label", sort=True)
    ]
    chosen: list[Path] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(Path(queue.pop(0)))
    return chosen


def _on_cpu(model: nn.Module) -> nn.Module:
    """Return the model itself when it is on the CPU, else a CPU copy (the caller's model stays where it is)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).to("cpu")


def int8_classifier(
    model: nn.Module,
    preprocess_config: PreprocessConfig,
    stain: StainNormalizer | None,
    calibration_files: Sequence[str | Path],
    out_dir: str | Path,
    name: str,
    *,
    classes: Sequence[str],
    max_tiles: int | None = None,
    threads: int | None = None,
) -> tuple[OnnxClassifier, QuantizedModel]:
    """Export a model to ONNX, quantise it to INT8 calibrated on training tiles, and load it for inference.

    Calibration tiles go through the evaluation transform (stain normaliser included), exactly what the
    quantised model will see; the returned classifier carries the same transform. Pass the model with its
    test-time views (:class:`bonetumor.transforms.tta.TestTimeAugmented`): the exported graph then takes whole
    ``tile_size`` tiles and averages the views itself, exactly as torch does.

    Args:
        model: The trained classifier with its views (any device; exported from a CPU copy). A
            :class:`TwoStageModel` works too.
        preprocess_config: The preprocess section the model was trained with.
        stain: The model's stain normaliser, or None.
        calibration_files: Training tiles (never validation tiles); see :func:`select_calibration_files`.
        out_dir: Folder for ``<name>.fp32.onnx`` and ``<name>.int8.onnx``.
        name: File stem, e.g. ``resnet50_int8-fold0``.
        classes: Class names in output order (``data.classes``).
        max_tiles: Use at most this many of ``calibration_files`` (``candidates.calibration_tiles``); None: all.
        threads: ONNX Runtime intra-op threads of the returned classifier (None: one per core).

    Returns:
        The INT8 classifier and how it was quantised (static QDQ, or dynamic when no tiles were given or the
        static tool chain failed; ``fallback_reason`` says why).

    Raises:
        ArtifactError: Export or quantisation failed, or the model's outputs do not match ``classes``.
        InvalidImageError: A calibration tile does not decode.
    """
    out_dir = Path(out_dir)
    transform = build_eval_transform(preprocess_config, stain=stain)
    files = list(calibration_files)[:max_tiles] if max_tiles is not None else list(calibration_files)
    fp32 = export_onnx(_on_cpu(model), preprocess_config.tile_size, out_dir / f"{name}.fp32.onnx")
    arrays = [np.asarray(transform(decode_image(f)), dtype=np.float32) for f in files]
    quantized = quantize_int8(fp32, out_dir / f"{name}.int8.onnx", arrays or None)
    log.info(
        "%s: INT8 by %s on %d calibration tiles%s",
        name,
        quantized.method,
        quantized.calibration_images,
        f" ({quantized.fallback_reason})" if quantized.fallback_reason else "",
    )
    return OnnxClassifier(quantized.path, classes, transform, threads=threads), quantized


def onnx_logits(classifier: OnnxClassifier, files: Sequence[str | Path], batch: int = 16) -> np.ndarray:
    """Return an ONNX classifier's logits for tile files, in file order and class order.

    Args:
        classifier: The classifier (its transform is the model's evaluation transform).
        files: Tile files.
        batch: Tiles decoded and run per call.

    Returns:
        float32 ``(len(files), len(classifier.classes))``.

    Raises:
        ConfigError: ``batch`` is below 1.
        InvalidImageError: A tile does not decode.
    """
    if batch < 1:
        raise ConfigError(f"onnx_logits: batch={batch}; expected at least 1")
    paths = list(files)
    parts = [
        classifier.logits(classifier.preprocess([decode_image(f) for f in paths[i : i + batch]]))
        for i in range(0, len(paths), batch)
    ]
    if not parts:
        return np.zeros((0, len(classifier.classes)), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def cpu_latency_ms(
    fn_or_model: nn.Module | OnnxClassifier | Callable[[Any], Any],
    image_size: int,
    batch: int,
    *,
    warmup: int = 2,
    repeats: int = 10,
    seed: int = 0,
) -> float:
    """Return the median CPU milliseconds per tile of a model on a random preprocessed batch.

    Time a model with its test-time views (``image_size`` = ``tile_size``): that is what a served tile costs.

    A torch module runs on a CPU copy (when it lives elsewhere), in eval mode, under ``no_grad`` (its mode is
    restored); an :class:`~bonetumor.training.export.OnnxClassifier` runs its ``logits`` on a float32 array; any other
    callable gets the float32 numpy batch ``(batch, 3, image_size, image_size)``. Preprocessing (decode, resize,
    normalise) is not timed: it is the same for every model. Uses the current torch/ONNX Runtime thread settings.

    Args:
        fn_or_model: The model or callable.
        image_size: Side of the square input.
        batch: Tiles per call (``candidates.latency_batch``).
        warmup: Untimed calls first.
        repeats: Timed calls; the median per-tile time is returned.
        seed: Seed of the random batch.

    Raises:
        ConfigError: ``batch`` or ``image_size`` is below 1 (or ``warmup``/``repeats`` out of range).
    """
    if batch < 1 or image_size < 1:
        raise ConfigError(f"cpu_latency_ms: batch={batch}, image_size={image_size}; expected both at least 1")
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randn(batch, 3, image_size, image_size, generator=generator)
    if isinstance(fn_or_model, nn.Module):
        module = _on_cpu(fn_or_model)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                timing = measure_latency(module, tensor, warmup=warmup, repeats=repeats)
        finally:
            module.train(was_training)
    elif isinstance(fn_or_model, OnnxClassifier):
        timing = measure_latency(fn_or_model.logits, tensor.numpy(), warmup=warmup, repeats=repeats)
    else:
        timing = measure_latency(fn_or_model, tensor.numpy(), warmup=warmup, repeats=repeats)
    return timing["ms_per_image_p50"]
