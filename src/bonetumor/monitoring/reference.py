"""The drift reference of a model: what its training tiles looked like, stored beside the model version.

:func:`build_reference` measures the TRAINING tiles of a model with the same functions the service applies to
every upload (:mod:`bonetumor.monitoring.features`): the tile statistics matrix, and the penultimate-layer
embeddings reduced to their top principal components (numpy SVD; at most :data:`MAX_COMPONENTS`). The expected
label rates and referral rate (from the out-of-fold predictions, say) may be added, so a change in what the model
answers is tested too.

:func:`served_features` is what the service adds to each logged answer: the tile statistics and the embedding
projected on the reference's components, rounded, a few hundred bytes, no image.

A reference is saved as ``<name>.npz`` (the arrays, read back with ``allow_pickle=False``) and ``<name>.json``
beside it (model version, creation time, rates, statistic names, and the SHA-256 of the ``.npz``), so a damaged
or mismatched file is refused with an :class:`~bonetumor.errors.ArtifactError` that names it.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.monitoring.features import (
    STATISTICS,
    EmbeddingExtractor,
    embed_images,
    statistics_vector,
    tile_statistics,
)
from bonetumor.utils import sha256_file, write_json

if TYPE_CHECKING:
    from bonetumor.serving.predictor import Predictor

#: Format version of a saved reference (the ``.json``'s ``format_version``).
REFERENCE_FORMAT_VERSION = 1
#: Most principal components kept of the training embeddings (fewer when there are fewer tiles).
MAX_COMPONENTS = 8
#: Digits the served embedding and statistics are rounded to in the prediction log.
LOG_DIGITS = 5
#: Arrays of the ``.npz``, with the number of dimensions each must have.
_ARRAYS = {"statistics": 2, "pca_mean": 1, "pca_components": 2, "embeddings": 2}
#: Tiles measured per chunk while a reference is built (bounded memory for a large training set).
_CHUNK = 64


@dataclass(frozen=True, eq=False)
class DriftReference:
    """The training-side distributions that served inputs are compared with (arrays read-only).

    Attributes:
        statistics: ``(n, len(statistic_names))`` tile statistics of the ``n`` training tiles.
        pca_mean: ``(d,)`` mean training embedding.
        pca_components: ``(k, d)`` top principal directions of the training embeddings (unit rows).
        embeddings: ``(n, k)`` training embeddings projected on them (:meth:`project`).
        label_rates: Expected share of each predicted class, or None.
        referral_rate: Expected share of referred answers, or None.
        version: The model version the reference belongs to.
        created_at: UTC time of creation, ISO 8601.
        statistic_names: Column names of ``statistics`` (:data:`~bonetumor.monitoring.features.STATISTICS`).

    Raises:
        ValueError: The arrays' shapes do not fit together, or a rate is not in [0, 1].
    """

    statistics: NDArray[np.float64]
    pca_mean: NDArray[np.float64]
    pca_components: NDArray[np.float64]
    embeddings: NDArray[np.float64]
    label_rates: dict[str, float] | None = None
    referral_rate: float | None = None
    version: str = ""
    created_at: str = ""
    statistic_names: tuple[str, ...] = field(default=STATISTICS)

    def __post_init__(self) -> None:
        for name in _ARRAYS:
            array = np.array(getattr(self, name), dtype=np.float64)
            array.setflags(write=False)
            object.__setattr__(self, name, array)
        _check_shapes(self)
        object.__setattr__(self, "statistic_names", tuple(self.statistic_names))
        if self.referral_rate is not None and not 0.0 <= self.referral_rate <= 1.0:
            raise ValueError(f"referral_rate={self.referral_rate!r}: expected a share in [0, 1]")
        if self.label_rates is not None:
            object.__setattr__(self, "label_rates", _checked_rates(self.label_rates))

    @property
    def n_tiles(self) -> int:
        """Number of training tiles measured."""
        return int(self.statistics.shape[0])

    @property
    def embedding_dim(self) -> int:
        """Length of the network's embedding the components were fitted on."""
        return int(self.pca_mean.shape[0])

    @property
    def components(self) -> int:
        """Number of principal components ``k`` (the length of a logged embedding)."""
        return int(self.pca_components.shape[0])

    def project(self, embeddings: NDArray[Any]) -> NDArray[np.float64]:
        """Project ``(m, d)`` embeddings (or one ``(d,)``) on the reference's principal components: ``(m, k)``.

        Raises:
            ArtifactError: The embeddings are not of the length the reference was built for (another model).
        """
        array = np.asarray(embeddings, dtype=np.float64)
        single = array.ndim == 1
        array = array.reshape(1, -1) if single else array
        if array.ndim != 2 or array.shape[1] != self.embedding_dim:
            raise ArtifactError(
                f"embeddings of shape {np.shape(embeddings)} do not fit this drift reference (model version "
                f"{self.version!r}), built for embeddings of length {self.embedding_dim}: the reference belongs to "
                "another model; build one for this model (build_reference)"
            )
        projected = (array - self.pca_mean) @ self.pca_components.T
        return projected[0] if single else projected

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.npz`` (the arrays, no pickle) and ``<path>.json`` beside it; returns the ``.npz``.

        Args:
            path: The reference file; a ``.json`` suffix or none is replaced by ``.npz``.
        """
        npz, meta = reference_paths(path)
        npz.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **{name: getattr(self, name) for name in _ARRAYS})
        tmp = npz.with_name(f".{npz.name}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, npz)
        write_json(
            meta,
            {
                "format_version": REFERENCE_FORMAT_VERSION,
                "version": self.version,
                "created_at": self.created_at,
                "statistic_names": list(self.statistic_names),
                "label_rates": self.label_rates,
                "referral_rate": self.referral_rate,
                "tiles": self.n_tiles,
                "embedding_dim": self.embedding_dim,
                "components": self.components,
                "arrays": npz.name,
                "sha256": sha256_file(npz),
            },
        )
        return npz

    @classmethod
    def load(cls, path: str | Path) -> DriftReference:
        """Read a reference written by :meth:`save` (give the ``.npz`` or the ``.json``).

        Raises:
            ArtifactError: Either file is missing, the JSON is malformed, the ``.npz`` does not match the SHA-256
                the JSON records, is not a readable numpy archive, or lacks an array (the message names the file
                and what was expected).
        """
        npz, meta_path = reference_paths(path)
        meta = _read_meta(meta_path)
        if not npz.is_file():
            raise ArtifactError(
                f"drift reference arrays not found at {npz}; expected {npz.name} beside {meta_path.name} "
                "(both written by DriftReference.save)"
            )
        if sha256_file(npz) != meta["sha256"]:
            raise ArtifactError(
                f"{npz}: SHA-256 does not match the one {meta_path.name} recorded when the reference was saved: "
                "the file is damaged or was replaced; rebuild the reference (build_reference) and save it again"
            )
        arrays = _read_arrays(npz)
        try:
            return cls(
                **arrays,
                label_rates=meta["label_rates"],
                referral_rate=meta["referral_rate"],
                version=meta["version"],
                created_at=meta["created_at"],
                statistic_names=tuple(meta["statistic_names"]),
            )
        except ValueError as exc:
            raise ArtifactError(f"{npz} and {meta_path.name} do not form a drift reference: {exc}") from exc


def reference_paths(path: str | Path) -> tuple[Path, Path]:
    """The ``.npz`` and ``.json`` files of a reference, given either one (or the name without a suffix)."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")


def _check_shapes(reference: DriftReference) -> None:
    for name, ndim in _ARRAYS.items():
        array = getattr(reference, name)
        if array.ndim != ndim or not np.all(np.isfinite(array)):
            raise ValueError(f"{name} must be a {ndim}-dimensional array of finite numbers, got shape {array.shape}")
    n, columns = reference.statistics.shape
    k, d = reference.pca_components.shape
    if columns != len(reference.statistic_names):
        raise ValueError(f"statistics has {columns} columns for {len(reference.statistic_names)} statistic names")
    if reference.pca_mean.shape != (d,) or reference.embeddings.shape != (n, k) or k < 1:
        raise ValueError(
            f"shapes do not fit: statistics {reference.statistics.shape}, pca_mean {reference.pca_mean.shape}, "
            f"pca_components {reference.pca_components.shape}, embeddings {reference.embeddings.shape}; expected "
            "(n, s), (d,), (k, d) with k >= 1, and (n, k)"
        )


def _checked_rates(rates: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(rates, Mapping) or not rates:
        raise ValueError(f"label_rates={rates!r}: expected a mapping of class name to share")
    values = {str(name): float(rate) for name, rate in rates.items()}
    in_range = all(0.0 <= rate <= 1.0 for rate in values.values())
    if not in_range or not math.isclose(sum(values.values()), 1.0, abs_tol=1e-3):
        raise ValueError(f"label_rates={values}: expected shares in [0, 1] that sum to 1")
    return values


def _read_meta(path: Path) -> dict[str, Any]:
    expected = "the JSON DriftReference.save writes beside the .npz"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"drift reference metadata not found at {path}; expected {expected}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(
            f"drift reference metadata at {path} is not valid JSON ({exc}); expected {expected}"
        ) from exc
    except OSError as exc:
        raise ArtifactError(f"drift reference metadata at {path} cannot be read ({exc})") from exc
    required = ("format_version", "version", "created_at", "statistic_names", "label_rates", "referral_rate", "sha256")
    if not isinstance(meta, dict) or meta.get("format_version") != REFERENCE_FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(
            f"{path}: not a drift reference of format version {REFERENCE_FORMAT_VERSION} (found {found!r}); "
            f"expected {expected}"
        )
    missing = [key for key in required if key not in meta]
    if missing:
        raise ArtifactError(f"{path}: drift reference metadata lacks field(s) {missing}; expected {list(required)}")
    return meta


def _read_arrays(path: Path) -> dict[str, NDArray[np.float64]]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in _ARRAYS if name not in archive.files]
            if missing:
                raise ArtifactError(
                    f"{path}: drift reference lacks array(s) {missing}; expected {list(_ARRAYS)} (holds "
                    f"{archive.files})"
                )
            return {name: np.asarray(archive[name], dtype=np.float64) for name in _ARRAYS}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(
            f"{path}: not a readable numpy archive of the drift reference's arrays ({type(exc).__name__}: {exc}); "
            f"expected {list(_ARRAYS)} as written by DriftReference.save"
        ) from exc


def _chunks(images: Iterable[Image.Image]) -> Iterator[list[Image.Image]]:
    iterator = iter(images)
    while chunk := list(islice(iterator, _CHUNK)):
        yield chunk


def principal_components(embeddings: NDArray[Any], k: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The mean and the top ``k`` principal directions ``(k, d)`` of ``(n, d)`` embeddings (numpy SVD).

    Each direction's sign is fixed (its largest-magnitude loading is positive), so rebuilding a reference from the
    same tiles gives the same components.
    """
    array = np.asarray(embeddings, dtype=np.float64)
    mean = array.mean(axis=0)
    _, _, vt = np.linalg.svd(array - mean, full_matrices=False)
    components = vt[:k]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    return mean, components * np.where(signs == 0, 1.0, signs)[:, None]


def build_reference(
    predictor: Predictor,
    images: Iterable[Image.Image],
    label_rates: Mapping[str, float] | None = None,
    referral_rate: float | None = None,
    version: str = "",
) -> DriftReference:
    """Measure a model's TRAINING tiles: tile statistics and embeddings on ``k = min(8, n - 1)`` components.

    Args:
        predictor: The model (its serving transform and network, as served).
        images: The training tiles (an iterable: read in chunks of 64).
        label_rates: Expected share of each class among the answers (e.g. the out-of-fold predictions'), or None.
        referral_rate: Expected share of referred answers, or None.
        version: The model version; empty takes ``predictor.version``.

    Raises:
        ConfigError: Fewer than 2 tiles, or a class of ``label_rates`` is not one of the model's.
        ValueError: A rate is outside [0, 1] or the label rates do not sum to 1.
    """
    stats: list[NDArray[np.float64]] = []
    embedded: list[NDArray[np.float32]] = []
    for chunk in _chunks(images):
        stats.extend(statistics_vector(tile_statistics(image)) for image in chunk)
        embedded.append(embed_images(predictor, chunk))
    if len(stats) < 2:
        raise ConfigError(f"a drift reference needs at least 2 training tiles, got {len(stats)}")
    classes = tuple(predictor.metadata.classes)
    unknown = sorted(set(label_rates or {}) - set(classes))
    if unknown:
        raise ConfigError(f"label_rates name class(es) {unknown} the model does not have; expected {list(classes)}")
    embeddings = np.concatenate(embedded).astype(np.float64)
    k = min(MAX_COMPONENTS, len(stats) - 1, embeddings.shape[1])
    mean, components = principal_components(embeddings, k)
    rates = None if label_rates is None else {name: float(label_rates.get(name, 0.0)) for name in classes}
    return DriftReference(
        statistics=np.stack(stats),
        pca_mean=mean,
        pca_components=components,
        embeddings=(embeddings - mean) @ components.T,
        label_rates=rates,
        referral_rate=referral_rate,
        version=version or predictor.version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def features_from_embeddings(
    reference: DriftReference, images: list[Image.Image], embeddings: NDArray[Any]
) -> list[dict[str, Any]]:
    """:func:`served_features` of tiles whose embeddings are already computed (:func:`predict_and_embed`).

    Raises:
        ArtifactError: The embeddings do not fit the reference (another model).
        ValueError: Not one embedding per image.
    """
    array = np.asarray(embeddings)
    if array.ndim != 2 or len(array) != len(images):
        raise ValueError(f"got embeddings of shape {array.shape} for {len(images)} tiles; expected one row per tile")
    if not images:
        return []
    projected = reference.project(array)
    return [
        {
            "stats": {name: round(value, LOG_DIGITS) for name, value in tile_statistics(image).items()},
            "embedding": [round(float(value), LOG_DIGITS) for value in row],
        }
        for image, row in zip(images, projected, strict=True)
    ]


def served_features_many(
    predictor: Predictor,
    reference: DriftReference,
    images: list[Image.Image],
    extractor: EmbeddingExtractor | None = None,
) -> list[dict[str, Any]]:
    """:func:`served_features` of several tiles, with one forward pass of the network (centre views).

    ``extractor`` (an :class:`EmbeddingExtractor` on ``predictor.model``) is reused when given.
    """
    if not images:
        return []
    return features_from_embeddings(reference, images, embed_images(predictor, images, extractor))


def served_features(
    predictor: Predictor, reference: DriftReference, image: Image.Image, extractor: EmbeddingExtractor | None = None
) -> dict[str, Any]:
    """What the service logs with an answer for drift monitoring: no image bytes, a few hundred bytes of JSON.

    Args:
        predictor: The served model's eager predictor (one extra forward pass, centre view only).
        reference: The model's drift reference (its principal components).
        image: The decoded upload.
        extractor: An :class:`EmbeddingExtractor` on ``predictor.model`` to reuse (the service keeps one); None
            hooks the model for this call only.

    Returns:
        ``{"stats": {statistic: value}, "embedding": [k floats]}``, rounded to :data:`LOG_DIGITS` digits.

    Raises:
        ArtifactError: The reference was built for a model with embeddings of another length.
    """
    return served_features_many(predictor, reference, [image], extractor)[0]
