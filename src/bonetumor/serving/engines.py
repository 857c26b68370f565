"""The fast path: which runtime answers ``/predict`` (ONNX Runtime INT8 or FP32, or eager torch), and its predictor.

``register`` exports the registered model to ONNX beside its weights (``bundle/onnx/model.fp32.onnx`` and
``model.int8.onnx``, with the test-time views inside the graph) and decides here which file the service answers
from: INT8 only when cross-validation measured its out-of-fold macro-F1 within ``serving.max_int8_drop`` of the
FP32 model's on the same folds; FP32 otherwise. The decision and its reason go into the bundle's metadata
(``runtime``), so ``/model_info`` and the audit trail show which arithmetic produced an answer.

Every engine answers through :func:`bonetumor.serving.predictor.answers_from_logits` with the same transform
(:func:`bonetumor.transforms.preprocess.build_eval_transform`, stain normaliser included), so only the
arithmetic of the network differs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf
from PIL import Image

from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.serving.predictor import (
    REREGISTER,
    ModelMetadata,
    Predictor,
    answers_from_logits,
    recorded_file_hashes,
    referral_rule,
    serving_transform,
    verify_bundle_file,
)
from bonetumor.training.export import OnnxClassifier

log = logging.getLogger(__name__)

#: Folder of the ONNX files inside a bundle, and their names.
ONNX_DIR = "onnx"
ONNX_FILES = {"onnx-fp32": "model.fp32.onnx", "onnx-int8": "model.int8.onnx"}
ENGINES = ("onnx-int8", "onnx-fp32", "torch")


class Engine(Protocol):
    """What the service needs of a runtime: answers for decoded RGB tiles."""

    def predict_images(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Classify RGB images (see :meth:`bonetumor.serving.predictor.Predictor.predict_images`)."""
        ...


def decide_runtime(
    arch: str, scores: Mapping[str, Mapping[str, Any]], max_int8_drop: float, exported: bool
) -> dict[str, Any]:
    """Decide which runtime serves a registered model, from the out-of-fold scores of evaluate.

    Args:
        arch: The registered architecture (its INT8 copy is scored as ``<arch>_int8`` when ``candidates.int8``).
        scores: ``comparison.json``'s ``scores``: model name to metrics (``f1_macro`` is the pooled out-of-fold
            macro-F1).
        max_int8_drop: ``serving.max_int8_drop``.
        exported: Whether the ONNX files were written (``register.export_onnx``).

    Returns:
        ``engine``, ``reason``, ``files`` (engine to path inside the bundle), ``fp32_oof_f1_macro``,
        ``int8_oof_f1_macro`` (None when not measured) and ``max_int8_drop``.
    """
    fp32 = scores.get(arch, {}).get("f1_macro")
    int8 = scores.get(f"{arch}_int8", {}).get("f1_macro")
    decision: dict[str, Any] = {
        "fp32_oof_f1_macro": None if fp32 is None else float(fp32),
        "int8_oof_f1_macro": None if int8 is None else float(int8),
        "max_int8_drop": max_int8_drop,
        "files": {engine: f"{ONNX_DIR}/{name}" for engine, name in ONNX_FILES.items()} if exported else {},
    }
    if not exported:
        return decision | {"engine": "torch", "reason": "register.export_onnx is false: no ONNX files to serve"}
    if fp32 is None or int8 is None:
        return decision | {
            "engine": "onnx-fp32",
            "reason": f"INT8 was not scored out of fold ({arch}_int8 needs candidates.int8: true), so FP32 serves",
        }
    drop = float(fp32) - float(int8)
    if drop <= max_int8_drop:
        comparison = "at least as good as" if drop <= 0 else f"within {max_int8_drop} of"
        reason = (
            f"INT8 out-of-fold macro-F1 {float(int8):.4f} is {comparison} FP32's {float(fp32):.4f} "
            f"(FP32 - INT8 = {drop:+.4f}; serving.max_int8_drop {max_int8_drop})"
        )
        return decision | {"engine": "onnx-int8", "reason": reason}
    reason = (
        f"INT8 out-of-fold macro-F1 {float(int8):.4f} loses {drop:.4f} against FP32's {float(fp32):.4f}, more than "
        f"serving.max_int8_drop {max_int8_drop}"
    )
    return decision | {"engine": "onnx-fp32", "reason": reason}


class OnnxPredictor:
    """Answers from an ONNX file of the bundle through the shared preprocessing and the model's referral rule.

    Args:
        bundle_dir: The bundle folder (``onnx/`` inside it).
        metadata: Its metadata (classes, preprocessing, stain target, referral rule).
        engine: ``onnx-int8`` or ``onnx-fp32``.
        threads: ONNX Runtime intra-op threads (None or 0: one per core).
        spin: Let idle ONNX Runtime threads busy-wait (off in the service: README "Serving").

    Raises:
        ArtifactError: The file is missing, does not match the SHA-256 the bundle's metadata records, or does not
            load.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        metadata: ModelMetadata,
        engine: str,
        threads: int | None = None,
        spin: bool = False,
    ) -> None:
        if engine not in ONNX_FILES:
            raise ConfigError(f"ONNX engine {engine!r}; expected one of {sorted(ONNX_FILES)}")
        relative = f"{ONNX_DIR}/{ONNX_FILES[engine]}"
        path = Path(bundle_dir) / relative
        if not path.is_file():
            raise ArtifactError(f"{path}: the bundle holds no {engine} file; expected it from register.export_onnx")
        # Checked against the bundle's own record on disk, whatever metadata the caller passed in.
        verify_bundle_file(bundle_dir, relative, recorded_file_hashes(bundle_dir))
        self.metadata = metadata
        self.engine = engine
        self.path = path
        self.referral = referral_rule(metadata)
        try:
            self.classifier = OnnxClassifier(
                path, metadata.classes, serving_transform(metadata), threads=threads or None, spin=spin
            )
        except (InvalidProtobuf, UnicodeDecodeError) as exc:
            # What ONNX Runtime raises for a truncated or damaged file of a bundle that records no hashes.
            raise ArtifactError(
                f"{path}: ONNX Runtime cannot parse the file ({exc}): it is truncated or corrupt; {REREGISTER}"
            ) from exc

    def predict_images(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Classify RGB images: the same answers as the torch predictor, from ONNX Runtime's logits."""
        if not images:
            return []
        logits = self.classifier.logits(self.classifier.preprocess(images))
        return answers_from_logits(logits, self.metadata.classes, self.referral)


def choose_engine(
    requested: str,
    metadata: ModelMetadata,
    bundle_dir: str | Path,
    predictor: Predictor,
    threads: int = 0,
    spin: bool = False,
) -> tuple[Engine, str, str]:
    """Build the engine ``serving.runtime`` asks for.

    Args:
        requested: ``auto`` (the bundle's decision), ``onnx-int8``, ``onnx-fp32`` or ``torch``.
        metadata: The bundle's metadata.
        bundle_dir: The bundle folder.
        predictor: The eager torch predictor (kept for Grad-CAM; it answers when ``torch`` is chosen).
        threads: ONNX Runtime intra-op threads (0: one per core).
        spin: Let idle ONNX Runtime threads busy-wait (``serving.ort_spinning``).

    Returns:
        The engine, its name and why it was chosen.

    Raises:
        ArtifactError: The requested ONNX file is not in the bundle.
    """
    decision = metadata.runtime or {}
    if requested == "auto":
        engine = str(decision.get("engine") or "")
        reason = str(decision.get("reason") or "")
        if not engine:
            # A bundle from before format 4: serve its ONNX FP32 file when it has one, else torch.
            has_fp32 = (Path(bundle_dir) / ONNX_DIR / ONNX_FILES["onnx-fp32"]).is_file()
            engine = "onnx-fp32" if has_fp32 else "torch"
            reason = "the bundle records no runtime decision (registered before bonetumor 0.4)"
    else:
        engine, reason = requested, f"serving.runtime is {requested}"
    if engine not in ENGINES:
        raise ArtifactError(f"the bundle's runtime engine {engine!r} is unknown; expected one of {list(ENGINES)}")
    if engine == "torch":
        return predictor, engine, reason
    return OnnxPredictor(bundle_dir, metadata, engine, threads, spin), engine, reason
