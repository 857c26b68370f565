"""H&E stain augmentation (HED jitter) and stain normalisation (Reinhard, Macenko).

Why: the colour of an H&E slide depends on the lab's staining protocol, the stain batch and the scanner. A model
trained on tiles of one site learns those colours along with the morphology and loses accuracy on another site's
slides (domain shift); the osteosarcoma paper names domain adaptation as the open problem. Two complementary
remedies live here:

* :class:`HedJitter` (augmentation, training only): colour deconvolution into haematoxylin, eosin and DAB
  optical densities, a random scale and shift per stain, back to RGB (Tellez et al., 2018). The model sees many
  plausible stainings of each tile, so colour stops being a shortcut.
* :class:`StainNormalizer` (every tile, in training, evaluation and serving): maps a tile's stain to one target
  stain. ``reinhard`` matches the CIELAB mean and standard deviation of the tissue pixels (Reinhard et al.,
  2001); ``macenko`` estimates the tile's two stain vectors by SVD of its optical densities and re-renders the
  stain concentrations with the target's vectors and intensity (Macenko et al., 2009).

The target is fitted on TRAINING tiles only (each fold's, and all training tiles for the final model) with
:func:`fit_stain_normalizer` or :func:`fit_from_files`, never on validation or test tiles, which would leak their
colour statistics. The fitted parameters are plain numbers (:meth:`StainNormalizer.to_dict`) stored with the
model, so serving normalises exactly as training did.

Background: empty glass is near-white and carries no stain. Both methods estimate the stain on tissue pixels
only (:data:`TISSUE_OD`) and leave glass unchanged, with a soft ramp between glass and tissue so that tissue
borders show no seam (re-rendering glass that is not pure white would grey it). A tile with too few tissue pixels
to estimate its stain (:data:`MIN_TISSUE_PIXELS`), or (Macenko) whose tissue shows one stain only, is returned
unchanged: the transform stays total and deterministic. Fitting a target on training tiles with too little
tissue, or a single stain, raises :class:`~bonetumor.errors.DatasetError` instead.

Choices beyond the textbook methods, each measured on the 30 sample tiles: the Reinhard target spread is the
pooled *within-tile* standard deviation (the plain pooled one also counts the differences between tiles and is
1.4 to 2.2 times larger, which stretched every tile's colours), and a tile's colour spread is stretched at most
:data:`REINHARD_MAX_GAIN` times (near-uniform cortical bone otherwise gets invented contrast and cyan lacunae).
Reinhard matches whole-tile colour statistics, so a tile whose tissue mix differs much from the average still
gets a colour cast; Macenko separates stain from content and is the better choice when tiles vary in content.

The colour spaces and the H&E stain vectors come from scikit-image (``rgb2lab``/``lab2rgb`` and the
``hed_from_rgb``/``rgb_from_hed`` matrices). The jitter works on optical densities itself instead of calling
``rgb2hed``/``hed2rgb``: those clip negative concentrations, so their round trip alone changes real tiles (a
mean of 2.6 and up to 8.8 grey levels on the sample tiles), and their rescaled unit would make the additive
shift about 14 times stronger than in Tellez et al.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from skimage.color import hed_from_rgb, lab2rgb, rgb2lab, rgb_from_hed

from bonetumor.errors import ArtifactError, ConfigError, DatasetError
from bonetumor.transforms.decode import decode_image
from bonetumor.utils import read_json, write_json

#: Values of ``augment.stain_normalization`` (``none`` = no normaliser).
STAIN_METHODS: tuple[str, ...] = ("none", "reinhard", "macenko")
#: Format version of :meth:`StainNormalizer.to_dict`.
STAIN_FORMAT_VERSION = 1
#: Optical density at which a pixel counts as tissue (Macenko's beta; about 219 of 255), in its darkest channel.
#: The common Macenko reference code asks every channel to reach it, which drops pure eosin (its red and blue OD
#: stay below 0.15 up to a concentration of 2) and pulls the eosin vector towards haematoxylin; with the darkest
#: channel, both vectors of synthetic H&E tiles are recovered (cosine > 0.999). Both methods use this mask.
TISSUE_OD = 0.15
#: Optical density below which a pixel counts as empty glass (about 243 of 255): normalisation leaves it unchanged.
BACKGROUND_OD = 0.05
#: Fewest tissue pixels a tile (or a set of training tiles) needs for its stain to be estimated.
MIN_TISSUE_PIXELS = 100
#: Reinhard: largest factor by which a tile's colour spread is stretched (or shrunk) towards the target's.
REINHARD_MAX_GAIN = 2.0
#: Macenko: percentile of the stain-vector angles (1 and 99) and of the concentrations (99) treated as extremes.
MACENKO_ANGLE_PERCENTILE = 1.0
MACENKO_CONCENTRATION_PERCENTILE = 99.0
#: Macenko fit: at most this many tissue pixels per training tile enter the pooled SVD (bounded memory).
MACENKO_PIXELS_PER_TILE = 4096
#: Two estimated stain vectors closer than this cosine are one stain; the tile cannot be separated.
MAX_STAIN_COSINE = 0.995

FloatArray = NDArray[np.float32] | NDArray[np.float64]


def rgb_to_od(pixels: NDArray[Any]) -> NDArray[np.float32]:
    """Return the optical density ``-ln((I + 1) / 256)`` of 8-bit RGB values (0 for white, about 5.5 for black)."""
    return -np.log((pixels.astype(np.float32) + 1.0) / 256.0)


def od_to_rgb(od: FloatArray) -> NDArray[np.uint8]:
    """Invert :func:`rgb_to_od`, rounding and clipping to 8-bit RGB."""
    return np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def _rgb_array(image: Image.Image) -> NDArray[np.uint8]:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


class HedJitter:
    """Random H&E stain augmentation of a PIL RGB image, usable inside ``torchvision.transforms.v2.Compose``.

    The image is deconvolved into haematoxylin, eosin and DAB optical densities with scikit-image's H&E-DAB
    matrix; each stain channel is multiplied by U(1 - s, 1 + s) and shifted by U(-s, s) (in optical density),
    then converted back and clipped to 8 bits. Random numbers come from torch's global generator, so
    ``torch.manual_seed`` repeats the draws and DataLoader workers draw independently, as for the v2 transforms.
    Empty glass has no stain, so only the shift reaches it: at most ``2.3 * s`` optical density (about 228 of
    255 at s = 0.05).

    Args:
        strength: ``s`` above, in [0, 1); 0 returns every image unchanged.

    Raises:
        ConfigError: ``strength`` is outside [0, 1).
    """

    def __init__(self, strength: float) -> None:
        if not (isinstance(strength, (int, float)) and 0.0 <= strength < 1.0):
            raise ConfigError(f"augment.hed_jitter={strength!r}: expected a number in [0, 1)")
        self.strength = float(strength)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return a stain-jittered copy of ``image`` (``image`` itself when the strength is 0)."""
        if self.strength == 0.0:
            return image
        pixels = _rgb_array(image)
        draws = (torch.rand(2, 3, dtype=torch.float64) * 2.0 - 1.0) * self.strength
        scale = (1.0 + draws[0]).numpy().astype(np.float32)
        shift = draws[1].numpy().astype(np.float32)
        stains = rgb_to_od(pixels) @ hed_from_rgb.astype(np.float32)
        jittered = (stains * scale + shift) @ rgb_from_hed.astype(np.float32)
        return Image.fromarray(od_to_rgb(jittered), mode="RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strength={self.strength:g})"


def _tissue_weight(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Per pixel 0 (empty glass) to 1 (tissue), ramping between :data:`BACKGROUND_OD` and :data:`TISSUE_OD`."""
    # The darkest channel decides; an elementwise minimum is ~50x faster than numpy's reduction over a 3-wide axis.
    darkest = rgb_to_od(np.minimum(np.minimum(pixels[..., 0], pixels[..., 1]), pixels[..., 2]))
    return np.clip((darkest - BACKGROUND_OD) / (TISSUE_OD - BACKGROUND_OD), 0.0, 1.0)


def _keep_glass(normalised: FloatArray, pixels: NDArray[np.uint8], weight: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Blend: tissue takes the normalised colour, glass keeps its own, with a ramp between (no seam)."""
    blended = weight[..., None] * normalised + (1.0 - weight[..., None]) * pixels.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _to_lab(pixels: NDArray[np.uint8]) -> NDArray[np.float32]:
    # float32 input makes scikit-image compute in float32: about 5 ms instead of 16 ms per 256 px round trip.
    return np.asarray(rgb2lab(pixels.astype(np.float32) / 255.0), dtype=np.float32)


def _from_lab(lab: NDArray[np.float32]) -> NDArray[np.float32]:
    with warnings.catch_warnings():
        # Out-of-gamut LAB values are clipped to valid RGB, which is what we want; the warning only says so.
        warnings.filterwarnings("ignore", message=".*negative Z values.*")
        return np.asarray(lab2rgb(lab), dtype=np.float32)


def _stain_vectors(od: NDArray[np.float32]) -> NDArray[np.float64] | None:
    """Macenko's stain vectors (unit optical-density columns: haematoxylin, eosin) of tissue pixels ``od`` (N x 3).

    Returns None when the two extreme directions coincide (one stain only): the stains cannot be separated.
    """
    _, vectors = np.linalg.eigh(np.cov(od.astype(np.float64).T))
    plane = vectors[:, [2, 1]]  # the two largest principal directions span the stain plane
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # eigenvector signs are arbitrary; point into OD > 0
    projected = od @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, [MACENKO_ANGLE_PERCENTILE, 100.0 - MACENKO_ANGLE_PERCENTILE])
    first = plane @ np.array([math.cos(low), math.sin(low)])
    second = plane @ np.array([math.cos(high), math.sin(high)])
    # Haematoxylin absorbs red light more than eosin does: the vector with the larger red OD is haematoxylin.
    stains = np.stack([first, second] if first[0] > second[0] else [second, first], axis=1)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    if abs(float(stains[:, 0] @ stains[:, 1])) > MAX_STAIN_COSINE:
        return None
    return stains


def _concentrations(stains: NDArray[np.float64], od: NDArray[np.float32]) -> NDArray[np.float32]:
    """Least-squares stain concentrations (N x 2) of optical densities ``od`` (N x 3) for stain columns (3 x 2)."""
    # float32 and pixel-major layout: half the memory traffic of float64 columns, the same result to 1e-6.
    return np.asarray(od @ np.linalg.pinv(stains).T.astype(np.float32), dtype=np.float32)


def _float_tuple(value: Any, field: str, length: int, positive: bool) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != length:
        raise ArtifactError(f"stain normaliser field {field!r}: expected a list of {length} numbers, got {value!r}")
    numbers: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise ArtifactError(f"stain normaliser field {field!r}: expected finite numbers, got {value!r}")
        if positive and item <= 0:
            raise ArtifactError(f"stain normaliser field {field!r}: expected numbers > 0, got {value!r}")
        numbers.append(float(item))
    return tuple(numbers)


#: The fitted parameters each method needs: field name, number of values, whether they must be > 0.
_METHOD_FIELDS: dict[str, tuple[tuple[str, int, bool], ...]] = {
    "reinhard": (("lab_mean", 3, False), ("lab_std", 3, True)),
    "macenko": (("stain_matrix", 6, False), ("max_concentrations", 2, True)),
}


@dataclass(frozen=True)
class StainNormalizer:
    """A fitted stain normaliser: deterministic, picklable (DataLoader workers), stored with the model.

    Attributes:
        method: ``reinhard`` or ``macenko``.
        lab_mean: Reinhard: CIELAB mean (L, a, b) of the target's tissue pixels; empty for Macenko.
        lab_std: Reinhard: CIELAB standard deviation of the target's tissue pixels within a tile (pooled over
            the target's tiles); empty for Macenko.
        stain_matrix: Macenko: unit optical-density vectors of haematoxylin then eosin, (R, G, B) each, flattened
            to 6 numbers; empty for Reinhard.
        max_concentrations: Macenko: 99th percentile of the target's haematoxylin and eosin concentrations;
            empty for Reinhard.

    Raises:
        ConfigError: ``method`` is not ``reinhard`` or ``macenko``.
        ArtifactError: A parameter the method needs is missing, of the wrong length, not finite, or (a standard
            deviation or concentration) not positive; or a parameter of the other method is set.
    """

    method: str
    lab_mean: tuple[float, ...] = ()
    lab_std: tuple[float, ...] = ()
    stain_matrix: tuple[float, ...] = ()
    max_concentrations: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in _METHOD_FIELDS:
            raise ConfigError(
                f"stain normaliser field 'method': {self.method!r} is not one of {sorted(_METHOD_FIELDS)}"
            )
        needed = {name: (length, positive) for name, length, positive in _METHOD_FIELDS[self.method]}
        for spec in fields(self)[1:]:
            value = getattr(self, spec.name)
            if spec.name in needed:
                length, positive = needed[spec.name]
                object.__setattr__(self, spec.name, _float_tuple(value, spec.name, length, positive))
            elif value:
                raise ArtifactError(
                    f"stain normaliser field {spec.name!r} does not belong to method {self.method!r}; "
                    f"expected only {sorted(needed)}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Return the normaliser as plain JSON data (format version, method and that method's float lists)."""
        data: dict[str, Any] = {"format_version": STAIN_FORMAT_VERSION, "method": self.method}
        for name, _, _ in _METHOD_FIELDS[self.method]:
            data[name] = list(getattr(self, name))
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "stain normaliser") -> StainNormalizer:
        """Rebuild a normaliser from :meth:`to_dict` output.

        Args:
            data: The dict.
            source: Where it came from (a file, a model's metadata), for error messages.

        Raises:
            ArtifactError: ``data`` is not a mapping, has another format version, misses or has unknown fields,
                or holds malformed values (the message names the field).
            ConfigError: The method is unknown.
        """
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: expected a mapping with 'method' and parameters, got {type(data).__name__}")
        if data.get("format_version") != STAIN_FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: field 'format_version' is {data.get('format_version')!r}, expected {STAIN_FORMAT_VERSION}"
            )
        method = data.get("method")
        if method not in _METHOD_FIELDS:
            raise ConfigError(f"{source}: field 'method' is {method!r}; expected one of {sorted(_METHOD_FIELDS)}")
        expected = {"format_version", "method"} | {name for name, _, _ in _METHOD_FIELDS[method]}
        missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
        if missing or unknown:
            raise ArtifactError(
                f"{source}: {method} normaliser has missing field(s) {missing} and unknown field(s) {unknown}; "
                f"expected exactly {sorted(expected)}"
            )
        try:
            return cls(method, **{name: data[name] for name in expected - {"format_version", "method"}})
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc}") from exc

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return ``image`` with its stain mapped to the target (unchanged when it has too little tissue)."""
        pixels = _rgb_array(image)
        out = self._reinhard(pixels) if self.method == "reinhard" else self._macenko(pixels)
        return image if out is None else Image.fromarray(out, mode="RGB")

    def _reinhard(self, pixels: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
        weight = _tissue_weight(pixels)
        tissue = weight >= 1.0
        if int(tissue.sum()) < MIN_TISSUE_PIXELS:
            return None
        lab = _to_lab(pixels)
        # Channel-major copy: numpy reduces a long contiguous axis ~10x faster than a 3-wide trailing one.
        channels = np.ascontiguousarray(lab[tissue].T)
        mean, std = channels.mean(axis=1), channels.std(axis=1)
        target_mean = np.asarray(self.lab_mean, dtype=np.float32)
        target_std = np.asarray(self.lab_std, dtype=np.float32)
        # A near-uniform tile (pure cortical bone) has little colour spread by content, not by staining: an
        # unlimited gain would invent contrast and push pale lacunae out of gamut (cyan), so the gain is capped.
        gain = np.clip(target_std / np.maximum(std, 1e-6), 1.0 / REINHARD_MAX_GAIN, REINHARD_MAX_GAIN)
        matched = (lab - mean) * gain + target_mean
        return _keep_glass(_from_lab(matched) * 255.0, pixels, weight)

    def _macenko(self, pixels: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
        weight = _tissue_weight(pixels)
        tissue = (weight >= 1.0).reshape(-1)
        if int(tissue.sum()) < MIN_TISSUE_PIXELS:
            return None
        od = rgb_to_od(pixels).reshape(-1, 3)
        stains = _stain_vectors(od[tissue])
        if stains is None:
            return None
        concentrations = _concentrations(stains, od)
        max_c = np.percentile(concentrations[tissue], MACENKO_CONCENTRATION_PERCENTILE, axis=0)
        if not np.all(max_c > 1e-6):
            return None
        # Rows of the target matrix are the stain OD vectors: concentrations (N x 2) @ (2 x 3) = OD (N x 3).
        target = np.asarray(self.stain_matrix, dtype=np.float32).reshape(2, 3)
        gain = (np.asarray(self.max_concentrations) / max_c).astype(np.float32)
        rendered = (concentrations * gain) @ target
        normalised = np.clip(256.0 * np.exp(-rendered) - 1.0, 0.0, 255.0).reshape(pixels.shape)
        # Glass that is not pure white (245, say) still has a small optical density; rescaling its concentrations
        # would grey it (to about 225 on synthetic tiles), so glass keeps its colour as in Reinhard.
        return _keep_glass(normalised, pixels, weight)


def fit_stain_normalizer(method: str, images: Iterable[Image.Image]) -> StainNormalizer | None:
    """Fit a stain normaliser whose target is the pooled stain of ``images``.

    Pass TRAINING tiles only: the target must not see validation or test tiles.

    Args:
        method: ``none``, ``reinhard`` or ``macenko``.
        images: The tiles (PIL images, converted to RGB).

    Returns:
        The normaliser, or None for ``none``.

    Raises:
        ConfigError: The method is unknown.
        DatasetError: There are no images, fewer than :data:`MIN_TISSUE_PIXELS` tissue pixels in all of them, or
            (Macenko) their tissue shows one stain only.
    """
    if method not in STAIN_METHODS:
        raise ConfigError(f"augment.stain_normalization={method!r}: expected one of {list(STAIN_METHODS)}")
    if method == "none":
        return None
    if method == "reinhard":
        return _fit_reinhard(images)
    return _fit_macenko(images)


def _fit_reinhard(images: Iterable[Image.Image]) -> StainNormalizer:
    # The mean is pooled over all tissue pixels of all tiles. The spread is the pooled WITHIN-tile standard
    # deviation: the transform matches one tile at a time, and the plain pooled deviation also counts how much
    # the tiles differ from one another (on the sample tiles 1.4 to 2.2 times a tile's own spread), which would
    # stretch the colours of every tile. Running sums in float64 keep memory flat for any number of tiles.
    count, total, within, tiles = 0, np.zeros(3), np.zeros(3), 0
    for image in images:
        tiles += 1
        pixels = _rgb_array(image)
        tissue = _tissue_weight(pixels) >= 1.0
        lab = _to_lab(pixels)[tissue].astype(np.float64)
        if len(lab) == 0:
            continue
        count += len(lab)
        total += lab.sum(axis=0)
        within += ((lab - lab.mean(axis=0)) ** 2).sum(axis=0)
    _require_tissue(count, tiles)
    mean, std = total / count, np.sqrt(within / count)
    if not np.all(std > 0):
        raise DatasetError(f"the {tiles} tiles have no colour variation in their tissue; cannot fit Reinhard")
    return StainNormalizer("reinhard", lab_mean=tuple(mean.tolist()), lab_std=tuple(std.tolist()))


def _fit_macenko(images: Iterable[Image.Image]) -> StainNormalizer:
    # A fixed seed: the fit is a pure function of the tiles, so reruns store the same target.
    rng = np.random.default_rng(0)
    pooled: list[NDArray[np.float32]] = []
    tiles = 0
    for image in images:
        tiles += 1
        pixels = _rgb_array(image)
        od = rgb_to_od(pixels).reshape(-1, 3)[(_tissue_weight(pixels) >= 1.0).reshape(-1)]
        if len(od) > MACENKO_PIXELS_PER_TILE:
            od = od[rng.choice(len(od), MACENKO_PIXELS_PER_TILE, replace=False)]
        pooled.append(od)
    tissue = np.concatenate(pooled) if pooled else np.zeros((0, 3), dtype=np.float32)
    _require_tissue(len(tissue), tiles)
    stains = _stain_vectors(tissue)
    if stains is None:
        raise DatasetError(
            f"the tissue of the {tiles} tiles shows a single stain direction; cannot separate haematoxylin and "
            "eosin for Macenko normalisation (use reinhard, or check that the tiles are H&E)"
        )
    max_c = np.percentile(_concentrations(stains, tissue), MACENKO_CONCENTRATION_PERCENTILE, axis=0)
    if not np.all(max_c > 1e-6):
        raise DatasetError(f"the {tiles} tiles have (almost) no stain concentration; cannot fit Macenko")
    return StainNormalizer(
        "macenko", stain_matrix=tuple(stains.T.ravel().tolist()), max_concentrations=tuple(max_c.tolist())
    )


def _require_tissue(count: int, tiles: int) -> None:
    if tiles == 0:
        raise DatasetError("no tiles to fit the stain normaliser on; expected the training tiles")
    if count < MIN_TISSUE_PIXELS:
        raise DatasetError(
            f"the {tiles} tiles hold {count} tissue pixels (optical density >= {TISSUE_OD}); need at least "
            f"{MIN_TISSUE_PIXELS} to fit a stain target. Are they blank or near-white?"
        )


def fit_from_files(
    method: str, files: Sequence[str | Path], max_tiles: int = 64, seed: int = 0
) -> StainNormalizer | None:
    """Fit a stain normaliser on a seeded random subsample of tile files.

    The caller passes the TRAINING tiles only (of the fold, or all training tiles for the final model).

    Args:
        method: ``none``, ``reinhard`` or ``macenko``.
        files: Tile files, decoded with :func:`bonetumor.transforms.decode.decode_image`.
        max_tiles: At most this many tiles are decoded (a subsample chosen with ``seed``).
        seed: Seed of the subsample.

    Returns:
        The normaliser, or None for ``none`` (no file is read).

    Raises:
        ConfigError: The method is unknown or ``max_tiles`` < 1.
        DatasetError: See :func:`fit_stain_normalizer`.
        InvalidImageError: A chosen file does not decode.
    """
    if max_tiles < 1:
        raise ConfigError(f"max_tiles={max_tiles}: expected at least 1 tile to fit the stain normaliser on")
    if method not in STAIN_METHODS:
        raise ConfigError(f"augment.stain_normalization={method!r}: expected one of {list(STAIN_METHODS)}")
    if method == "none":
        return None
    chosen = list(files)
    if len(chosen) > max_tiles:
        chosen = random.Random(seed).sample(chosen, max_tiles)
    return fit_stain_normalizer(method, (decode_image(file) for file in chosen))


def save_stain_normalizer(normalizer: StainNormalizer, path: str | Path) -> Path:
    """Write :meth:`StainNormalizer.to_dict` as JSON (atomically)."""
    return write_json(path, normalizer.to_dict())


def load_stain_normalizer(path: str | Path) -> StainNormalizer:
    """Read a normaliser written by :func:`save_stain_normalizer`.

    Raises:
        ArtifactError: The file is missing, not JSON, or malformed (the message names the file and field).
        ConfigError: The stored method is unknown.
    """
    return StainNormalizer.from_dict(read_json(path, "stain normaliser"), source=str(path))
