"""The model bundle (weights plus metadata, as in MONAI bundles) and the predictor that serves it.

A bundle folder holds ``weights.pt`` (the network's state dict, loaded with ``weights_only=True``, no pickled
code) and ``metadata.json``: architecture, class order, tile and crop sizes, the test-time views, mean/std,
dropout, the stain normaliser fitted on the training tiles, the calibrated referral rule, library versions and
provenance (including where the starting weights came from, ``init``). Everything a server needs to rebuild the
model, preprocess an image exactly as in training, average the same test-time views and decide whether to refer
it is in there.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from bonetumor import __version__
from bonetumor.config import PreprocessConfig
from bonetumor.errors import ArtifactError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.training.models import build_model
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import TestTimeAugmented, TestTimeViews, with_views
from bonetumor.utils import read_json, write_json

BUNDLE_FORMAT_VERSION = 4
#: Earlier formats that still load (version 1 had no stain normaliser and no referral rule; versions 1 and 2 had
#: one ``image_size`` and no test-time views: they load as tile and crop of that size, one view; versions 1 to 3
#: had no input checks and no runtime decision: they are served without a size floor or tissue check by torch,
#: or by ONNX when the bundle holds the files).
READABLE_FORMATS = (1, 2, 3, 4)
WEIGHTS_FILE = "weights.pt"
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class ModelMetadata:
    """What a served model needs besides its weights.

    Attributes:
        arch: Architecture name for :func:`bonetumor.training.models.build_model`.
        classes: Class names in output order.
        tile_size: Side every tile is resized to, in pixels.
        input_size: Side of the network's square input crop, in pixels.
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        dropout: Dropout of the head (needed to rebuild the same module tree).
        test_crops: Test-time crops per tile (1 or 5).
        test_flips: Whether each test-time crop is also seen mirrored.
        provenance: Data version, git commit, params hash, run ids, scores and ``init`` (where the starting
            weights came from) of the training that made it.
        versions: Library versions it was trained with.
        stain: The stain normaliser fitted on the training tiles (``StainNormalizer.to_dict``), or None.
        referral: The calibrated referral rule (``ReferralPolicy.to_dict``), or None.
        input_checks: What validation required of a training tile, applied to uploads too: ``min_size`` (pixels)
            and ``min_tissue_fraction``; None for bundles from before format 4.
        runtime: Which ONNX file the service answers from and why (:func:`bonetumor.serving.engines.decide_runtime`):
            ``engine`` (``onnx-int8``, ``onnx-fp32`` or ``torch``), ``reason``, ``files`` and the out-of-fold
            figures it was decided on; None when nothing was exported.
        format_version: Bundle format version.
    """

    arch: str
    classes: tuple[str, ...]
    tile_size: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dropout: float
    test_crops: int = 5
    test_flips: bool = True
    provenance: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    stain: dict[str, Any] | None = None
    referral: dict[str, Any] | None = None
    input_checks: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None
    format_version: int = BUNDLE_FORMAT_VERSION

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing config this model expects (the same one training used)."""
        return PreprocessConfig(
            tile_size=self.tile_size,
            input_size=self.input_size,
            test_crops=self.test_crops,  # type: ignore[arg-type]
            test_flips=self.test_flips,
            mean=self.mean,
            std=self.std,
        )

    @property
    def views(self) -> TestTimeViews:
        """The test-time views the model answers from."""
        return TestTimeViews.from_config(self.preprocess)

    @staticmethod
    def current_versions() -> dict[str, str]:
        """Return the versions of the libraries that matter for reproducing a model."""
        return {
            "bonetumor": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        }


def save_bundle(model: nn.Module, metadata: ModelMetadata, out_dir: str | Path) -> Path:
    """Write ``weights.pt`` (the network's, without its views) and ``metadata.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    network = model.model if isinstance(model, TestTimeAugmented) else model
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, out_dir / WEIGHTS_FILE)
    write_json(out_dir / METADATA_FILE, asdict(metadata))
    return out_dir


def write_metadata(bundle_dir: str | Path, metadata: ModelMetadata) -> Path:
    """Rewrite a bundle's ``metadata.json`` (register adds the input checks and the runtime decision)."""
    return write_json(Path(bundle_dir) / METADATA_FILE, asdict(metadata))


def answers_from_logits(
    logits: np.ndarray, classes: tuple[str, ...], referral: ReferralPolicy | None
) -> list[dict[str, Any]]:
    """Turn logits into answers: calibrated probabilities, the label, the confidence and the referral decision.

    Every runtime (eager torch, ONNX FP32 or INT8) answers through this one function, so the temperature and the
    referral rule fitted in evaluate are applied the same way whichever engine produced the logits.

    Args:
        logits: ``(N, len(classes))`` logits (averaged over the test-time views inside the model).
        classes: Class names in output order.
        referral: The model's referral rule; None gives plain softmax and never refers.

    Returns:
        One dict per row: ``label``, ``probabilities``, ``confidence`` and ``referral`` (``refer``, ``reason``).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if referral is None:
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
        confidence, refer, reasons = probs.max(1), np.zeros(len(probs), dtype=bool), [""] * len(probs)
    else:
        probs = referral.calibrated_probs(logits)
        confidence, refer, reasons = referral.decide_batch(probs)
    return [
        {
            "label": classes[int(p.argmax())],
            "probabilities": dict(zip(classes, map(float, p), strict=True)),
            "confidence": float(c),
            "referral": {"refer": bool(r), "reason": reason},
        }
        for p, c, r, reason in zip(probs, confidence, refer, reasons, strict=True)
    ]


def _upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """Read a format 1 or 2 metadata dict as format 3 (one image size, one view)."""
    if raw.get("format_version") in (1, 2) and "image_size" in raw:
        size = raw.pop("image_size")
        raw = {**raw, "tile_size": size, "input_size": size, "test_crops": 1, "test_flips": False}
    return raw


def load_bundle(bundle_dir: str | Path) -> tuple[nn.Module, ModelMetadata]:
    """Rebuild the network (without its views: see :attr:`ModelMetadata.views`) from a bundle, in eval mode.

    Raises:
        ArtifactError: A file is missing, the format version is unknown, or the weights do not fit the metadata.
    """
    bundle_dir = Path(bundle_dir)
    raw = read_json(bundle_dir / METADATA_FILE, "model metadata")
    if not isinstance(raw, dict) or raw.get("format_version") not in READABLE_FORMATS:
        raise ArtifactError(
            f"{bundle_dir / METADATA_FILE}: not a model bundle of format version {list(READABLE_FORMATS)}"
        )
    try:
        raw = _upgrade(raw)
        metadata = ModelMetadata(
            **{**raw, "classes": tuple(raw["classes"]), "mean": tuple(raw["mean"]), "std": tuple(raw["std"])}
        )
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{bundle_dir / METADATA_FILE}: malformed metadata ({exc})") from exc
    weights = bundle_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"model weights not found at {weights}")
    model = build_model(metadata.arch, len(metadata.classes), metadata.dropout)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except RuntimeError as exc:
        raise ArtifactError(
            f"{weights}: weights do not fit a {metadata.arch} with {len(metadata.classes)} classes ({exc})"
        ) from exc
    model.eval()
    return model, metadata


def serving_transform(metadata: ModelMetadata) -> Callable[[Image.Image], torch.Tensor]:
    """The tile-to-tensor transform a model was evaluated with: resize, the stain target it carries, normalise.

    Every engine (torch, ONNX FP32 and INT8) preprocesses through this one transform.
    """
    stain = None if metadata.stain is None else StainNormalizer.from_dict(metadata.stain)
    return build_eval_transform(metadata.preprocess, stain=stain)


def referral_rule(metadata: ModelMetadata) -> ReferralPolicy | None:
    """The calibrated referral rule (temperature and thresholds) a model carries, or None."""
    if metadata.referral is None:
        return None
    return ReferralPolicy.from_dict(metadata.referral, source="the model's referral rule")


class Predictor:
    """Classifies tiles with a model and its metadata: the training pipeline's preprocessing and test-time views.

    ``model`` is the network (wrapped here in its views, :attr:`ModelMetadata.views`) or the network already
    wrapped; :attr:`model` is always the wrapped one, the exact module the out-of-fold predictions came from.
    """

    def __init__(self, model: nn.Module, metadata: ModelMetadata, name: str = "", version: str = "") -> None:
        self.model = with_views(model, metadata.views).eval()
        self.metadata = metadata
        self.name = name
        self.version = version
        self.stain = None if metadata.stain is None else StainNormalizer.from_dict(metadata.stain)
        self.transform = serving_transform(metadata)
        self.referral = referral_rule(metadata)

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, name: str = "", version: str = "") -> Predictor:
        """Load a predictor from a bundle folder."""
        model, metadata = load_bundle(bundle_dir)
        return cls(model, metadata, name, version)

    @torch.no_grad()
    def predict_images(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Classify RGB images.

        Each answer has ``label``, ``probabilities`` (class to probability, temperature-calibrated when the model
        carries a referral rule), ``confidence`` (the top probability) and ``referral``: ``{"refer": bool,
        "reason": str}``: whether a pathologist should review the tile, and why (empty when not referred).
        """
        if not images:
            return []
        batch = torch.stack([self.transform(image) for image in images])
        return answers_from_logits(self.model(batch).double().numpy(), self.metadata.classes, self.referral)

    def predict_image(self, image: Image.Image) -> dict[str, Any]:
        """Classify one RGB image: ``label``, ``probabilities`` and ``model`` (registered name and version)."""
        answer = self.predict_images([image])[0]
        answer["model"] = {"name": self.name, "version": self.version}
        return answer

    def predict_bytes(self, data: bytes, source: str = "upload") -> dict[str, Any]:
        """Decode an uploaded JPEG, PNG or TIFF and classify it (see :meth:`predict_image`).

        Raises:
            InvalidImageError: The bytes are not a decodable image.
        """
        return self.predict_image(decode_image(data, source=source))
