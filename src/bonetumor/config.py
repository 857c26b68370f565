"""Configuration: validated dataclasses that mirror params.yaml section by section.

params.yaml is the single source of every knob. Each pipeline stage reads only its own sections, and dvc.yaml
declares exactly those sections as the stage's params, so changing one knob reruns only the stages it affects.
The dataclasses below validate types and ranges (pydantic dataclasses, unknown keys rejected) and the resolved
config is written beside every stage output with :func:`save_resolved`.
"""

from __future__ import annotations

import dataclasses
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
    """Preprocessing shared by training and serving: resize to a square and normalise.

    Attributes:
        image_size: Side in pixels of the square model input (the paper uses 224; VGG19 needs at least 32).
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided after subtracting the mean.
    """

    image_size: Annotated[int, Field(ge=32, le=1024)] = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v <= 0 for v in value):
            raise ValueError(f"every std must be > 0, got {list(value)}")
        return value


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
        rotation_degrees: Random rotation range, +/- this many degrees.
        hflip_p: Probability of a horizontal flip.
        vflip_p: Probability of a vertical flip.
        zoom_max: Largest zoom factor; a random crop of 1/zoom of the tile side is resized back.
        hed_jitter: Strength of H&E stain augmentation: each of the haematoxylin, eosin and DAB channels (colour
            deconvolution) is scaled by 1 +/- and shifted by +/- this amount (0 = off).
        stain_normalization: ``none``, ``reinhard`` or ``macenko``. The target stain is fitted on the training
            tiles only (each fold's, and all training tiles for the final model), stored with the model, and
            applied to every tile in training, evaluation and serving.
        preview_tiles: How many tiles the preview grid shows (rows).
        preview_samples: How many augmented versions of each tile the preview shows (columns after the original).
        seed: Seed of the preview's random draws.
    """

    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)] = 90.0
    hflip_p: Probability = 0.5
    vflip_p: Probability = 0.5
    zoom_max: Annotated[float, Field(ge=1.0, le=4.0)] = 1.25
    hed_jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.03
    stain_normalization: Literal["none", "reinhard", "macenko"] = "macenko"
    preview_tiles: PositiveInt = 6
    preview_samples: PositiveInt = 5
    seed: int = 0


@dataclass(config=_STRICT)
class BalanceConfig:
    """GAN-based class balancing of each fold's training set.

    Attributes:
        enabled: When false, no GAN is trained and no synthetic tiles are made.
        target_ratio: Each class is filled with synthetic tiles up to ``target_ratio`` times the size of the
            largest class of that training set (1.0 = fully balanced).
        image_size: Side of the generated tiles in pixels (a power of two, 16 to 128).
        latent_dim: Size of the generator's noise vector.
        steps: Optimisation steps of the GAN per training set.
        batch_size: GAN mini-batch size.
        lr: Adam learning rate of generator and discriminator.
        seed: Seed of GAN initialisation, training and sampling.
    """

    enabled: bool = True
    target_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    image_size: Literal[16, 32, 64, 128] = 32
    latent_dim: PositiveInt = 64
    steps: PositiveInt = 300
    batch_size: Annotated[int, Field(ge=2)] = 16  # the generator's batch norm needs 2 or more
    lr: Annotated[float, Field(gt=0.0)] = 2e-4
    seed: int = 0


@dataclass(config=_STRICT)
class TrainConfig:
    """Training of every architecture on every fold.

    Attributes:
        architectures: Names from :data:`bonetumor.models.ARCHITECTURES`, trained and compared in this order.
        weights: ``none`` (random init), ``imagenet`` (torchvision weights from TORCH_HOME, never downloaded),
            or a path to a state-dict file.
        trainable: ``all`` layers, the ``top`` block plus the head, or the ``head`` only.
        head_epochs: Two-phase fine-tuning: the first ``head_epochs`` epochs train the head only (at ``lr``), then
            the layers named by ``trainable`` are unfrozen at ``lr * finetune_lr_factor``. 0 = one phase. Needs
            pretrained weights.
        finetune_lr_factor: Learning-rate multiplier of the unfrozen layers in the second phase.
        dropout: Dropout probability before the classification layer.
        epochs: Maximum epochs per fold.
        batch_size: Mini-batch size.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        scheduler: Learning-rate schedule: ``cosine`` annealing over the epochs, ``plateau`` (halve when the
            validation loss stalls) or ``none``.
        monitor: Validation quantity for early stopping and best-epoch selection.
        patience: Epochs without improvement of ``monitor`` before stopping.
        inner_val_fraction: Share of each fold's training slides held out for early stopping (the outer
            validation fold only scores, never picks the epoch). 0 disables early stopping: every epoch runs.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        num_threads: CPU threads for torch; 0 keeps torch's default.
        num_workers: DataLoader worker processes decoding tiles; 0 decodes in the training process.
        class_weighted_loss: Weight the cross-entropy by inverse class frequency of the (balanced) training set.
        mixed_precision: Use automatic mixed precision (bfloat16/float16 autocast) when training on a GPU.
        channels_last: Memory format of conv activations: ``auto`` (channels_last where measured faster),
            ``on`` or ``off``.
        checkpoint: Save a checkpoint after every epoch; a killed run resumes from the last one.
        progress: Show progress bars (fold, epoch, loss, ETA) on stderr.
        seed: Seed of initialisation, shuffling and augmentation.
    """

    architectures: tuple[str, ...] = ("resnet50", "vgg19")
    weights: str = "none"
    trainable: Literal["all", "top", "head"] = "all"
    head_epochs: Annotated[int, Field(ge=0)] = 0
    finetune_lr_factor: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    epochs: PositiveInt = 6
    batch_size: PositiveInt = 8
    lr: Annotated[float, Field(gt=0.0)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    scheduler: Literal["cosine", "plateau", "none"] = "cosine"
    monitor: Literal["val_macro_f1", "val_loss"] = "val_macro_f1"
    patience: PositiveInt = 3
    inner_val_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = 0.25
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: Annotated[int, Field(ge=0)] = 0
    num_workers: Annotated[int, Field(ge=0)] = 0
    class_weighted_loss: bool = False
    mixed_precision: bool = True
    channels_last: Literal["auto", "on", "off"] = "auto"
    checkpoint: bool = True
    progress: bool = True
    seed: int = 42

    @field_validator("architectures")
    @classmethod
    def _known_architectures(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Imported here: models pulls in torchvision, which config users (the KFP compiler) should not pay for.
        from bonetumor.models import ARCHITECTURES

        unknown = [a for a in value if a not in ARCHITECTURES]
        if not value or unknown:
            raise ValueError(
                f"unknown architectures {unknown or '[]'}; expected a non-empty list from {sorted(ARCHITECTURES)}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"architectures must not repeat, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _frozen_layers_need_pretrained_weights(self) -> TrainConfig:
        if self.weights == "none" and self.trainable != "all":
            raise ValueError(
                f"trainable={self.trainable!r} freezes layers of a randomly initialised network, which cannot learn; "
                "use trainable: all with weights: none, or weights: imagenet (or a path) to fine-tune"
            )
        if self.weights == "none" and self.head_epochs > 0:
            raise ValueError(
                f"head_epochs={self.head_epochs} trains a head on random features; use head_epochs: 0 with "
                "weights: none, or pretrained weights for two-phase fine-tuning"
            )
        if self.head_epochs > 0 and self.head_epochs >= self.epochs:
            raise ValueError(
                f"head_epochs={self.head_epochs} leaves no fine-tuning epoch of epochs={self.epochs}; "
                "expected head_epochs < epochs"
            )
        return self


@dataclass(config=_STRICT)
class CandidatesConfig:
    """Models built beside the plain architectures, each scored on the same folds (train stage).

    Attributes:
        two_stage: Train the paper's two-stage classifier per fold: tumour vs non-tumour, then viable vs
            non-viable on tumour tiles, combined into the three class probabilities.
        two_stage_arch: Architecture of both stages (must be in ``train.architectures`` order of preference; any
            factory name works).
        pruned_vgg19: Prune each fold's VGG19 (structured, channels removed) and fine-tune it (needs vgg19 in
            ``train.architectures``).
        prune_amount: Share of each conv layer's filters removed (lowest L1 norm first).
        prune_finetune_epochs: Fine-tuning epochs of the pruned model.
        int8: Export each fold's models to ONNX and quantise them to INT8 (static, calibrated on training
            tiles), and score the quantised models too.
        calibration_tiles: Training tiles used to calibrate the INT8 quantisation.
        latency_batch: Batch size of the CPU latency measurement reported for every model.
    """

    two_stage: bool = True
    two_stage_arch: str = "resnet50"
    pruned_vgg19: bool = True
    prune_amount: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    prune_finetune_epochs: PositiveInt = 2
    int8: bool = True
    calibration_tiles: PositiveInt = 32
    latency_batch: PositiveInt = 8

    @field_validator("two_stage_arch")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        from bonetumor.models import ARCHITECTURES

        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {value!r}; expected one of {sorted(ARCHITECTURES)}")
        return value


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
        target_recall: Recall of ``target_class`` that the accepted (not referred) predictions must reach; the
            confidence threshold is the lowest one that meets it on out-of-fold predictions.
        safe_class: A prediction of this class is also referred when P(``target_class``) exceeds
            ``max_target_prob_when_safe`` (the paper: a Non-Tumor call with a real chance of viable tumour).
        max_target_prob_when_safe: See ``safe_class``.
    """

    calibrate: bool = True
    target_class: str = "Viable-Tumor"
    target_recall: Probability = 0.95
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
    """

    model_name: Annotated[str, Field(min_length=1)] = "bone-tumor-classifier"
    alias: Annotated[str, Field(min_length=1)] = "champion"
    challenger_alias: Annotated[str, Field(min_length=1)] = "challenger"


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
    evaluate: EvaluateConfig = dataclasses.field(default_factory=EvaluateConfig)
    referral: ReferralConfig = dataclasses.field(default_factory=ReferralConfig)
    register: RegisterConfig = dataclasses.field(default_factory=RegisterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # Cross-section rules; ValueError becomes a ConfigError naming the field in from_dict.
        for name in ("target_class", "safe_class"):
            value = getattr(self.referral, name)
            if value not in self.data.classes:
                raise ValueError(f"referral.{name}={value!r} is not a class; expected one of {list(self.data.classes)}")
        if self.referral.target_class == self.referral.safe_class:
            raise ValueError("referral.target_class and referral.safe_class must differ")
        if self.register.alias == self.register.challenger_alias:
            raise ValueError("register.alias and register.challenger_alias must differ")

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
            raise ConfigError(f"{source}: unknown section(s) {unknown}; expected sections {sorted(_SECTIONS)}")
        try:
            return cls(**{name: _SECTIONS[name](**(value or {})) for name, value in raw.items()})
        except ValidationError as exc:
            section = next((name for name, kind in _SECTIONS.items() if kind.__name__ == exc.title), "params")
            problems = "; ".join(
                f"{section}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                if err["loc"]
                else f"{section}: {err['msg']}"
                for err in exc.errors()
            )
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
    "evaluate": EvaluateConfig,
    "referral": ReferralConfig,
    "register": RegisterConfig,
    "tracking": TrackingConfig,
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
