"""INT8 copies: any fold model exported to ONNX, statically quantised on training tiles, run by ONNX Runtime.

``<arch>_int8`` is built from the fold model of ``arch`` (with its test-time views inside the graph) and scored on
the same validation tiles through the shared preprocessing, which measures what quantisation costs in accuracy.
The registered model is exported the same way (:func:`int8_classifier`) for small machines.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from torch import nn

from bonetumor.config import Config, PreprocessConfig
from bonetumor.errors import ConfigError, DatasetError
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.faults import fault_point
from bonetumor.training.candidates.base import Candidate, FitContext, FittedModel, TrainingSet
from bonetumor.training.candidates.network import TorchFitted
from bonetumor.training.export import (
    OnnxClassifier,
    QuantizedModel,
    _on_cpu,
    cpu_latency_ms,
    export_onnx,
    quantize_int8,
)
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.transforms.stain import StainNormalizer
from bonetumor.transforms.tta import with_views
from bonetumor.utils import write_json

log = logging.getLogger(__name__)


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
    fault_point("onnx-export")
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


class OnnxFitted:
    """An ONNX classifier (views inside the graph) with the shared preprocessing.

    Args:
        classifier: The loaded classifier.
        quantized: How it was quantised.
    """

    def __init__(self, classifier: OnnxClassifier, quantized: QuantizedModel) -> None:
        self.classifier = classifier
        self.quantized = quantized
        self._latency: dict[tuple[int, int], float] = {}

    def logits(self, files: Sequence[Path]) -> np.ndarray:
        """Return the logits of tile files (float32, class order)."""
        return onnx_logits(self.classifier, files)

    def latency_ms(self, tile_size: int, batch: int) -> float:
        """Return the CPU milliseconds per tile under ONNX Runtime."""
        # Timed once per shape: an ensemble adds up its members' own figures instead of timing them again.
        key = (tile_size, batch)
        if key not in self._latency:
            self._latency[key] = cpu_latency_ms(self.classifier, tile_size, batch)
        return self._latency[key]

    def metrics(self) -> dict[str, float]:
        """Return how many tiles calibrated it."""
        return {"int8_calibration_images": float(self.quantized.calibration_images)}

    def tags(self) -> dict[str, str]:
        """How it was quantised (static, or dynamic after a fallback)."""
        return {"bonetumor.int8.method": self.quantized.method}

    def export(
        self,
        out_dir: Path,
        provenance: Mapping[str, Any] | None = None,
        referral: ReferralPolicy | None = None,
    ) -> Path:
        """Copy the INT8 file to ``out_dir/model.int8.onnx`` with ``quantization.json`` beside it.

        The file takes preprocessed ``tile_size`` tiles (views inside the graph); :class:`OnnxClassifier` loads it.
        """
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.quantized.path, out_dir / "model.int8.onnx")
        write_json(
            out_dir / "quantization.json",
            {
                "method": self.quantized.method,
                "calibration_images": self.quantized.calibration_images,
                "fallback_reason": self.quantized.fallback_reason,
                "classes": list(self.classifier.classes),
                "provenance": dict(provenance or {}),
                "referral": None if referral is None else referral.to_dict(),
            },
        )
        return out_dir


class Int8Candidate(Candidate):
    """``<arch>_int8``: the fold's ``arch`` model with its views, as a statically quantised ONNX file."""

    kind: ClassVar[str] = "int8"

    def __init__(self, arch: str) -> None:
        super().__init__(f"{arch}_int8", arch=arch, bases=(arch,))

    @classmethod
    def from_config(cls, config: Config) -> list[Candidate]:
        """One per architecture with ``candidates.int8``."""
        return [cls(arch) for arch in config.train.architectures] if config.candidates.int8 else []

    def fit(self, data: TrainingSet, context: FitContext, bases: Mapping[str, FittedModel]) -> OnnxFitted:
        """Export and quantise the base's fitted model, calibrated on real training tiles of this set."""
        base = bases[self.bases[0]]
        if not isinstance(base, TorchFitted):
            raise ConfigError(f"{self.name}: its base {self.bases[0]!r} is not a torch model")
        config = self.settings(context.config)
        calibration = select_calibration_files(
            data.train_table, config.candidates.calibration_tiles, seed=config.train.seed
        )
        classifier, quantized = int8_classifier(
            with_views(base.model, base.views),
            config.preprocess,
            data.stain,
            calibration,
            context.scratch,
            f"{self.arch}-{data.name}",
            classes=config.data.classes,
            max_tiles=config.candidates.calibration_tiles,
        )
        return OnnxFitted(classifier, quantized)
