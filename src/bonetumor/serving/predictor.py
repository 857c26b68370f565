"""The model bundle (weights plus metadata, as in MONAI bundles) and the predictor that serves it.

A bundle folder holds ``weights.pt`` (the network's state dict, loaded with ``weights_only=True``, no pickled
code) and ``metadata.json``: architecture, class order, tile and crop sizes, the test-time views, mean/std,
dropout, the stain normaliser fitted on the training tiles, the calibrated referral rule, library versions and
provenance (including where the starting weights came from, ``init``). Everything a server needs to rebuild the
model, preprocess an image exactly as in training, average the same test-time views and decide whether to refer
it is in there.

``metadata.json`` also records the SHA-256 of every other file of the bundle (``sha256``: ``weights.pt``,
``onnx/*.onnx``), written by :func:`save_bundle` and :func:`write_metadata`. A file is checked against it before
it is loaded (:func:`verify_bundle_file`), so a file damaged in an artifact store or changed after registration
is refused rather than served: a flipped byte in ``weights.pt`` still loads in torch, with other weights.
"""

from __future__ import annotations

import json
import logging
import pickle
import platform
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
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
from bonetumor.utils import sha256_file, write_json

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 5
#: Earlier formats that still load (version 1 had no stain normaliser and no referral rule; versions 1 and 2 had
#: one ``image_size`` and no test-time views: they load as tile and crop of that size, one view; versions 1 to 3
#: had no input checks and no runtime decision: they are served without a size floor or tissue check by torch,
#: or by ONNX when the bundle holds the files; versions 1 to 4 need not record their files' SHA-256: their files
#: load unchecked, with a warning, unless a later :func:`write_metadata` recorded them).
READABLE_FORMATS = (1, 2, 3, 4, 5)
#: The first format whose metadata must record the SHA-256 of the bundle's files.
HASHED_FORMAT = 5
WEIGHTS_FILE = "weights.pt"
METADATA_FILE = "metadata.json"
#: Key of ``metadata.json`` mapping each other file of the bundle (path relative to it) to its SHA-256.
HASHES_KEY = "sha256"
#: What to do about a damaged bundle: registration writes a fresh one from the training outputs.
REREGISTER = "re-register the model (`dvc repro -f register`) to write a fresh bundle"
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    """Write ``weights.pt`` (the network's, without its views) and ``metadata.json`` into ``out_dir``.

    ``metadata.json`` records the SHA-256 of ``weights.pt`` and of every other file already in ``out_dir`` (the
    ONNX files when they were exported first).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    network = model.model if isinstance(model, TestTimeAugmented) else model
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, out_dir / WEIGHTS_FILE)
    write_metadata(out_dir, metadata)
    return out_dir


def write_metadata(bundle_dir: str | Path, metadata: ModelMetadata) -> Path:
    """Rewrite a bundle's ``metadata.json`` with the SHA-256 of its files as they are now.

    Register calls it after adding the ONNX files, the input checks and the runtime decision, so the hashes cover
    every file the service may load.
    """
    bundle_dir = Path(bundle_dir)
    return write_json(bundle_dir / METADATA_FILE, {**asdict(metadata), HASHES_KEY: bundle_file_hashes(bundle_dir)})


def bundle_file_hashes(bundle_dir: str | Path) -> dict[str, str]:
    """Return the SHA-256 of every file of a bundle but ``metadata.json``, by path relative to the bundle."""
    root = Path(bundle_dir)
    hashes = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and relative != METADATA_FILE:
            hashes[relative] = sha256_file(path)
    return hashes


def recorded_file_hashes(bundle_dir: str | Path) -> dict[str, str] | None:
    """Return the SHA-256 a bundle's ``metadata.json`` records for its files; None for an older bundle without.

    Raises:
        ArtifactError: ``metadata.json`` is missing or not JSON, or the record is malformed or missing in a
            bundle of format 5 or later.
    """
    path = Path(bundle_dir) / METADATA_FILE
    raw = _read_metadata(path)
    return _recorded_hashes(raw, path)


def verify_bundle_file(bundle_dir: str | Path, relative: str, recorded: Mapping[str, str] | None) -> None:
    """Check one file of a bundle against the SHA-256 its metadata records, before anything loads it.

    Args:
        bundle_dir: The bundle folder.
        relative: The file's path inside it (``weights.pt``, ``onnx/model.fp32.onnx``).
        recorded: :func:`recorded_file_hashes` of the bundle; None (a bundle from before format 5) loads the file
            unchecked, with a warning.

    Raises:
        ArtifactError: The file's SHA-256 differs from the recorded one, or the record does not list the file.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / relative
    if recorded is None:
        log.warning(
            "%s records no SHA-256 of the bundle's files (written before bundle format %d): %s is loaded "
            "unchecked; %s that records them",
            bundle_dir / METADATA_FILE,
            HASHED_FORMAT,
            relative,
            REREGISTER,
        )
        return
    expected = recorded.get(relative)
    if expected is None:
        raise ArtifactError(
            f"{path}: {METADATA_FILE} records no SHA-256 for {relative} (it records {sorted(recorded)}), so the "
            f"file was added after the bundle was written; {REREGISTER}"
        )
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{path}: SHA-256 {actual} does not match {expected}, recorded in {METADATA_FILE} when the bundle was "
            f"written: the file is corrupt or was changed since; {REREGISTER}"
        )


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


def _read_metadata(path: Path) -> dict[str, Any]:
    """Read a bundle's ``metadata.json`` as a dict of a readable format version."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(
            f"model metadata not found at {path}; expected {METADATA_FILE} beside {WEIGHTS_FILE} in a model bundle"
        ) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"model metadata at {path} is not valid JSON ({exc}): the file is truncated or corrupt; {REREGISTER}"
        ) from exc
    except OSError as exc:  # a folder in its place, no permission
        raise ArtifactError(f"model metadata at {path} cannot be read ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format_version") not in READABLE_FORMATS:
        found = raw.get("format_version") if isinstance(raw, dict) else f"a JSON {type(raw).__name__}"
        raise ArtifactError(
            f"{path}: not a model bundle of format version {list(READABLE_FORMATS)} (found {found!r}); {REREGISTER}"
        )
    return raw


def _recorded_hashes(raw: dict[str, Any], path: Path) -> dict[str, str] | None:
    """The ``sha256`` record of a metadata dict, checked; None for a bundle from before format 5 without one."""
    recorded = raw.get(HASHES_KEY)
    if recorded is None:
        if raw["format_version"] >= HASHED_FORMAT:
            raise ArtifactError(
                f"{path}: a format {raw['format_version']} bundle must record the SHA-256 of its files in field "
                f"{HASHES_KEY!r}, and it records none; {REREGISTER}"
            )
        return None
    if not isinstance(recorded, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) and _SHA256.fullmatch(digest)
        for name, digest in recorded.items()
    ):
        raise ArtifactError(
            f"{path}: field {HASHES_KEY!r} must map each file of the bundle to its SHA-256 (64 lower-case hex "
            f"digits), got {str(recorded)[:200]}; {REREGISTER}"
        )
    return recorded


#: The type each field of ModelMetadata must have in metadata.json (JSON arrays for the tuples).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "arch": str,
    "classes": list,
    "tile_size": int,
    "input_size": int,
    "mean": list,
    "std": list,
    "dropout": (int, float),
    "test_crops": int,
    "test_flips": bool,
    "provenance": dict,
    "versions": dict,
    "stain": (dict, type(None)),
    "referral": (dict, type(None)),
    "input_checks": (dict, type(None)),
    "runtime": (dict, type(None)),
    "format_version": int,
}


def _metadata_from(raw: dict[str, Any], path: Path) -> ModelMetadata:
    """Build the metadata from ``metadata.json``'s fields (no ``sha256``), saying which fields are wrong."""
    known = [f.name for f in fields(ModelMetadata)]
    required = [f.name for f in fields(ModelMetadata) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in raw]
    unknown = sorted(set(raw) - set(known))
    if missing or unknown:
        raise ArtifactError(
            f"{path}: malformed metadata: missing field(s) {missing}, unknown field(s) {unknown}; expected the "
            f"fields {required} and optionally {[n for n in known if n not in required]}; {REREGISTER}"
        )
    wrong = [
        f"{name} is {type(value).__name__}, expected {' or '.join(t.__name__ for t in _as_tuple(name))}"
        for name, value in raw.items()
        # bool is an int in Python, but true is no tile size
        if not isinstance(value, _as_tuple(name)) or (isinstance(value, bool) and bool not in _as_tuple(name))
    ]
    if wrong:
        raise ArtifactError(f"{path}: malformed metadata: {'; '.join(wrong)}; {REREGISTER}")
    classes, mean, std = tuple(raw["classes"]), tuple(raw["mean"]), tuple(raw["std"])
    if not classes or not all(isinstance(c, str) for c in classes) or len(mean) != 3 or len(std) != 3:
        raise ArtifactError(
            f"{path}: malformed metadata: classes {list(classes)}, mean {list(mean)}, std {list(std)}; expected "
            f"a non-empty list of class names and three numbers each for mean and std; {REREGISTER}"
        )
    return ModelMetadata(**{**raw, "classes": classes, "mean": mean, "std": std})


def _as_tuple(name: str) -> tuple[type, ...]:
    """The types field ``name`` may have in ``metadata.json``."""
    types = _FIELD_TYPES.get(name, object)
    return types if isinstance(types, tuple) else (types,)


def _read_state_dict(weights: Path) -> Mapping[str, torch.Tensor]:
    """Load ``weights.pt`` as a state dict, turning torch's errors for a damaged file into one that names it."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        # What torch raises for a truncated archive (RuntimeError), an empty file (EOFError) and bytes that are no
        # torch file at all (KeyError, UnpicklingError); its own messages do not say which file, and run on for
        # paragraphs after their first sentence.
        cause = (str(exc).splitlines() or [""])[0].split(". ")[0][:200]
        raise ArtifactError(
            f"{weights}: not a readable PyTorch state dict ({type(exc).__name__}: {cause}): the file is "
            f"truncated or corrupt; {REREGISTER}"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(
            f"{weights}: holds a {type(state).__name__}, not a state dict (parameter name to tensor); {REREGISTER}"
        )
    return state


def load_bundle(bundle_dir: str | Path) -> tuple[nn.Module, ModelMetadata]:
    """Rebuild the network (without its views: see :attr:`ModelMetadata.views`) from a bundle, in eval mode.

    ``weights.pt`` is checked against the SHA-256 the metadata records before torch reads it (bundles from before
    format 5 without a record load with a warning).

    Raises:
        ArtifactError: A file is missing, truncated or corrupt, ``metadata.json`` is not JSON, of an unknown
            format version or lacks a field, ``weights.pt`` does not match its recorded SHA-256, or the weights do
            not fit the metadata.
    """
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / METADATA_FILE
    raw = _read_metadata(path)
    recorded = _recorded_hashes(raw, path)
    metadata = _metadata_from(_upgrade({k: v for k, v in raw.items() if k != HASHES_KEY}), path)
    weights = bundle_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"model weights not found at {weights}; {REREGISTER}")
    verify_bundle_file(bundle_dir, WEIGHTS_FILE, recorded)
    state = _read_state_dict(weights)
    model = build_model(metadata.arch, len(metadata.classes), metadata.dropout)
    try:
        model.load_state_dict(state)
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
