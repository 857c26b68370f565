"""Augment: the augmentation policy as a versioned artifact, applied on the fly in training, and its preview.

The policy (random crops at a jittered scale, flips, 90-degree rotations, an optional free rotation, HED stain
jitter, colour jitter, and which stain normalisation to use) is written to ``policy.json`` with a format version
and a content hash. The train stage rebuilds the transform from that file, so a model's MLflow run names exactly
the policy it saw. Augmented tiles are never written to disk: every step draws new ones. The stain normaliser
itself is not part of the policy: it is fitted per fold on that fold's training tiles
(:mod:`bonetumor.transforms.stain`) and handed to :func:`build_train_transform`.

Training sees random ``preprocess.input_size`` crops of the tile resized to ``preprocess.tile_size`` (the scale
every tile is seen at); evaluation and serving see fixed crops of the same resized tile
(:mod:`bonetumor.transforms.tta`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torchvision.transforms import v2

from bonetumor.config import AugmentConfig, Config, PreprocessConfig, save_resolved
from bonetumor.data.manifest import read_manifest, resolve_paths
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import CenterSquareCrop, tensor_tail, tile_ops
from bonetumor.transforms.stain import STAIN_METHODS, HedJitter, StainNormalizer, fit_from_files
from bonetumor.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

#: Version 2 added ``hed_jitter`` and ``stain_normalization``; version 3 crops (``rotate90``, ``color_jitter``,
#: ``zoom_max`` as a scale jitter of the ``input_size`` crop).
POLICY_FORMAT_VERSION = 3
POLICY_FILE = "policy.json"
PREVIEW_FILE = "preview.png"
#: Rotation leaves corners outside the tile; fill them with white, the colour of empty glass in H&E slides.
ROTATION_FILL = (255, 255, 255)
#: How many HED-jitter-only examples each preview row shows (when the jitter is on).
PREVIEW_HED_EXAMPLES = 2
#: Side of one preview cell in inches, and the PNG resolution: the PNG is ``columns * 1.6 * 110`` pixels wide.
PREVIEW_CELL_INCHES = 1.6
PREVIEW_DPI = 110
#: Preview only: how many of the manifest's tiles the illustrative stain target is fitted on.
PREVIEW_STAIN_TILES = 64


@dataclass(frozen=True)
class AugmentPolicy:
    """The augmentation of training tiles, after the stain normalisation and resize every tile gets.

    In order: free rotation, scaled random crop, flips, 90-degree rotation, HED jitter, colour and hue jitter.

    Attributes:
        rotation_degrees: Uniform random rotation of the tile in +/- this many degrees (corners white); 0 = off.
        rotate90: Rotate each crop by a random multiple of 90 degrees.
        hflip_p: Probability of a horizontal flip.
        vflip_p: Probability of a vertical flip.
        zoom_max: The crop covers ``input_size * z`` tile pixels, ``z`` log-uniform in ``[1/zoom_max, zoom_max]``.
        hed_jitter: Strength of the HED stain jitter (:class:`bonetumor.transforms.stain.HedJitter`); 0 = off.
        color_jitter: Brightness, contrast and saturation jitter strength; 0 = off.
        hue_jitter: Hue jitter, share of the colour circle; 0 = off.
        stain_normalization: ``none``, ``reinhard`` or ``macenko``: which normaliser training fits on each fold's
            training tiles and applies first (deterministic, also at evaluation and serving time).
    """

    rotation_degrees: float
    rotate90: bool
    hflip_p: float
    vflip_p: float
    zoom_max: float
    hed_jitter: float = 0.0
    color_jitter: float = 0.0
    hue_jitter: float = 0.0
    stain_normalization: str = "none"

    @classmethod
    def from_config(cls, config: AugmentConfig) -> AugmentPolicy:
        """Take the policy fields from the augment section of params.yaml."""
        return cls(
            config.rotation_degrees,
            config.rotate90,
            config.hflip_p,
            config.vflip_p,
            config.zoom_max,
            config.hed_jitter,
            config.color_jitter,
            config.hue_jitter,
            config.stain_normalization,
        )

    def digest(self) -> str:
        """Return a short content hash that identifies this policy."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def save_policy(policy: AugmentPolicy, path: str | Path) -> Path:
    """Write the policy artifact (format version, hash and fields)."""
    return write_json(
        path, {"format_version": POLICY_FORMAT_VERSION, "digest": policy.digest(), "policy": asdict(policy)}
    )


def load_policy(path: str | Path) -> AugmentPolicy:
    """Read a policy artifact written by :func:`save_policy`.

    Raises:
        ArtifactError: The file is missing, half-written, of another format version (version 1 predates stain
            augmentation: rerun ``bonetumor augment``), lacks fields, or names an unknown stain normalisation.
    """
    document = read_json(path, "augmentation policy")
    version = document.get("format_version") if isinstance(document, dict) else None
    if isinstance(version, int) and version < POLICY_FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: augmentation policy of format version {version} is out of date (version "
            f"{POLICY_FORMAT_VERSION} trains on random crops: rotate90, color_jitter, zoom_max as crop scale); "
            "rerun `bonetumor augment` (dvc repro does this)"
        )
    if not isinstance(document, dict) or version != POLICY_FORMAT_VERSION:
        raise ArtifactError(f"{path}: not an augmentation policy of format version {POLICY_FORMAT_VERSION}")
    fields = document.get("policy")
    try:
        if not isinstance(fields, dict):
            raise TypeError(f"'policy' is {type(fields).__name__}, not a mapping")
        # Every field is required in a stored policy: a default would hide a hand-edited or truncated file.
        missing = sorted(set(AugmentPolicy.__annotations__) - set(fields))
        if missing:
            raise KeyError(", ".join(missing))
        policy = AugmentPolicy(**fields)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(
            f"{path}: malformed policy ({exc}); expected fields {list(AugmentPolicy.__annotations__)}"
        ) from exc
    if policy.stain_normalization not in STAIN_METHODS:
        raise ArtifactError(
            f"{path}: field 'stain_normalization' is {policy.stain_normalization!r}; expected one of "
            f"{list(STAIN_METHODS)}"
        )
    if policy.digest() != document.get("digest"):
        raise ArtifactError(
            f"{path}: policy digest does not match its fields; the file was edited by hand or is corrupt"
        )
    return policy


class RandomScaledCrop:
    """A random ``size`` crop of a tile at a slightly jittered scale.

    A square of ``size * z`` pixels (``z`` log-uniform in ``[1/zoom_max, zoom_max]``) is cut out and resized to
    ``size``. The crop side is capped at the tile's side. With ``zoom_max`` 1 it is a plain random crop (no resampling).
    Draws come from torch's global generator, as torchvision's random transforms do, so seeding repeats them.
    """

    def __init__(self, size: int, zoom_max: float = 1.0) -> None:
        if size < 1 or zoom_max < 1.0:
            raise ConfigError(f"RandomScaledCrop: size={size}, zoom_max={zoom_max}; expected size >= 1, zoom >= 1")
        self.size = size
        self.log_zoom = math.log(zoom_max)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return the crop, resized to ``size`` squared."""
        width, height = image.size
        factor = math.exp((float(torch.rand(())) * 2.0 - 1.0) * self.log_zoom) if self.log_zoom else 1.0
        side = max(1, min(width, height, round(self.size * factor)))
        left = int(torch.randint(0, width - side + 1, ()))
        top = int(torch.randint(0, height - side + 1, ()))
        crop = image.crop((left, top, left + side, top + side))
        return crop if side == self.size else crop.resize((self.size, self.size), Image.Resampling.BILINEAR)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, zoom_max={math.exp(self.log_zoom):g})"


class RandomRotate90:
    """Rotate a PIL image by a random multiple of 90 degrees (lossless, no corners to fill)."""

    _TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return the rotated image."""
        turn = self._TURNS[int(torch.randint(0, 4, ()))]
        return image if turn is None else image.transpose(turn)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def geometric_ops(policy: AugmentPolicy, input_size: int) -> list[Callable[[Any], Any]]:
    """Return the random geometry: free rotation, the scaled ``input_size`` crop, flips, 90-degree rotation."""
    ops: list[Callable[[Any], Any]] = []
    if policy.rotation_degrees > 0:
        ops.append(v2.RandomRotation(policy.rotation_degrees, fill=ROTATION_FILL))
    ops.append(RandomScaledCrop(input_size, policy.zoom_max))
    if policy.hflip_p > 0:
        ops.append(v2.RandomHorizontalFlip(policy.hflip_p))
    if policy.vflip_p > 0:
        ops.append(v2.RandomVerticalFlip(policy.vflip_p))
    if policy.rotate90:
        ops.append(RandomRotate90())
    return ops


def augmentation_ops(policy: AugmentPolicy, input_size: int) -> list[Callable[[Any], Any]]:
    """Return the random steps of the policy: :func:`geometric_ops`, then HED jitter and colour jitter.

    The jitters come after the crop so that they colour the small crop, not the larger tile (cheaper, same effect).
    """
    ops = geometric_ops(policy, input_size)
    if policy.hed_jitter > 0:
        ops.append(HedJitter(policy.hed_jitter))
    if policy.color_jitter > 0 or policy.hue_jitter > 0:
        strength = policy.color_jitter
        ops.append(
            v2.ColorJitter(
                brightness=strength or None,
                contrast=strength or None,
                saturation=strength or None,
                hue=policy.hue_jitter or None,
            )
        )
    return ops


def _check_stain(policy: AugmentPolicy, stain: StainNormalizer | None) -> None:
    if stain is not None and stain.method != policy.stain_normalization:
        raise ConfigError(
            f"the stain normaliser uses {stain.method!r} but the augmentation policy says "
            f"stain_normalization={policy.stain_normalization!r}; fit the normaliser the policy names"
        )
    if stain is None and policy.stain_normalization != "none":
        log.warning(
            "augmentation policy asks for %s stain normalisation but no fitted normaliser was given; "
            "training tiles are not normalised",
            policy.stain_normalization,
        )


def train_image_ops(
    policy: AugmentPolicy, preprocess: PreprocessConfig, stain: StainNormalizer | None = None
) -> list[Callable[[Any], Any]]:
    """Return the image-to-image part of the training transform: the shared tile steps, then the random ones.

    Raises:
        ConfigError: ``stain`` was fitted with another method than the policy names.
    """
    _check_stain(policy, stain)
    return tile_ops(preprocess.tile_size, stain) + augmentation_ops(policy, preprocess.input_size)


def build_train_transform(
    preprocess: PreprocessConfig, policy: AugmentPolicy, stain: StainNormalizer | None = None
) -> v2.Compose:
    """Return the random part of the training transform, from a prepared tile to the network's input tensor.

    Its input is the output of :func:`bonetumor.transforms.preprocess.tile_ops` (stain-normalised, squared, resized to
    ``tile_size``), which the training dataset computes once per tile and caches
    (:func:`bonetumor.data.datasets.TileDataset`'s ``prepare``); then the random crop and the other random steps of
    the policy, and the shared :func:`bonetumor.transforms.preprocess.tensor_tail`. Output: ``(3, input_size,
    input_size)``.

    Args:
        preprocess: The preprocess section.
        policy: The augmentation policy.
        stain: The stain normaliser fitted on this training set's tiles (checked against the policy; it is applied
            in ``prepare``, not here).

    Raises:
        ConfigError: ``stain`` was fitted with another method than the policy names.
    """
    _check_stain(policy, stain)
    return v2.Compose(augmentation_ops(policy, preprocess.input_size) + tensor_tail(preprocess))


PreviewColumn = tuple[str, Callable[[Image.Image], Image.Image]]


def preview_columns(
    policy: AugmentPolicy, preprocess: PreprocessConfig, samples: int, stain: StainNormalizer | None
) -> list[PreviewColumn]:
    """Return the preview's columns as (title, image-to-image step), one transform per column.

    The tile as every model sees it before cropping (resized to ``tile_size``); stain-normalised (when a normaliser
    is given); ``PREVIEW_HED_EXAMPLES`` HED-jitter-only examples (when the jitter is on); one geometric example
    (crop, flips, rotation); ``samples`` full-pipeline samples (what training feeds the network); and the centre
    test-time crop (what evaluation and serving see, with the other fixed crops).
    """
    size = preprocess.tile_size
    resize = v2.Compose([CenterSquareCrop(), v2.Resize((size, size), antialias=True)])
    columns: list[PreviewColumn] = [(f"tile ({size} px)", resize)]
    if stain is not None:
        columns.append((f"stain-normalised ({stain.method})", v2.Compose(tile_ops(preprocess.tile_size, stain))))
    if policy.hed_jitter > 0:
        jitter = v2.Compose([resize, HedJitter(policy.hed_jitter)])
        columns += [(f"HED jitter {i + 1}", jitter) for i in range(PREVIEW_HED_EXAMPLES)]
    columns.append(
        (
            f"geometric ({preprocess.input_size} px crop)",
            v2.Compose([resize, *geometric_ops(policy, preprocess.input_size)]),
        )
    )
    full = v2.Compose(train_image_ops(policy, preprocess, stain))
    columns += [(f"training input {i + 1}", full) for i in range(samples)]
    margin = (size - preprocess.input_size) // 2
    centre = v2.Compose(
        [*tile_ops(preprocess.tile_size, stain), v2.CenterCrop(preprocess.input_size)]
        if margin
        else tile_ops(preprocess.tile_size, stain)
    )
    columns.append(("test-time centre crop", centre))
    return columns


def render_preview(
    manifest: pd.DataFrame,
    manifest_dir: str | Path,
    policy: AugmentPolicy,
    preprocess: PreprocessConfig,
    config: AugmentConfig,
    out_png: str | Path,
    stain: StainNormalizer | None = None,
) -> Path:
    """Draw a grid: each row one real tile, each column one transform on its own (see :func:`preview_columns`).

    Tiles are chosen round-robin over the classes, with the augment seed, so the grid shows every class. When the
    policy names a stain normalisation and no ``stain`` is given, one is fitted on (up to
    :data:`PREVIEW_STAIN_TILES` of) the manifest's tiles. That target is only an illustration: training fits its
    own per fold, on that fold's training tiles only.

    Args:
        manifest: The data set manifest (``file`` and ``label`` columns).
        manifest_dir: Folder that the manifest's relative paths start from.
        policy: The augmentation policy.
        preprocess: The preprocess section (tile and crop sizes).
        config: The augment section (preview size and seed).
        out_png: The PNG to write.
        stain: A fitted normaliser to show instead of fitting one on the manifest.

    Returns:
        The written PNG.
    """
    rng = random.Random(config.seed)
    by_class = {label: list(group.index) for label, group in manifest.groupby("label", sort=True)}
    for rows in by_class.values():
        rng.shuffle(rows)
    chosen: list[Any] = []
    while len(chosen) < min(config.preview_tiles, len(manifest)):
        for rows in by_class.values():
            if rows and len(chosen) < config.preview_tiles:
                chosen.append(rows.pop())
    files = resolve_paths(manifest.loc[chosen], manifest_dir)
    title = f"Augmentation policy {policy.digest()}: {describe(policy)}"
    if stain is None and policy.stain_normalization != "none":
        stain = fit_from_files(
            policy.stain_normalization,
            resolve_paths(manifest, manifest_dir),
            max_tiles=PREVIEW_STAIN_TILES,
            seed=config.seed,
        )
        title += (
            "\nstain target fitted on this data set's tiles, for illustration only; "
            "training fits one per fold on that fold's training tiles"
        )
    torch.manual_seed(config.seed)
    columns = preview_columns(policy, preprocess, config.preview_samples, stain)
    # matplotlib's object API, not pyplot: no global backend or figure state, safe in servers and threads.
    fig = Figure(figsize=(PREVIEW_CELL_INCHES * len(columns), PREVIEW_CELL_INCHES * len(files) + 0.3))
    axes = fig.subplots(len(files), len(columns), squeeze=False)
    for row, (index, file) in enumerate(zip(chosen, files, strict=True)):
        image = decode_image(file)
        for col, (name, step) in enumerate(columns):
            axis = axes[row][col]
            axis.imshow(step(image))
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(str(manifest.at[index, "label"]), fontsize=7)
            if row == 0:
                axis.set_title(name, fontsize=6)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=PREVIEW_DPI)
    return out_png


def describe(policy: AugmentPolicy) -> str:
    """Return a one-line human description of a policy."""
    jitter = f"HED jitter +/-{policy.hed_jitter:g}" if policy.hed_jitter > 0 else "no HED jitter"
    colour = f"colour jitter +/-{policy.color_jitter:g}" if policy.color_jitter > 0 else "no colour jitter"
    colour += f", hue jitter +/-{policy.hue_jitter:g}" if policy.hue_jitter > 0 else ""
    rotation = f"rotation +/-{policy.rotation_degrees:g} deg, " if policy.rotation_degrees > 0 else ""
    crops = f"random crops with scale jitter {policy.zoom_max:g}x" if policy.zoom_max > 1 else "random crops"
    return (
        f"stain normalisation {policy.stain_normalization}, {crops}, {rotation}"
        f"{'90-degree rotations, ' if policy.rotate90 else ''}hflip p={policy.hflip_p:g}, "
        f"vflip p={policy.vflip_p:g}, {jitter}, {colour}"
    )


def run_augment(config: Config, manifest_path: str | Path, out_dir: str | Path) -> AugmentPolicy:
    """The augment stage: write ``<out_dir>/policy.json`` and the preview grid ``<out_dir>/preview.png``."""
    manifest_path = Path(manifest_path)
    policy = AugmentPolicy.from_config(config.augment)
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("preprocess", "augment"))
        save_policy(policy, tmp / POLICY_FILE)
        render_preview(
            read_manifest(manifest_path),
            manifest_path.parent,
            policy,
            config.preprocess,
            config.augment,
            tmp / PREVIEW_FILE,
        )
    log.info("augmentation policy %s: %s", policy.digest(), describe(policy))
    return policy
