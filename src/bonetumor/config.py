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
    """

    min_size: PositiveInt = 128


@dataclass(config=_STRICT)
class SplitConfig:
    """Grouped, stratified k-fold cross-validation.

    Attributes:
        n_folds: Number of folds (the paper uses 5).
        group_by: Manifest column whose values never straddle training and validation.
        seed: Seed of the fold assignment.
    """

    n_folds: Annotated[int, Field(ge=2)] = 3
    group_by: Literal["slide", "case"] = "slide"
    seed: int = 42


@dataclass(config=_STRICT)
class AugmentConfig:
    """The augmentation policy applied on the fly to training tiles.

    Attributes:
        rotation_degrees: Random rotation range, +/- this many degrees.
        hflip_p: Probability of a horizontal flip.
        vflip_p: Probability of a vertical flip.
        zoom_max: Largest zoom factor; a random crop of 1/zoom of the tile side is resized back.
        preview_tiles: How many tiles the preview grid shows (rows).
        preview_samples: How many augmented versions of each tile the preview shows (columns after the original).
        seed: Seed of the preview's random draws.
    """

    rotation_degrees: Annotated[float, Field(ge=0.0, le=180.0)] = 90.0
    hflip_p: Probability = 0.5
    vflip_p: Probability = 0.5
    zoom_max: Annotated[float, Field(ge=1.0, le=4.0)] = 1.25
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
        seed: Seed of initialisation, shuffling and augmentation.
    """

    architectures: tuple[str, ...] = ("resnet50", "vgg19")
    weights: str = "none"
    trainable: Literal["all", "top", "head"] = "all"
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
        return self


@dataclass(config=_STRICT)
class RegisterConfig:
    """Champion selection and registration in the MLflow model registry.

    Attributes:
        model_name: Registered model name.
        alias: Alias set on the new version (serving loads ``models:/<model_name>@<alias>``).
    """

    model_name: Annotated[str, Field(min_length=1)] = "bone-tumor-classifier"
    alias: Annotated[str, Field(min_length=1)] = "champion"


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
    preprocess: PreprocessConfig = dataclasses.field(default_factory=PreprocessConfig)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    register: RegisterConfig = dataclasses.field(default_factory=RegisterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

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
            section = exc.title.removesuffix("Config").lower()
            problems = "; ".join(
                f"{section}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                if err["loc"]
                else f"{section}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"{source}: {problems}") from exc
        except TypeError as exc:
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
    "preprocess": PreprocessConfig,
    "validate": ValidateConfig,
    "split": SplitConfig,
    "augment": AugmentConfig,
    "balance": BalanceConfig,
    "train": TrainConfig,
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
