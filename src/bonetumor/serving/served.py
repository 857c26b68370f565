"""One served model version: input checks, the fast engine, Grad-CAM, and the audit fields of every answer.

The BentoML service (``serving/service.py``) is a thin HTTP adapter over :class:`ServedModel`; benchmarks and
tests call the same object in process, so "served" and "in process" run identical code.

An upload is decoded by the project's one decoder, refused when it is smaller than the model's training tiles
were required to be (``validate.min_size``, recorded in the bundle), measured for tissue with validation's own
function, and answered by the engine the bundle's runtime decision names (:mod:`bonetumor.serving.engines`). A
tile with less tissue than validation required is answered but always referred, with the reason.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bonetumor.config import ServingConfig, ValidateConfig
from bonetumor.errors import ConfigError, InvalidImageError
from bonetumor.monitoring.features import EmbeddingExtractor, predict_and_embed
from bonetumor.monitoring.reference import DriftReference, features_from_embeddings, served_features_many
from bonetumor.serving.audit import audit_fields
from bonetumor.serving.engines import Engine, choose_engine
from bonetumor.serving.predictor import Predictor
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.tissue import tissue_fraction

log = logging.getLogger(__name__)

#: The drift reference in a bundle (written by registration).
DRIFT_REFERENCE = "drift_reference.npz"
#: Side in pixels of the overlay and heatmap PNGs of ``/explain`` (the raw heatmap stays at the tile size).
EXPLAIN_PNG_SIDE = 256


class InputRejectedError(InvalidImageError):
    """An upload decodes but is not something the model may answer (too small)."""


@dataclass(frozen=True)
class InputChecks:
    """What an upload must satisfy: the thresholds validation applied to the training tiles.

    Attributes:
        min_size: Smallest accepted width and height in pixels.
        min_tissue_fraction: A tile with less tissue is answered but referred.
        source: Where the thresholds came from (the bundle, or the project's params for older bundles).
    """

    min_size: int
    min_tissue_fraction: float
    source: str

    @classmethod
    def resolve(cls, recorded: dict[str, Any] | None, validate: ValidateConfig, serving: ServingConfig) -> InputChecks:
        """The bundle's recorded checks (else the project's ``validate`` section), ``serving.min_size`` on top."""
        if recorded:
            checks = cls(int(recorded["min_size"]), float(recorded["min_tissue_fraction"]), "the model bundle")
        else:
            checks = cls(validate.min_size, validate.min_tissue_fraction, "params.yaml validate (older bundle)")
        if serving.min_size:
            return cls(serving.min_size, checks.min_tissue_fraction, checks.source + ", serving.min_size")
        return checks


@dataclass
class ServedModel:
    """A registered model version ready to answer: the fast engine, the eager model for Grad-CAM, its identity.

    Build it with :meth:`create`. Answers are dicts ready to be returned as JSON.
    """

    name: str
    version: str
    run_id: str
    trained_at: str
    predictor: Predictor
    engine: Engine
    engine_name: str
    engine_reason: str
    checks: InputChecks
    bundle_dir: Path
    registry: dict[str, str] = field(default_factory=dict)
    drift: DriftReference | None = None
    card: tuple[str, dict[str, Any]] | None = None
    _torch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _extractor: EmbeddingExtractor | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        bundle_dir: str | Path,
        predictor: Predictor,
        identity: dict[str, str],
        serving: ServingConfig,
        validate: ValidateConfig,
        card: tuple[str, dict[str, Any]] | None = None,
    ) -> ServedModel:
        """Build the served model of a bundle.

        Args:
            bundle_dir: The bundle folder (its ``onnx/`` files).
            predictor: The eager torch predictor of the same bundle.
            identity: ``name``, ``version``, ``run_id`` and ``trained_at`` of the registered version; optionally
                ``served_as`` (the alias asked for), ``aliases`` (comma-separated), ``gate_decision`` and
                ``gate_reason`` (the champion gate's record on the version).
            serving: The ``serving`` section (runtime, ORT threads, size floor).
            validate: The project's ``validate`` section, for bundles that do not record their input checks.
            card: The version's model card (Markdown and metadata), served at ``/model_card``; None without one.

        Raises:
            ArtifactError: The runtime's ONNX file is missing or does not load.
        """
        meta = predictor.metadata
        engine, engine_name, reason = choose_engine(
            serving.runtime, meta, bundle_dir, predictor, serving.ort_threads, serving.ort_spinning
        )
        log.info("%s version %s answers from %s: %s", identity["name"], identity["version"], engine_name, reason)
        return cls(
            name=identity["name"],
            version=identity["version"],
            run_id=identity.get("run_id", ""),
            trained_at=identity.get("trained_at", ""),
            predictor=predictor,
            engine=engine,
            engine_name=engine_name,
            engine_reason=reason,
            checks=InputChecks.resolve(meta.input_checks, validate, serving),
            bundle_dir=Path(bundle_dir),
            registry={
                k: identity[k] for k in ("served_as", "aliases", "gate_decision", "gate_reason") if k in identity
            },
            drift=_drift_reference(Path(bundle_dir)) if serving.drift_features else None,
            card=card,
        )

    @property
    def model_fields(self) -> dict[str, str]:
        """The ``model`` block of every answer: who answered."""
        return {"name": self.name, "version": self.version, "run_id": self.run_id, "runtime": self.engine_name}

    def _checked(self, data: bytes, source: str) -> tuple[Image.Image, float]:
        """Decode an upload, refuse one that is too small, and measure its tissue."""
        image = decode_image(data, source=source)
        width, height = image.size
        if min(width, height) < self.checks.min_size:
            raise InputRejectedError(
                f"{source}: the image is {width}x{height} px; expected a tile of at least "
                f"{self.checks.min_size}x{self.checks.min_size} px (validate.min_size of the training data)"
            )
        return image, tissue_fraction(image)

    def _finish(self, answer: dict[str, Any], tissue: float, audit: dict[str, str]) -> dict[str, Any]:
        """Add the tissue referral, the audit fields and the model block to an engine's answer."""
        if tissue < self.checks.min_tissue_fraction:
            # Answered (the probabilities may still help), but never accepted: validation flags such tiles as
            # near-blank, and the referral rule was not fitted for them.
            answer["referral"] = {
                "refer": True,
                "reason": f"not enough tissue: {tissue:.0%} of the tile is tissue, below the "
                f"{self.checks.min_tissue_fraction:.0%} that data validation requires of a tile "
                "(validate.min_tissue_fraction)",
            }
        return {**audit, **answer, "tissue_fraction": round(tissue, 4), "model": self.model_fields}

    def _predict(self, images: list[Image.Image], features: bool = True) -> list[dict[str, Any]]:
        """The engine's answers; with a drift reference, each carries ``drift_features`` for the prediction log."""
        if not images:
            return []
        if self.drift is None or not features:
            if self.engine is self.predictor:
                # Grad-CAM hooks the same module: a forward pass during an explanation would corrupt both.
                with self._torch_lock:
                    return self.engine.predict_images(images)
            return self.engine.predict_images(images)
        with self._torch_lock:
            if self._extractor is None:
                self._extractor = EmbeddingExtractor(self.predictor.model)
            if self.engine is self.predictor:
                # The embedding comes from the prediction's own forward pass: no extra cost.
                answers, embeddings = predict_and_embed(self.predictor, images, self._extractor)
                drift = features_from_embeddings(self.drift, images, embeddings)
            else:
                answers = self.engine.predict_images(images)
                drift = served_features_many(self.predictor, self.drift, images, self._extractor)
        return [{**answer, "drift_features": extra} for answer, extra in zip(answers, drift, strict=True)]

    @property
    def classes(self) -> tuple[str, ...]:
        """The model's classes, in output order."""
        return tuple(self.predictor.metadata.classes)

    def classify_tiles(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """Classify decoded tiles of a slide in one engine call: the answers of :meth:`answer` without audit fields.

        The whole-slide assessment reads its tiles itself (at the training scale), so there are no uploaded bytes
        to check or hash; each answer still gets the tissue referral and the ``model`` block.
        """
        answers = self._predict(images, features=False)
        return [self._finish(answer, tissue_fraction(image), {}) for image, answer in zip(images, answers, strict=True)]

    def answer(self, data: bytes, source: str = "upload") -> dict[str, Any]:
        """Classify one uploaded tile.

        Returns:
            ``request_id``, ``timestamp``, ``input_sha256``, ``label``, ``probabilities``, ``confidence``,
            ``referral`` (``refer``, ``reason``), ``tissue_fraction`` and ``model`` (name, version, run id,
            runtime).

        Raises:
            InvalidImageError: The bytes are not a decodable image, or it is too small (:class:`InputRejectedError`).
        """
        audit = audit_fields(data)
        image, tissue = self._checked(data, source)
        return self._finish(self._predict([image])[0], tissue, audit)

    def answer_many(self, uploads: Sequence[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """Classify several uploads in one engine call; a bad file gets an ``error`` entry, the rest answers.

        Args:
            uploads: ``(filename, bytes)`` pairs.

        Returns:
            One dict per upload, in order, each with ``filename``: an answer as :meth:`answer` gives, or
            ``request_id``, ``timestamp``, ``input_sha256`` and ``error`` (what was wrong and what was expected).
        """
        results: list[dict[str, Any]] = []
        good: list[tuple[int, Image.Image, float, dict[str, str]]] = []
        for name, data in uploads:
            audit = audit_fields(data)
            try:
                image, tissue = self._checked(data, name)
            except InvalidImageError as exc:
                results.append({**audit, "filename": name, "error": str(exc)})
                continue
            good.append((len(results), image, tissue, audit))
            results.append({})
        answers = self._predict([image for _, image, _, _ in good])
        for (index, _, tissue, audit), answer in zip(good, answers, strict=True):
            results[index] = {"filename": uploads[index][0], **self._finish(answer, tissue, audit)}
        return results

    def explain(self, data: bytes, source: str = "upload", target: str | None = None) -> dict[str, Any]:
        """Classify a tile and explain a class with Grad-CAM on the eager model, over the same test-time views.

        Args:
            data: The uploaded bytes.
            source: Name for error messages.
            target: Class to explain; None explains the served label.

        Returns:
            The answer of :meth:`answer` plus ``target``, ``heatmap`` (rows of floats in [0, 1] at the tile size),
            ``heatmap_size``, ``heatmap_png`` (base64 PNG, jet colours) and ``overlay_png`` (base64 PNG, the heatmap
            blended on the tile's centred square, as the model saw it).

        Raises:
            InvalidImageError: The upload is not a usable image.
            ConfigError: ``target`` is not one of the model's classes.
        """
        # Imported on first use: grad-cam pulls in scikit-learn and matplotlib, seconds of start-up that
        # /predict never needs.
        from bonetumor.evaluation.gradcam import gradcam_heatmaps, overlay

        classes = self.predictor.metadata.classes
        if target is not None and target not in classes:
            raise ConfigError(f"target {target!r} is not a class of this model; expected one of {list(classes)}")
        audit = audit_fields(data)
        image, tissue = self._checked(data, source)
        answer = self._finish(self._predict([image])[0], tissue, audit)
        explained = target or answer["label"]
        with self._torch_lock:
            heatmap = gradcam_heatmaps(
                self.predictor.model,
                self.predictor.metadata.arch,
                [image],
                self.predictor.transform,
                targets=[classes.index(explained)],
            )[0]
        return {
            **answer,
            "target": explained,
            "heatmap": np.round(heatmap, 4).tolist(),
            "heatmap_size": list(heatmap.shape),
            "heatmap_png": _png_base64(_jet(heatmap, EXPLAIN_PNG_SIDE)),
            "overlay_png": _png_base64(overlay(image, heatmap, EXPLAIN_PNG_SIDE)),
        }

    def info(self) -> dict[str, Any]:
        """What ``/model_info`` shows: identity, runtime and why, input checks, preprocessing, provenance."""
        meta = self.predictor.metadata
        return {
            "name": self.name,
            "version": self.version,
            "run_id": self.run_id,
            "trained_at": self.trained_at,
            "served_as": self.registry.get("served_as", self.version),
            "aliases": [a for a in self.registry.get("aliases", "").split(",") if a],
            "gate": {
                "decision": self.registry.get("gate_decision", ""),
                "reason": self.registry.get("gate_reason", ""),
            },
            "arch": meta.arch,
            "classes": list(meta.classes),
            "runtime": {**(meta.runtime or {}), "engine": self.engine_name, "reason": self.engine_reason},
            "input_checks": {
                "min_size": self.checks.min_size,
                "min_tissue_fraction": self.checks.min_tissue_fraction,
                "source": self.checks.source,
            },
            "tile_size": meta.tile_size,
            "input_size": meta.input_size,
            "test_time_views": meta.views.to_dict() | {"count": meta.views.count},
            "init": meta.provenance.get("init", "unknown (registered before bonetumor recorded it)"),
            "mean": list(meta.mean),
            "std": list(meta.std),
            "provenance": meta.provenance,
            "versions": meta.versions,
            "stain_normalization": None if meta.stain is None else meta.stain.get("method"),
            "referral": meta.referral,
            # Where the version's model card is, or why there is none.
            "model_card": "/model_card" if self.card else None,
        }


def _drift_reference(bundle_dir: Path) -> DriftReference | None:
    """The bundle's drift reference, checked against its SHA-256; None for versions registered without one."""
    path = bundle_dir / DRIFT_REFERENCE
    if not path.is_file():
        log.info("%s has no drift reference: answers carry no drift features", bundle_dir)
        return None
    return DriftReference.load(path)


def _jet(heatmap: np.ndarray, side: int) -> np.ndarray:
    """The heatmap in jet colours, ``side`` px square, RGBA uint8 (alpha opaque: the page sets the opacity)."""
    from matplotlib import colormaps

    resized = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F").resize(
        (side, side), Image.Resampling.BILINEAR
    )
    rgba = colormaps["jet"](np.clip(np.asarray(resized), 0.0, 1.0))
    return np.asarray(np.round(rgba * 255), dtype=np.uint8)


def _png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    # Fast zlib level: the heatmap PNGs travel once over the network; level 6 took 8 ms each of an /explain.
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
