"""Exceptions raised by bonetumor.

Every error says what was wrong, where (file, field, row) and what was expected, so a user can fix the input
without reading the code. All of them derive from :class:`BoneTumorError`, which the CLI turns into a clean
non-zero exit instead of a traceback.
"""

from __future__ import annotations


class BoneTumorError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(BoneTumorError):
    """params.yaml (or a config dict) is missing a field, has an unknown one, or holds an invalid value."""


class DatasetError(BoneTumorError):
    """A data set folder or manifest does not have the expected layout or content."""


class TileNameError(DatasetError):
    """A tile file name does not follow the TCIA naming scheme, so its case and slide are unknown."""


class InvalidImageError(BoneTumorError):
    """Bytes or a file that should hold an image cannot be decoded as one."""


class DataValidationError(BoneTumorError):
    """The Great Expectations suite failed; the message names the expectations and the failing files."""


class SplitError(BoneTumorError):
    """Folds cannot be made as asked (too few groups) or a folds file breaks the grouping rule."""


class WeightsUnavailableError(BoneTumorError):
    """Pretrained weights were requested but cannot be found or do not match their expected hash."""


class WeightsCorruptError(WeightsUnavailableError):
    """A weights file (in TORCH_HOME, or just downloaded) does not match the hash torchvision expects."""


class ModelNotFoundError(BoneTumorError):
    """The requested registered model, version or alias does not exist in the MLflow registry."""


class ArtifactError(BoneTumorError):
    """An upstream stage output is missing or malformed (for example a half-written run)."""


class SlideError(InvalidImageError):
    """A whole-slide input cannot be assessed: not a slide, unreadable, no tissue, unknown scale, bad tile names."""


class CheckpointWriteError(BoneTumorError):
    """A training checkpoint could not be written (a full disk); the previous checkpoint is kept."""


class StoreLockedError(ConfigError):
    """Another run holds the pipeline's or the tracking store's lock."""


class RegistryUnavailableError(ConfigError):
    """The tracking store holding the registry cannot be reached or read: the model may exist, but not here."""


class RegistrationRefusedError(BoneTumorError):
    """The evaluation does not allow a refit and registration (``register.min_macro_f1``)."""


class PromotionRefusedError(BoneTumorError):
    """An alias move that needs more than was given (``--force`` to lower the gate's figures, an earlier holder)."""
