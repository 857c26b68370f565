"""Export of a classifier to ONNX and INT8 for small machines, and how to serve and compare the exported files.

:func:`export_onnx` writes an FP32 ONNX graph with a dynamic batch axis and checks it twice (``onnx.checker`` and
ONNX Runtime against torch on a random batch of another size). :func:`quantize_int8` makes an INT8 copy with ONNX
Runtime's static QDQ quantization, calibrated on preprocessed tiles: convolutions need static quantization (the
activation ranges are fixed from the calibration data; dynamic quantization only helps linear/recurrent layers
and computes ranges per batch at run time). :class:`OnnxClassifier` runs either file with the project's shared
preprocessing, and :func:`measure_latency` and :func:`agreement` compare any two models.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidGraph,
    RuntimeException,
)
from onnxruntime.capi.onnxruntime_pybind11_state import (
    NotImplemented as OrtNotImplemented,
)
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image
from torch import nn

from bonetumor.errors import ArtifactError, ConfigError

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Errors ONNX Runtime's quantization tool chain raises on a graph it cannot handle (its own exceptions derive
#: from Exception directly, so they are listed by name).
_QUANTIZATION_ERRORS: tuple[type[BaseException], ...] = (
    Fail,
    InvalidArgument,
    InvalidGraph,
    OrtNotImplemented,
    RuntimeException,
    onnx.checker.ValidationError,
    RuntimeError,
    ValueError,
    KeyError,
    TypeError,
)
#: Static quantization falls back to dynamic on these (ArtifactError: the INT8 file does not run).
_STATIC_FALLBACK_ERRORS: tuple[type[BaseException], ...] = (*_QUANTIZATION_ERRORS, ArtifactError)


def _session(path: str | Path, threads: int | None = None, spin: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:
        # Idle intra-op threads otherwise busy-wait for the next call, taking the cores from torch (Grad-CAM) and
        # from the other requests of a server.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidArgument, InvalidGraph, OrtNotImplemented, RuntimeException) as exc:
        raise ArtifactError(f"{path}: ONNX Runtime cannot load the model ({exc})") from exc


def export_onnx(model: nn.Module, image_size: int, out_path: str | Path, opset: int = 17, atol: float = 1e-3) -> Path:
    """Export a classifier to ONNX (FP32, dynamic batch axis) and verify the file before it is put in place.

    The model is exported in eval mode (its mode is restored afterwards). The graph must pass
    ``onnx.checker`` and ONNX Runtime's logits on a random batch of 3 (another size than the export example, so
    the dynamic axis is exercised) must match torch's within ``atol``; the difference is logged. The file is
    written under a temporary name and renamed only when both checks pass.

    Args:
        model: The classifier (input ``(N, 3, image_size, image_size)``, output logits).
        image_size: Side of the square input in pixels.
        out_path: Where to write the ``.onnx`` file (parent folders are created).
        opset: ONNX opset version.
        atol: Largest accepted absolute difference between ONNX Runtime's and torch's logits.

    Returns:
        ``out_path``.

    Raises:
        ArtifactError: The exported graph is invalid, does not load, or disagrees with torch beyond ``atol``.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    was_training = model.training
    model.eval()
    try:
        example = torch.randn(2, 3, image_size, image_size)
        # The TorchScript exporter: the torch.export-based default needs onnxscript, which this project does not
        # depend on. It is deprecated in torch 2.9+ but still shipped and exact for these CNNs.
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise ArtifactError(f"{out_path}: the exported ONNX graph is invalid ({exc})") from exc
        diff = max_abs_diff_vs_torch(model, tmp, image_size)
        log.info("ONNX export %s: max |logit difference| vs torch = %.3g", out_path, diff)
        if not diff <= atol:
            raise ArtifactError(
                f"{out_path}: ONNX Runtime's logits differ from torch's by up to {diff:.3g} on a random batch; "
                f"expected at most {atol}"
            )
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        model.train(was_training)
    return out_path


def max_abs_diff_vs_torch(
    model: nn.Module, onnx_path: str | Path, image_size: int, batch_size: int = 3, seed: int = 0
) -> float:
    """Return the largest absolute difference between torch's and ONNX Runtime's logits on a random batch.

    Args:
        model: The torch model the file was exported from (run in eval mode; its mode is restored).
        onnx_path: The exported file.
        image_size: Side of the square input in pixels.
        batch_size: Size of the random batch.
        seed: Seed of the random batch.
    """
    generator = torch.Generator().manual_seed(seed)
    batch = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(batch).numpy()
    finally:
        model.train(was_training)
    actual = _session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    return float(np.abs(np.asarray(actual) - expected).max())


@dataclass(frozen=True)
class QuantizedModel:
    """The INT8 file :func:`quantize_int8` wrote and how it was made.

    Attributes:
        path: The INT8 ONNX file.
        method: ``static_qdq`` (calibrated activations and weights) or ``dynamic`` (weights only; activations
            quantised per batch at run time).
        calibration_images: Number of tiles the static calibration used (0 for dynamic).
        fallback_reason: Why static quantization was not used, or None.
    """

    path: Path
    method: Literal["static_qdq", "dynamic"]
    calibration_images: int
    fallback_reason: str | None = None


class _TileReader(CalibrationDataReader):
    """Feeds preprocessed tiles to ONNX Runtime's calibrator in batches."""

    def __init__(self, images: Sequence[np.ndarray], batch_size: int) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [np.stack(images[i : i + batch_size]).astype(np.float32) for i in range(0, len(images), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def _input_shape(onnx_path: Path) -> tuple[int, int, int]:
    dims = _session(onnx_path).get_inputs()[0].shape
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        raise ArtifactError(f"{onnx_path}: expected an input of shape (batch, 3, H, W), got {dims}")
    return int(dims[1]), int(dims[2]), int(dims[3])


def _check_calibration(images: Sequence[np.ndarray], shape: tuple[int, int, int], onnx_path: Path) -> None:
    for i, image in enumerate(images):
        if tuple(np.shape(image)) != shape:
            raise ArtifactError(
                f"calibration image {i} has shape {tuple(np.shape(image))}; expected a preprocessed tile of shape "
                f"{shape} (the input of {onnx_path}, as build_eval_transform returns it)"
            )


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration_images: Sequence[np.ndarray] | None,
    batch_size: int = 8,
    per_channel: bool = True,
) -> QuantizedModel:
    """Quantise an FP32 ONNX classifier to INT8, statically (QDQ) when calibration tiles are given.

    Static QDQ quantization (INT8 weights per output channel, UINT8 activations with ranges fixed by MinMax
    calibration) is what makes convolutions fast. Dynamic quantization is the fallback only when no
    calibration tiles are given, or ONNX Runtime's static tool chain fails or yields a file it cannot run; the
    result says which method was used and why.

    Args:
        onnx_path: The FP32 model from :func:`export_onnx`.
        out_path: Where to write the INT8 model.
        calibration_images: Preprocessed tiles, each a float32 ``(3, H, W)`` array (``transform(image).numpy()``
            with the shared transform); a few dozen representative tiles of every class are enough.
        batch_size: Calibration batch size.
        per_channel: Quantise weights per output channel (more accurate for convolutions).

    Returns:
        The written file and the method used.

    Raises:
        ArtifactError: ``onnx_path`` does not load, a calibration tile has the wrong shape, or no INT8 model
            could be made.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise ArtifactError(f"ONNX model not found at {onnx_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    reason: str | None
    if calibration_images:
        _check_calibration(calibration_images, _input_shape(onnx_path), onnx_path)
        try:
            _quantize_static(onnx_path, out_path, calibration_images, batch_size, per_channel)
            _smoke_run(out_path, calibration_images[0])
            return QuantizedModel(out_path, "static_qdq", len(calibration_images))
        except _STATIC_FALLBACK_ERRORS as exc:
            reason = f"static quantization failed: {type(exc).__name__}: {exc}"
            log.warning("%s: %s; falling back to dynamic quantization", onnx_path, reason)
    else:
        reason = "no calibration images were given"
    try:
        quantize_dynamic(onnx_path, out_path, weight_type=QuantType.QUInt8, per_channel=per_channel)
    except _QUANTIZATION_ERRORS as exc:
        raise ArtifactError(
            f"{onnx_path}: INT8 quantization failed ({reason}; dynamic: {type(exc).__name__}: {exc})"
        ) from exc
    _smoke_run(out_path, None)
    return QuantizedModel(out_path, "dynamic", 0, reason)


def _quantize_static(
    onnx_path: Path, out_path: Path, images: Sequence[np.ndarray], batch_size: int, per_channel: bool
) -> None:
    with tempfile.TemporaryDirectory(prefix="bonetumor-quant-") as tmp:
        # ONNX Runtime's recommended pre-processing: shape inference and graph optimisation, so that the
        # quantizer sees fused Conv+Relu patterns and every tensor's shape.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(onnx_path, prepared)
        quantize_static(
            prepared,
            out_path,
            _TileReader(images, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )


def _smoke_run(path: Path, image: np.ndarray | None) -> None:
    session = _session(path)
    if image is None:
        channels, height, width = _input_shape(path)
        image = np.zeros((channels, height, width), dtype=np.float32)
    try:
        session.run([OUTPUT_NAME], {INPUT_NAME: image[None].astype(np.float32)})
    except (Fail, InvalidArgument, OrtNotImplemented, RuntimeException) as exc:
        raise ArtifactError(f"{path}: ONNX Runtime loads the INT8 model but cannot run it ({exc})") from exc


def softmax(logits: np.ndarray) -> np.ndarray:
    """Return the row-wise softmax of a ``(N, C)`` logit array (numerically stable)."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))


class OnnxClassifier:
    """Classifies tiles with an ONNX file (FP32 or INT8) and the project's shared preprocessing.

    Args:
        path: The ``.onnx`` file.
        classes: Class names in output order.
        transform: The tile-to-tensor transform, built by the caller with
            :func:`bonetumor.transforms.preprocess.build_eval_transform` from the model's metadata.
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, one per core).
        spin: Whether idle intra-op threads busy-wait for the next call (lowest latency for one caller; a
            server sharing the cores with torch and other requests turns it off).

    Raises:
        ArtifactError: The file does not load, or its output size is not ``len(classes)``.
    """

    def __init__(
        self,
        path: str | Path,
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any],
        threads: int | None = None,
        spin: bool = True,
    ) -> None:
        self.path = Path(path)
        self.classes = tuple(classes)
        self.transform = transform
        self.session = _session(self.path, threads, spin)
        outputs = self.session.get_outputs()[0].shape
        if len(outputs) != 2 or outputs[1] != len(self.classes):
            raise ArtifactError(
                f"{self.path}: the model outputs shape {outputs}; expected (batch, {len(self.classes)}) "
                f"for classes {list(self.classes)}"
            )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Return the logits of a preprocessed float32 batch ``(N, 3, H, W)``."""
        return np.asarray(self.session.run([OUTPUT_NAME], {INPUT_NAME: np.asarray(batch, dtype=np.float32)})[0])

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return the float32 batch the model sees for RGB images (the shared transform, stacked)."""
        return np.stack([np.asarray(self.transform(image), dtype=np.float32) for image in images])

    def predict_proba(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Return class probabilities ``(N, len(classes))`` for RGB images, in the order of ``classes``."""
        if not images:
            return np.empty((0, len(self.classes)))
        return softmax(self.logits(self.preprocess(images)))


def measure_latency(
    fn: Callable[[Any], Any], batch: Sequence[Any] | np.ndarray | torch.Tensor, warmup: int = 2, repeats: int = 10
) -> dict[str, float]:
    """Time ``fn(batch)`` and return milliseconds per image.

    Args:
        fn: Any callable taking the batch (a torch model under ``no_grad``, ``OnnxClassifier.logits``...).
        batch: Anything with a length (images, a tensor or an array): the number of images per call.
        warmup: Untimed calls first (allocations, lazy initialisation, caches).
        repeats: Timed calls.

    Returns:
        ``ms_per_image_mean``, ``ms_per_image_p50``, ``ms_per_image_p95`` and ``batch_size``.

    Raises:
        ConfigError: The batch is empty, ``warmup`` is negative or ``repeats`` is below 1.
    """
    size = len(batch)
    if size < 1 or warmup < 0 or repeats < 1:
        raise ConfigError(
            f"measure_latency: batch of {size}, warmup={warmup}, repeats={repeats}; expected a non-empty batch, "
            f"warmup >= 0 and repeats >= 1"
        )
    for _ in range(warmup):
        fn(batch)
    per_image = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        per_image.append((time.perf_counter() - start) * 1000.0 / size)
    return {
        "ms_per_image_mean": statistics.fmean(per_image),
        "ms_per_image_p50": float(np.percentile(per_image, 50)),
        "ms_per_image_p95": float(np.percentile(per_image, 95)),
        "batch_size": float(size),
    }


def agreement(probs_a: np.ndarray, probs_b: np.ndarray) -> dict[str, float]:
    """Compare two models' probabilities on the same images.

    Args:
        probs_a: ``(N, C)`` probabilities (or logits, for top-1 only) of one model.
        probs_b: The same shape, of the other model, on the same images in the same order.

    Returns:
        ``top1_agreement`` (share of images with the same arg-max) and ``max_abs_prob_diff``.

    Raises:
        ArtifactError: The arrays are empty, not 2-D, or differ in shape.
    """
    a, b = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ArtifactError(
            f"agreement: probability arrays of shapes {a.shape} and {b.shape}; expected the same non-empty (N, C)"
        )
    return {
        "top1_agreement": float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))),
        "max_abs_prob_diff": float(np.abs(a - b).max()),
    }


def _on_cpu(model: nn.Module) -> nn.Module:
    """Return the model itself when it is on the CPU, else a CPU copy (the caller's model stays where it is)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        return model
    return copy.deepcopy(model).to("cpu")


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
