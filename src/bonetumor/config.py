"""Configuration: validated dataclasses that mirror params.yaml section by section.

params.yaml is the single source of every knob. Each pipeline stage reads only its own sections, and dvc.yaml
declares exactly those sections as the stage's params, so changing one knob reruns only the stages it affects.
The dataclasses below validate types and ranges (pydantic dataclasses, unknown keys rejected) and the resolved
config is written beside every stage output with :func:`save_resolved`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from bonetumor.errors import ConfigError

#: The three classes of the TCIA osteosarcoma collection, in the order the models output them.
DEFAULT_CLASSES: tuple[str, ...] = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
#: ImageNet statistics: the models are initialised from (or compatible with) ImageNet-trained torchvision weights.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_STRICT = ConfigDict(extra="forbid", frozen=True)

PositiveInt = Annotated[int, Field(ge=1)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


@dataclass(config=_STRICT)
class DataConfig:
    """Where the tiles come from and which classes exist.

    Attributes:
        source: Folder with one sub-folder per class (relative paths are relative to the project directory).
        classes: Class names in model output order; each must be a sub-folder of ``source``.
    """

    source: str = "data/sample/images"
    classes: tuple[str, ...] = DEFAULT_CLASSES

    @field_validator("classes")
    @classmethod
    def _classes_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) < 2:
            raise ValueError(f"need at least 2 classes, got {list(value)}")
        if len(set(value)) != len(value):
            raise ValueError(f"class names must be unique, got {list(value)}")
        return value


#: How source labels of the Kaggle/TCIA downloads map to the model's classes (``None`` = leave the tiles out).
#: ML_Features_1144.csv says ``Viable`` and the mixed ``viable: non-viable``; the Kaggle folders use the class names.
DEFAULT_LABEL_MAP: dict[str, str | None] = {
    "Non-Tumor": "Non-Tumor",
    "Non-Viable-Tumor": "Non-Viable-Tumor",
    "Viable-Tumor": "Viable-Tumor",
    "Viable": "Viable-Tumor",
    "viable: non-viable": None,
}


@dataclass(config=_STRICT)
class DataImportConfig:
    """How ``bonetumor data import`` turns a downloaded data set into class folders under ``data/raw``.

    Attributes:
        target: Folder the imported data sets go to (one sub-folder per data set, DVC-tracked).
        label_map: Source label to class name; ``null`` leaves those tiles out (the mixed class by default).
            Labels not in the map are an error that lists them. Keeping the mixed class as a class of its own
            means mapping it to a name that is also in ``data.classes``.
        image_modes: What to do with tiles that are not 8-bit RGB (CMYK, 16-bit, RGBA, grayscale): ``convert``
            them to 8-bit RGB (each conversion is listed in the import report) or ``reject`` the import.
    """

    target: str = "data/raw"
    label_map: dict[str, str | None] = dataclasses.field(default_factory=lambda: dict(DEFAULT_LABEL_MAP))
    image_modes: Literal["convert", "reject"] = "convert"


@dataclass(config=_STRICT)
class PreprocessConfig:
    """Preprocessing shared by training, evaluation and serving: the scale tiles are seen at, and normalisation.

    Every tile is cropped to its centred square and resized to ``tile_size``: that fixes the physical scale a
    pixel stands for. The network sees ``input_size`` crops of it: random crops in training, and at evaluation
    and serving time a fixed set of crops (``test_crops``, each mirrored with ``test_flips``) whose
    probabilities are averaged (:mod:`bonetumor.transforms.tta`).

    Attributes:
        tile_size: Side in pixels every tile is resized to (the paper feeds 224 px whole tiles).
        input_size: Side in pixels of the square crop the network sees (VGG19 needs at least 32).
        test_crops: Crops per tile at evaluation and serving time: 1 (centre) or 5 (corners and centre).
        test_flips: Also show each test crop mirrored left-right (doubles the views).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided after subtracting the mean.
    """

    tile_size: Annotated[int, Field(ge=32, le=1024)] = 64
    input_size: Annotated[int, Field(ge=32, le=1024)] = 48
    test_crops: Literal[1, 5] = 5
    test_flips: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"every std must be > 0, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _crop_fits(self) -> PreprocessConfig:
        if self.input_size > self.tile_size:
            raise ValueError(
                f"input_size={self.input_size} is larger than tile_size={self.tile_size}; expected a crop of the "
                "resized tile (input_size <= tile_size)"
            )
        return self


@dataclass(config=_STRICT)
class ValidateConfig:
    """Thresholds of the data validation suite.

    Attributes:
        min_size: Smallest accepted tile width and height, in pixels.
        near_duplicate_distance: Largest Hamming distance between the 64-bit perceptual hashes of two tiles that
            counts as a near-duplicate (0 = only identical hashes). Near-duplicates are reported, and the split
            keeps each near-duplicate cluster on one side of every fold.
        min_tissue_fraction: Share of a tile's pixels that must be tissue (not white glass or a blank area);
            tiles below it are flagged as near-blank.
        max_low_tissue_share: Largest share of flagged near-blank tiles that still passes (they are listed).
        min_class_count: Fewest tiles a class may have.
        max_imbalance_ratio: Largest allowed ratio of the biggest to the smallest class.
        workers: Processes decoding tiles; 0 = one per CPU core.
    """

    min_size: PositiveInt = 128
    near_duplicate_distance: Annotated[int, Field(ge=0, le=32)] = 4
    min_tissue_fraction: Probability = 0.25
    max_low_tissue_share: Probability = 0.05
    min_class_count: PositiveInt = 5
    max_imbalance_ratio: Annotated[float, Field(ge=1.0)] = 4.0
    workers: Annotated[int, Field(ge=0)] = 0


@dataclass(config=_STRICT)
class SplitConfig:
    """Grouped cross-validation, and an optional held-out test set of whole groups.

    Attributes:
        method: ``stratified_group_kfold`` (scikit-learn's StratifiedGroupKFold, ``n_folds`` folds) or
            ``leave_one_group_out`` (one fold per group: leave-one-patient-out with ``group_by: case``).
        n_folds: Number of folds for ``stratified_group_kfold`` (the paper uses 5); ignored otherwise.
        group_by: Manifest column whose values never straddle training and validation: ``slide`` or ``case``
            (the patient).
        test_fraction: Share of groups held out as a test set that no fold, GAN or refit ever sees (0 = none).
        seed: Seed of the test hold-out and the fold assignment.
    """

    method: Literal["stratified_group_kfold", "leave_one_group_out"] = "stratified_group_kfold"
    n_folds: Annotated[int, Field(ge=2)] = 3
    group_by: Literal["slide", "case"] = "slide"
    test_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    seed: int = 42


@dataclass(config=_STRICT)
class AugmentConfig:
    """The augmentation policy applied on the fly to training tiles.

    Attributes:
        rotation_degrees: Free random rotation of the tile, +/- this many degrees, corners filled white (0 = off:
            the white corners are an artefact no real tile has).
        rotate90: Rotate each crop by a random multiple of 90 degrees (tissue has no orientation; no corners).
        hflip_p: Probability of a horizontal flip.
        vflip_p: Probability of a vertical flip.
        zoom_max: Scale jitter: each training crop covers ``input_size`` times a random factor in
            ``[1/zoom_max, zoom_max]`` of the resized tile (log-uniform), resized to ``input_size``; 1 = no zoom.
        hed_jitter: Strength of H&E stain augmentation: each of the haematoxylin, eosin and DAB channels (colour
            deconvolution) is scaled by 1 +/- and shifted by +/- this amount (0 = off).
        color_jitter: Brightness, contrast and saturation jitter, +/- this share (0 = off).
        hue_jitter: Hue jitter, +/- this share of the colour circle (0 = off; at most 0.5).
        stain_normalization: ``none``, ``reinhard`` or ``macenko``. The target stain is fitted on the training
            tiles only (each fold's, and all training tiles for the final model), stored with the model, and
            applied to every tile in training, evaluation and serving.
        preview_tiles: How many tiles the preview grid shows (rows).
        preview_samples: How many augmented versions of each tile the preview shows (columns after the original).
        seed: Seed of the preview's random draws.
    """

    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)] = 0.0
    rotate90: bool = True
    hflip_p: Probability = 0.5
    vflip_p: Probability = 0.0
    zoom_max: Annotated[float, Field(ge=1.0, le=4.0)] = 1.0
    hed_jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.03
    color_jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    hue_jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.03
    stain_normalization: Literal["none", "reinhard", "macenko"] = "none"
    preview_tiles: PositiveInt = 6
    preview_samples: PositiveInt = 5
    seed: int = 0


@dataclass(config=_STRICT)
class GanQualityConfig:
    """The quality report of each training set's GAN, and the thresholds its tiles must pass to be used.

    Every figure is computed in a fixed feature space available offline: the pooled features of a randomly
    initialised (seeded, never trained) small CNN on tiles at the GAN's size, the same network for every set.

    Attributes:
        tiles_per_class: Synthetic tiles generated per class for the report (besides those added to the set).
        kid_subsets: Subsets drawn to average the kernel inception distance (KID) over.
        max_kid_ratio: Largest KID(real, synthetic) allowed, in units of the real-vs-real floor (KID between two
            halves of the real tiles); 1 would be as close as real tiles are to each other.
        max_two_sample_accuracy: Largest cross-validated accuracy of a classifier telling real from synthetic
            tiles (0.5 = indistinguishable).
        max_memorised_fraction: Largest share of synthetic tiles closer to some real tile than the real tiles'
            ``memorisation_quantile`` nearest-neighbour distance (near copies).
        memorisation_quantile: The quantile of real-to-real nearest-neighbour distances below which a synthetic
            tile counts as a near copy.
        feature_seed: Seed of the random feature network.
    """

    tiles_per_class: Annotated[int, Field(ge=4)] = 32
    kid_subsets: PositiveInt = 20
    max_kid_ratio: Annotated[float, Field(gt=0.0)] = 10.0
    max_two_sample_accuracy: Annotated[float, Field(ge=0.5, le=1.0)] = 0.95
    max_memorised_fraction: Probability = 0.1
    memorisation_quantile: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05
    feature_seed: int = 0


@dataclass(config=_STRICT)
class BalanceAblationConfig:
    """The ablation that decides whether GAN tiles are used: four ways to handle imbalance, on the same folds.

    The arms are ``none`` (real tiles only), ``class_weighted`` (a class-weighted loss), ``oversample`` (real
    minority tiles repeated up to ``target_ratio``) and ``gan`` (the GAN's tiles added). Each arm fits ``model`` on
    every fold's training set and is scored on the fold's validation tiles (real tiles only).

    Attributes:
        enabled: Run the ablation (the gate then needs it); off = the gate decides on the quality report alone.
        model: ``baseline``: the colour-histogram random forest of the ``baseline`` section (seconds per fold; see
            :mod:`bonetumor.balance.ablation` for why not a CNN).
        max_macro_f1_drop: GAN tiles are used only when the ``gan`` arm's mean per-fold macro-F1 is at most this
            much below the ``none`` arm's.
        max_minority_recall_drop: ... and the mean recall of the minority classes (those the GAN fills) is at most
            this much below the ``none`` arm's.
    """

    enabled: bool = True
    model: Literal["baseline"] = "baseline"
    max_macro_f1_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    max_minority_recall_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


@dataclass(config=_STRICT)
class BalanceConfig:
    """GAN-based class balancing of each fold's training set, its quality report, and the gate that decides.

    The GAN is trained per training set on that set's real tiles only: a conditional generator (class-conditional
    batch norm) and a projection discriminator with spectral norm, trained with the hinge loss on
    differentiable augmentations (DiffAugment) of both real and generated tiles, sampled from an exponential moving
    average of the generator. Its tiles are added to training only when the quality report passes the thresholds
    of ``quality`` and the ablation does not show them hurting (``gate``).

    Attributes:
        enabled: When false, no GAN is trained and no synthetic tiles are made.
        gate: ``auto``: GAN tiles are used only when the quality report passes and the ablation does not show them
            hurting; ``always``: used whatever the report and ablation say (both are still made and recorded);
            ``never``: made and reported, never trained on.
        target_ratio: Each class is filled with synthetic tiles up to ``target_ratio`` times the size of the
            largest class of that training set (1.0 = fully balanced).
        image_size: Side of the generated tiles in pixels (a power of two, 32 to 128; 128 wants a GPU).
        latent_dim: Size of the generator's noise vector.
        width: Channels of the generator's last and the discriminator's first block (doubled per block).
        steps: Optimisation steps of the GAN per training set.
        batch_size: GAN mini-batch size.
        lr: Adam learning rate of the generator; the discriminator's is ``lr * d_lr_factor``.
        d_lr_factor: The discriminator's learning rate relative to the generator's.
        ema_decay: Decay of the generator's moving average, which makes the tiles.
        diffaugment: Differentiable augmentations applied to every tile the discriminator sees, comma-separated:
            ``color``, ``translation``, ``cutout`` (empty = none).
        checkpoint_every: Steps between checkpoints (a killed GAN training resumes from the last); 0 = none.
        device: Where the GAN trains: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda``. Tiles are always
            generated on the CPU, from the moving average's weights.
        seed: Seed of GAN initialisation, training and sampling.
        quality: The quality report and its thresholds.
        ablation: The ablation of imbalance strategies and its tolerances.
    """

    enabled: bool = True
    gate: Literal["auto", "always", "never"] = "auto"
    target_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    image_size: Literal[32, 64, 128] = 64
    latent_dim: PositiveInt = 64
    width: Annotated[int, Field(ge=8, le=256)] = 16
    steps: PositiveInt = 900
    batch_size: Annotated[int, Field(ge=2)] = 16
    lr: Annotated[float, Field(gt=0.0)] = 2e-4
    d_lr_factor: Annotated[float, Field(gt=0.0)] = 2.0
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.99
    diffaugment: str = "color,translation,cutout"
    checkpoint_every: Annotated[int, Field(ge=0)] = 100
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    quality: GanQualityConfig = dataclasses.field(default_factory=GanQualityConfig)
    ablation: BalanceAblationConfig = dataclasses.field(default_factory=BalanceAblationConfig)

    @field_validator("diffaugment")
    @classmethod
    def _known_augmentations(cls, value: str) -> str:
        known = ("color", "translation", "cutout")
        unknown = [name for name in value.split(",") if name.strip() and name.strip() not in known]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; expected a comma-separated subset of {list(known)}")
        return value


#: Train fields an architecture may override in ``train.per_arch`` (besides ``preprocess.input_size``).
PER_ARCH_TRAIN_FIELDS = (
    "steps",
    "eval_every",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_fraction",
    "label_smoothing",
    "grad_clip",
    "dropout",
    "patience",
)
#: Preprocess fields an architecture may override in ``train.per_arch``.
PER_ARCH_PREPROCESS_FIELDS = ("input_size",)


@dataclass(config=_STRICT)
class TrainConfig:
    """Training of every architecture on every fold.

    Training is measured in optimiser steps, not in passes over the data: 20 training tiles make a pass three
    batches long, and a recipe of a few passes never leaves the initialisation. Batches are drawn from a fresh
    shuffle of the training tiles whenever the previous one is used up.

    Attributes:
        architectures: Names from :data:`bonetumor.training.models.ARCHITECTURES`, trained and compared in this order.
        weights: ``auto`` (ImageNet weights from TORCH_HOME, else downloaded by torchvision with its hash check,
            else random initialisation with a warning recorded on every run and model), ``imagenet`` (the same,
            but never falls back: no weights is an error), ``none`` (random init), or a path to a state-dict file
            (``{arch}`` in it is replaced by the architecture).
        trainable: ``all`` layers, the ``top`` block plus the head, or the ``head`` only (needs pretrained weights).
        head_steps: Two-phase fine-tuning: the first ``head_steps`` steps train the head only (at ``lr``), then
            the layers named by ``trainable`` are unfrozen too, at ``lr * finetune_lr_factor``. 0 = one phase.
            Needs pretrained weights.
        finetune_lr_factor: Learning-rate multiplier of the unfrozen layers in the second phase.
        dropout: Dropout probability before the classification layer.
        steps: Optimiser steps per fold (the refit runs the folds' median best step).
        eval_every: Steps between evaluations on the early-stopping set (and checkpoints).
        batch_size: Tiles per optimiser step.
        optimizer: ``adamw`` (Adam with decoupled weight decay) or ``adam`` (the paper's; L2 weight decay).
        lr: Peak learning rate.
        weight_decay: Weight decay (decoupled with ``adamw``).
        scheduler: ``onecycle`` (cosine warm-up from lr/25 to lr, then cosine annealing towards 0, as
            torch's OneCycleLR), ``cosine`` (linear warm-up from 0, then cosine annealing to 0) or ``constant``
            (linear warm-up, then ``lr``).
        warmup_fraction: Share of ``steps`` spent warming up.
        label_smoothing: Label smoothing of the training cross-entropy (the reported losses are unsmoothed).
        grad_clip: Largest global gradient norm; larger gradients are scaled down to it (0 = off). A deep net
            without normalisation layers (VGG19) otherwise diverges at a learning rate a ResNet50 trains well at.
        monitor: Early-stopping-set quantity for early stopping and best-step selection.
        patience: Evaluations without improvement of ``monitor`` before stopping (never during warm-up).
        inner_val_fraction: Share of each fold's training slides held out for early stopping (the outer
            validation fold only scores, never picks the step). 0 disables early stopping: every step runs.
        per_arch: Settings that differ for one architecture, e.g. ``{vgg19: {lr: 0.001, input_size: 48}}``: any of
            :data:`PER_ARCH_TRAIN_FIELDS` and :data:`PER_ARCH_PREPROCESS_FIELDS`.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        num_threads: CPU threads for torch; 0 keeps torch's default.
        num_workers: DataLoader worker processes decoding tiles; 0 decodes in the training process.
        class_weighted_loss: Weight the cross-entropy by inverse class frequency of the (balanced) training set.
        mixed_precision: Use automatic mixed precision (bfloat16/float16 autocast) when training on a GPU.
        channels_last: Memory format of conv activations: ``auto`` (channels_last where measured faster),
            ``on`` or ``off``.
        checkpoint: Save a checkpoint at every evaluation; a killed run resumes from the last one.
        progress: Show progress bars (fold, step, loss, ETA) on stderr.
        seed: Seed of initialisation, batch order and augmentation.
        accelerator: ``gpu`` asks Kubeflow for an accelerator (``kubeflow.accelerator_*``) on every task that trains
            (the fold tasks and the refit); ``none`` runs them on CPU nodes. ``device`` still picks what torch uses.
    """

    architectures: tuple[str, ...] = ("resnet50", "vgg19_bn")
    weights: str = "auto"
    trainable: Literal["all", "top", "head"] = "all"
    head_steps: Annotated[int, Field(ge=0)] = 0
    finetune_lr_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2
    steps: PositiveInt = 160
    eval_every: PositiveInt = 20
    batch_size: Annotated[int, Field(ge=2)] = 16  # batch norm needs 2 or more
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: Annotated[float, Field(gt=0.0)] = 2e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.05
    scheduler: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.15
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    grad_clip: Annotated[float, Field(ge=0.0)] = 0.0
    monitor: Literal["val_macro_f1", "val_loss"] = "val_loss"
    patience: PositiveInt = 5
    inner_val_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.0
    per_arch: dict[str, dict[str, Any]] = dataclasses.field(
        default_factory=lambda: {"vgg19_bn": {"batch_size": 8, "lr": 0.001}}
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: Annotated[int, Field(ge=0)] = 0
    num_workers: Annotated[int, Field(ge=0)] = 0
    class_weighted_loss: bool = False
    mixed_precision: bool = True
    channels_last: Literal["auto", "on", "off"] = "auto"
    checkpoint: bool = True
    progress: bool = True
    seed: int = 42
    accelerator: Literal["none", "gpu"] = "none"

    @field_validator("architectures")
    @classmethod
    def _known_architectures(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Imported here: models pulls in torchvision, which config users (the KFP compiler) should not pay for.
        from bonetumor.training.models import ARCHITECTURES

        unknown = [a for a in value if a not in ARCHITECTURES]
        if not value or unknown:
            raise ValueError(
                f"unknown architectures {unknown or '[]'}; expected a non-empty list from {sorted(ARCHITECTURES)}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"architectures must not repeat, got {list(value)}")
        return value

    @field_validator("weights")
    @classmethod
    def _weights_choice(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("weights is empty; expected auto, imagenet, none or a path to a state-dict file")
        return value

    @field_validator("per_arch")
    @classmethod
    def _per_arch_keys(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from bonetumor.training.models import ARCHITECTURES

        allowed = (*PER_ARCH_TRAIN_FIELDS, *PER_ARCH_PREPROCESS_FIELDS)
        for arch, overrides in value.items():
            if arch not in ARCHITECTURES:
                raise ValueError(f"per_arch: unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
            if not isinstance(overrides, dict):
                raise ValueError(f"per_arch.{arch}: expected a mapping of settings, got {overrides!r}")
            unknown = sorted(set(overrides) - set(allowed))
            if unknown:
                raise ValueError(f"per_arch.{arch}: unknown setting(s) {unknown}; expected some of {list(allowed)}")
        return value

    @model_validator(mode="after")
    def _frozen_layers_need_pretrained_weights(self) -> TrainConfig:
        if self.weights == "none" and self.trainable != "all":
            raise ValueError(
                f"trainable={self.trainable!r} freezes layers of a randomly initialised network, which cannot learn; "
                "use trainable: all with weights: none, or weights: imagenet (or a path) to fine-tune"
            )
        if self.weights == "none" and self.head_steps > 0:
            raise ValueError(
                f"head_steps={self.head_steps} trains a head on random features; use head_steps: 0 with "
                "weights: none, or pretrained weights for two-phase fine-tuning"
            )
        if self.head_steps > 0 and self.head_steps >= self.steps:
            raise ValueError(
                f"head_steps={self.head_steps} leaves no fine-tuning step of steps={self.steps}; "
                "expected head_steps < steps"
            )
        return self


@dataclass(config=_STRICT)
class CandidatesConfig:
    """Models built beside the plain architectures, each scored on the same folds (train stage).

    Attributes:
        two_stage: Train the paper's two-stage classifier per fold: tumour vs non-tumour, then viable vs
            non-viable on tumour tiles, combined into the three class probabilities (two more fits per fold: off
            in the 2-core demo, on in the full protocol).
        two_stage_arch: Architecture of both stages (must be in ``train.architectures`` order of preference; any
            factory name works).
        pruned_vgg19: Prune each fold's VGG19 or VGG19-BN (structured, channels removed) and fine-tune it (needs
            vgg19 or vgg19_bn in ``train.architectures``; off in the 2-core demo, on in the full protocol).
        prune_amount: Share of each conv layer's filters removed (lowest L1 norm first).
        prune_finetune_steps: Fine-tuning optimiser steps of the pruned model.
        int8: Export each fold's models to ONNX and quantise them to INT8 (static, calibrated on training
            tiles), and score the quantised models too (about a minute of the demo). The service answers from
            INT8 only when this out-of-fold score is within ``serving.max_int8_drop`` of FP32's; the registered
            model is exported either way (``register.export_onnx``).
        calibration_tiles: Training tiles used to calibrate the INT8 quantisation.
        latency_batch: Batch size of the CPU latency measurement reported for every model.
    """

    two_stage: bool = False
    two_stage_arch: str = "resnet50"
    pruned_vgg19: bool = False
    prune_amount: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    prune_finetune_steps: PositiveInt = 60
    int8: bool = True
    calibration_tiles: PositiveInt = 32
    latency_batch: PositiveInt = 8

    @field_validator("two_stage_arch")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        from bonetumor.training.models import ARCHITECTURES

        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; expected one of {sorted(ARCHITECTURES)}")
        return value


@dataclass(config=_STRICT)
class BaselineConfig:
    """The simple baseline every network must beat: colour histograms into a random forest, on the same folds.

    Each tile is cropped to its centred square and resized to ``tile_size``; its features are ``bins``-bin
    histograms of the R, G, B, H, S and V channels (and, with ``texture``, a uniform local-binary-pattern histogram
    of the grey image). It sees the tiles' own colours unless ``stain_normalization`` is on: stain normalisation
    removes much of the colour signal a histogram lives on (measured on the sample: mean per-fold macro-F1 0.90
    without, 0.69 with Macenko), and a bar lowered that way would flatter every network.

    Attributes:
        tile_size: Side the tiles are resized to before the histograms.
        stain_normalization: Apply each fold's fitted stain normaliser (the networks' ``augment`` setting) first.
        bins: Histogram bins per channel.
        trees: Trees of the scikit-learn random forest.
        texture: Add the local-binary-pattern texture histogram (scikit-image) to the colour features.
        seed: Seed of the forest.
    """

    tile_size: Annotated[int, Field(ge=16, le=1024)] = 128
    stain_normalization: bool = False
    bins: Annotated[int, Field(ge=2, le=256)] = 16
    trees: PositiveInt = 500
    texture: bool = False
    seed: int = 0


@dataclass(config=_STRICT)
class EvaluateConfig:
    """Evaluation artifacts.

    Attributes:
        confidence_level: Level of the confidence intervals of per-fold metrics (t-distribution over folds).
        gradcam_per_class: Validation tiles per class in each architecture's Grad-CAM gallery (0 = none).
        calibration_bins: Bins of the reliability diagram and the expected calibration error.
    """

    confidence_level: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    gradcam_per_class: Annotated[int, Field(ge=0)] = 2
    calibration_bins: Annotated[int, Field(ge=2)] = 10


@dataclass(config=_STRICT)
class ReferralConfig:
    """Calibration and the rule that refers uncertain tiles to a pathologist.

    Attributes:
        calibrate: Fit temperature scaling on the out-of-fold logits (else the temperature is 1).
        target_class: The class whose recall the rule protects (viable tumour drives treatment response).
        target_recall: Recall of ``target_class`` that the accepted (not referred) predictions must keep: the
            Clopper-Pearson lower bound (at ``confidence``) of the accepted out-of-fold tiles' recall must reach it.
        max_error: Largest error rate of the accepted predictions: the Clopper-Pearson upper bound (at
            ``confidence``) of the accepted out-of-fold tiles' error rate must not exceed it. The confidence
            threshold is the lowest one that meets both; when none does, every tile is referred.
        confidence: One-sided confidence level of both bounds.
        safe_class: A prediction of this class is also referred when P(``target_class``) exceeds
            ``max_target_prob_when_safe`` (the paper: a Non-Tumor call with a real chance of viable tumour).
        max_target_prob_when_safe: See ``safe_class``.
    """

    calibrate: bool = True
    target_class: str = "Viable-Tumor"
    target_recall: Probability = 0.6
    max_error: Probability = 0.3
    confidence: Annotated[float, Field(ge=0.5, lt=1.0)] = 0.8
    safe_class: str = "Non-Tumor"
    max_target_prob_when_safe: Probability = 0.2


@dataclass(config=_STRICT)
class RegisterConfig:
    """Champion selection and registration in the MLflow model registry.

    Attributes:
        model_name: Registered model name.
        alias: Alias a new version gets when it passes the champion gate (serving loads
            ``models:/<model_name>@<alias>``).
        challenger_alias: Alias a new version gets when it does not beat the current champion.
        require_beats_baseline: A model whose mean per-fold macro-F1 does not beat the baseline's (on the same
            folds) becomes the challenger, never the champion.
        export_onnx: Export the registered model to ONNX (FP32) and INT8 (static, calibrated on
            ``candidates.calibration_tiles`` of its training tiles), for small machines.
        min_macro_f1: The evaluation allows a refit and registration only when the winner's mean per-fold
            macro-F1 reaches this (0 = always register; the champion gate then decides the alias).
        promotion_log: Local JSON-lines mirror of every alias change (registration, promote, rollback), relative to
            the project folder; the history itself is kept in MLflow, on the registered model. Empty = no mirror.
    """

    model_name: Annotated[str, Field(min_length=1)] = "bone-tumor-classifier"
    alias: Annotated[str, Field(min_length=1)] = "champion"
    challenger_alias: Annotated[str, Field(min_length=1)] = "challenger"
    require_beats_baseline: bool = True
    export_onnx: bool = True
    min_macro_f1: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    promotion_log: str = "outputs/registry/promotions.jsonl"


@dataclass(config=_STRICT)
class TrackingConfig:
    """MLflow tracking.

    Attributes:
        uri: Tracking URI. ``sqlite:///<relative path>`` is resolved against the project directory.
            The ``MLFLOW_TRACKING_URI`` environment variable overrides it.
        experiment: Experiment that every run of the pipeline logs to.
    """

    uri: str = "sqlite:///mlflow.db"
    experiment: Annotated[str, Field(min_length=1)] = "bone-tumor"


@dataclass(config=_STRICT)
class ServingConfig:
    """The BentoML service: which runtime answers, input checks, the prediction log, following the alias.

    Attributes:
        runtime: ``auto`` serves what the bundle's runtime decision says (ONNX Runtime INT8 when its out-of-fold
            macro-F1 is within ``max_int8_drop`` of FP32, else FP32), or force ``onnx-int8``, ``onnx-fp32`` or
            ``torch`` (eager). Grad-CAM always runs the eager torch model.
        max_int8_drop: Largest loss of out-of-fold macro-F1 (FP32 minus INT8) at which register lets the
            service answer from the INT8 file. Needs ``candidates.int8`` to measure it; without the
            measurement the service answers from FP32.
        ort_threads: ONNX Runtime intra-op threads; 0 = one per CPU core.
        ort_spinning: Whether ONNX Runtime's idle threads busy-wait for the next call: the fastest single
            request, but spinning threads take the cores from concurrent requests and from Grad-CAM.
        api_threads: Requests the service runs at once (BentoML's ``threads``); others wait in its queue.
        min_size: Smallest accepted upload side in pixels; 0 = the model's ``validate.min_size`` (recorded in the
            bundle), so the service refuses what validation would have refused.
        max_upload_bytes: Largest accepted upload (one tile).
        max_batch_files: Most files one ``/predict_batch`` request may carry.
        prediction_log: JSONL file of every answer's audit fields (no image bytes), relative to the project
            folder; empty = off.
        prediction_log_max_bytes: Size at which the log rotates.
        prediction_log_backups: Rotated files kept (``predictions.jsonl.1`` ...); at least one is kept, so that
            ``prediction_log_max_bytes`` bounds the current file.
        reload_seconds: Seconds between checks of where the alias points; a moved alias is loaded in the
            background and swapped in between requests. 0 = never check.
        drift_features: Log, with every answered tile, its colour and stain statistics and its penultimate-layer
            embedding projected on the model's drift reference (a few dozen numbers, never the image), for
            ``bonetumor drift``. Versions registered without a reference log none.
    """

    runtime: Literal["auto", "onnx-int8", "onnx-fp32", "torch"] = "auto"
    max_int8_drop: Probability = 0.01
    ort_threads: Annotated[int, Field(ge=0)] = 0
    ort_spinning: bool = False
    api_threads: PositiveInt = 2
    min_size: Annotated[int, Field(ge=0)] = 0
    max_upload_bytes: PositiveInt = 50 * 1024 * 1024
    max_batch_files: PositiveInt = 64
    prediction_log: str = "outputs/serving/predictions.jsonl"
    prediction_log_max_bytes: PositiveInt = 10 * 1024 * 1024
    prediction_log_backups: Annotated[int, Field(ge=0)] = 5
    reload_seconds: Annotated[float, Field(ge=0.0)] = 30.0
    drift_features: bool = True


@dataclass(config=_STRICT)
class MonitoringConfig:
    """Drift of served inputs against the training reference (``bonetumor drift``) and what it starts.

    Attributes:
        ks_alpha: A colour or stain statistic drifts when its two-sample KS test's Holm-adjusted p-value is below
            this and its PSI is above ``psi_threshold``.
        psi_threshold: Population stability index above which a statistic may drift (0.25 is the usual "major
            shift").
        mmd_alpha: The embeddings drift when the permutation p-value of their MMD is below this.
        permutations: Permutations of the MMD test.
        rate_alpha: A label or referral rate drifts when its test against the reference's rate is below this.
        min_records: Fewer served tiles than this give "insufficient data", never drift.
        report_dir: Where ``bonetumor drift`` writes its report, relative to the project folder.
        retrain_on_drift: Whether ``bonetumor drift --retrain`` starts the pipeline when it finds drift.
    """

    ks_alpha: Probability = 0.01
    psi_threshold: Annotated[float, Field(gt=0.0)] = 0.25
    mmd_alpha: Probability = 0.01
    permutations: Annotated[int, Field(ge=20)] = 200
    rate_alpha: Probability = 0.01
    min_records: Annotated[int, Field(ge=2)] = 20
    report_dir: str = "outputs/monitoring"
    retrain_on_drift: bool = True


@dataclass(config=_STRICT)
class AssessConfig:
    """Whole-slide assessment (``bonetumor assess``, ``/assess``): tiling, the necrosis estimate, the limits.

    Attributes:
        tile_microns: Side in microns of the square a tile covers: what one training tile covered. TCIA tiles are
            1024 px at 10x, about 1.0 um/px, so about 1024 um.
        mpp: Microns per pixel of the input at full resolution; 0 = read it from the slide (OpenSlide's
            ``openslide.mpp-x``, a TIFF's resolution tags). An input without it is refused unless this is set.
        read_size: Side in pixels each tile is read at before the model's own preprocessing. 256 is the size of
            the sample's training files (1024 px originals resized to 256); at least 128, the smallest tile
            ``/predict`` accepts by default (``validate.min_size``).
        tcia_tile_px: Side in slide pixels of one TCIA tile, for a folder or zip of tiles placed by the x and y
            in their names.
        min_tissue_fraction: A tile with less tissue (thumbnail mask first, then the read tile, with validation's
            own tissue function) is glass and is skipped.
        thumbnail_side: Longest side of the thumbnail the tissue mask and the overlay use (raised so that each
            tile spans at least 8 of its pixels).
        batch_size: Tiles per model call.
        workers: Threads that read and decode tiles while the model classifies the previous batch.
        necrotic_class: The class counted as necrotic tumour.
        viable_class: The class counted as viable tumour.
        good_response_percent: Necrosis at or above which the response is good (Huvos grade III/IV: 90 %).
        bootstrap: Bootstrap resamples of the tiles for the interval (0 = none).
        confidence_level: Level of the bootstrap interval.
        seed: Seed of the bootstrap.
        max_image_pixels: Largest plain (untiled) image accepted: such an image is decoded whole, so this bounds
            the memory; a larger one must be converted to a pyramidal TIFF first.
        max_upload_bytes: Largest upload ``/assess`` accepts (413 above).
        results_dir: Where the service keeps each assessment's outputs, relative to the project folder.
    """

    tile_microns: Annotated[float, Field(gt=0.0)] = 1024.0
    mpp: Annotated[float, Field(ge=0.0)] = 0.0
    read_size: Annotated[int, Field(ge=128)] = 256
    tcia_tile_px: PositiveInt = 1024
    min_tissue_fraction: Probability = 0.25
    thumbnail_side: Annotated[int, Field(ge=64)] = 2048
    batch_size: PositiveInt = 32
    workers: Annotated[int, Field(ge=1)] = 2
    necrotic_class: str = "Non-Viable-Tumor"
    viable_class: str = "Viable-Tumor"
    good_response_percent: Annotated[float, Field(ge=0.0, le=100.0)] = 90.0
    bootstrap: Annotated[int, Field(ge=0)] = 2000
    confidence_level: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.95
    seed: int = 0
    max_image_pixels: PositiveInt = 250_000_000
    max_upload_bytes: PositiveInt = 2 * 1024 * 1024 * 1024
    results_dir: str = "outputs/serving/assess"


@dataclass(config=_STRICT)
class TaskResources:
    """CPU and memory a Kubeflow task requests (and is limited to), in Kubernetes quantities.

    Attributes:
        cpu: CPU request, e.g. ``"2"`` or ``"500m"``; the limit is twice it.
        memory: Memory request and limit, e.g. ``"8Gi"``.
    """

    cpu: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")] = "1"
    memory: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")] = "2Gi"


def _default_task_resources() -> dict[str, TaskResources]:
    return {
        "default": TaskResources("1", "2Gi"),
        "balance": TaskResources("2", "4Gi"),
        "train_fold": TaskResources("4", "8Gi"),
        "register": TaskResources("4", "8Gi"),
    }


@dataclass(config=_STRICT)
class KubeflowConfig:
    """How the compiled Kubeflow pipeline runs on a cluster (read at compile time: ``bonetumor pipeline compile``).

    Attributes:
        parallelism: Fold tasks (and balance tasks) that run at once.
        retries: Retries of a task that fails (a preempted node, a transient storage error), with backoff.
        retry_backoff_seconds: Wait before the first retry; doubled for each next one.
        resources: Task name (``balance``, ``train_fold``, ``register``...) to its requests; ``default`` for the rest.
        accelerator_type: The accelerator of ``train.accelerator: gpu`` (``nvidia.com/gpu``).
        accelerator_limit: Accelerators per training task.
        node_selector: Node labels the training tasks need with ``train.accelerator: gpu``.
        tolerations: Taints they tolerate, ``key``/``operator``/``value``/``effect`` each.
        mlflow_secret: Kubernetes Secret with ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``.
        s3_secret: Kubernetes Secret with ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (artifacts, DVC remote).
    """

    parallelism: PositiveInt = 4
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_backoff_seconds: PositiveInt = 60
    resources: dict[str, TaskResources] = dataclasses.field(default_factory=_default_task_resources)
    accelerator_type: Annotated[str, Field(min_length=1)] = "nvidia.com/gpu"
    accelerator_limit: PositiveInt = 1
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: list[dict[str, str]] = dataclasses.field(default_factory=list)
    mlflow_secret: Annotated[str, Field(min_length=1)] = "bonetumor-mlflow-auth"  # noqa: S105  (a Secret's name, not a password)
    s3_secret: Annotated[str, Field(min_length=1)] = "bonetumor-s3"  # noqa: S105

    def task_resources(self, task: str) -> TaskResources:
        """Return the requests of ``task`` (``default`` when it has none of its own)."""
        return self.resources.get(task) or self.resources.get("default") or TaskResources()


@dataclass(config=_STRICT)
class Config:
    """The whole of params.yaml."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    data_import: DataImportConfig = dataclasses.field(default_factory=DataImportConfig)
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    candidates: CandidatesConfig = dataclasses.field(default_factory=CandidatesConfig)
    baseline: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    referral: ReferralConfig = dataclasses.field(default_factory=ReferralConfig)
    register: RegisterConfig = dataclasses.field(default_factory=RegisterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    assess: AssessConfig = dataclasses.field(default_factory=AssessConfig)
    monitoring: MonitoringConfig = dataclasses.field(default_factory=MonitoringConfig)
    kubeflow: KubeflowConfig = dataclasses.field(default_factory=KubeflowConfig)

    def __post_init__(self) -> None:
        # Cross-section rules; ValueError becomes a ConfigError naming the field in from_dict.
        # assess.necrotic_class / viable_class are checked against the model's classes when a slide is assessed:
        # a project may train other classes and never assess a slide.
        if self.assess.necrotic_class == self.assess.viable_class:
            raise ValueError("assess.necrotic_class and assess.viable_class must differ")
        for name in ("target_class", "safe_class"):
            value = getattr(self.referral, name)
            if value not in self.data.classes:
                raise ValueError(f"referral.{name}={value!r} is not a class; expected one of {list(self.data.classes)}")
        if self.referral.target_class == self.referral.safe_class:
            raise ValueError("referral.target_class and referral.safe_class must differ")
        if self.register.alias == self.register.challenger_alias:
            raise ValueError("register.alias and register.challenger_alias must differ")
        for arch in self.train.per_arch:
            self.for_arch(arch)  # an override out of range fails here, at load time, naming the field

    def for_arch(self, arch: str) -> Config:
        """Return the config one architecture trains with: ``train.per_arch[arch]`` applied to train/preprocess.

        The result holds the effective settings and an empty ``per_arch`` (the overrides are applied).

        Args:
            arch: An architecture name (one without overrides gets this config itself).

        Raises:
            ValueError: An override is out of range or leaves an inconsistent config (the message names it).
        """
        overrides = self.train.per_arch.get(arch)
        if not overrides:
            return self
        train = {k: v for k, v in overrides.items() if k in PER_ARCH_TRAIN_FIELDS}
        preprocess = {k: v for k, v in overrides.items() if k in PER_ARCH_PREPROCESS_FIELDS}
        try:
            train_section = TrainConfig(**{**dataclasses.asdict(self.train), **train, "per_arch": {}})
            preprocess_section = PreprocessConfig(**{**dataclasses.asdict(self.preprocess), **preprocess})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
            raise ValueError(f"train.per_arch.{arch}: {problems} (got {overrides})") from exc
        return dataclasses.replace(self, train=train_section, preprocess=preprocess_section)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        """Build and validate a config from a nested dict (params.yaml content).

        Args:
            raw: Mapping of section name to a mapping of fields. Missing sections and fields take defaults.
            source: Where the dict came from, used in error messages.

        Returns:
            The validated config.

        Raises:
            ConfigError: A field is unknown, missing a valid value, or out of range.
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections {sorted(_SECTIONS)}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_SECTIONS))
        if unknown:
            hints = "".join(_did_you_mean(name, list(_SECTIONS)) for name in unknown)
            raise ConfigError(f"{source}: unknown section(s) {unknown}{hints}; expected sections {sorted(_SECTIONS)}")
        renamed = [
            f"{section}.{key}: {hint}"
            for (section, key), hint in RENAMED_KEYS.items()
            if isinstance(raw.get(section), dict) and key in raw[section]
        ]
        if renamed:
            raise ConfigError(f"{source}: settings of an older params.yaml: " + "; ".join(renamed))
        try:
            return cls(**{name: _SECTIONS[name](**(value or {})) for name, value in raw.items()})
        except ValidationError as exc:
            section = next((name for name, kind in _SECTIONS.items() if kind.__name__ == exc.title), "params")
            problems = "; ".join(_problem(section, err) for err in exc.errors())
            raise ConfigError(f"{source}: {problems}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Return the config as plain JSON/YAML-serialisable data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def section_hash(self, *sections: str) -> str:
        """Return a short stable hash of the given sections (all when none given), for run tags and cache keys."""
        data = self.to_dict()
        chosen = {name: data[name] for name in (sections or tuple(data))}
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def _did_you_mean(name: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing when none is close."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _problem(section: str, err: Any) -> str:
    """One validation error as ``section.field: message (got value)``, with a hint for a misspelt key."""
    if not err["loc"]:
        return f"{section}: {err['msg']}"
    field_path = ".".join(str(p) for p in err["loc"])
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument") and len(err["loc"]) == 1:
        key = str(err["loc"][0])
        fields = [f.name for f in dataclasses.fields(_SECTIONS[section])] if section in _SECTIONS else []
        renamed = {old: hint for (sec, old), hint in RENAMED_KEYS.items() if sec == section}
        hint = _did_you_mean(key, fields + list(renamed))
        closest = hint.split("'")[1] if hint else ""
        if closest in renamed:
            hint = f" (did you mean {closest!r}? That key was {renamed[closest]})"
        return f"{section}.{key}: unknown key{hint}; expected one of {sorted(fields)}"
    return f"{section}.{field_path}: {err['msg']} (got {err.get('input')!r})"


#: Keys of earlier params.yaml versions and what replaced them (training is counted in steps since 0.2).
RENAMED_KEYS: dict[tuple[str, str], str] = {
    ("preprocess", "image_size"): "replaced by tile_size (the side tiles are resized to) and input_size (the crop "
    "the network sees); image_size N was tile_size N, input_size N",
    ("train", "epochs"): "replaced by steps (optimiser steps per fold)",
    ("train", "head_epochs"): "replaced by head_steps",
    ("candidates", "prune_finetune_epochs"): "replaced by prune_finetune_steps",
}

_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "data_import": DataImportConfig,
    "preprocess": PreprocessConfig,
    "validate": ValidateConfig,
    "split": SplitConfig,
    "augment": AugmentConfig,
    "balance": BalanceConfig,
    "train": TrainConfig,
    "candidates": CandidatesConfig,
    "baseline": BaselineConfig,
    "evaluate": EvaluateConfig,
    "referral": ReferralConfig,
    "register": RegisterConfig,
    "tracking": TrackingConfig,
    "serving": ServingConfig,
    "assess": AssessConfig,
    "monitoring": MonitoringConfig,
    "kubeflow": KubeflowConfig,
}


def load_config(path: str | Path) -> Config:
    """Read and validate params.yaml.

    Args:
        path: The YAML file.

    Returns:
        The validated config.

    Raises:
        ConfigError: The file is missing, is not YAML, or fails validation.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: params file not found (expected a YAML file like the project's params.yaml)"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return Config.from_dict(raw or {}, source=str(path))


def save_resolved(config: Config, out_dir: str | Path, sections: tuple[str, ...] = ()) -> Path:
    """Write the resolved config (or the given sections of it) as ``config.resolved.yaml`` into ``out_dir``.

    Args:
        config: The config the stage ran with.
        out_dir: The stage's output folder.
        sections: Sections to write; all when empty.

    Returns:
        The written file.
    """
    data = config.to_dict()
    if sections:
        data = {name: data[name] for name in sections}
    out = Path(out_dir) / "config.resolved.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return out
