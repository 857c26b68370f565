"""Augment: the augmentation policy as a versioned artifact, applied on the fly in training, and its preview.

The policy (rotation, flips, zoom, HED stain jitter, and which stain normalisation to use) is written to
``policy.json`` with a format version and a content hash. The train stage rebuilds the transform from that file, so
a model's MLflow run names exactly the policy it saw. Augmented tiles are never written to disk: every epoch draws
new ones. The stain normaliser itself is not part of the policy: it is fitted per fold on that fold's training
tiles (:mod:`bonetumor.stain`) and handed to :func:`build_train_transform`.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from bonetumor.errors import ArtifactError, ConfigError
from bonetumor.manifest import read_manifest, resolve_paths
from bonetumor.preprocess import CenterSquareCrop, decode_image, tensor_tail
from bonetumor.stain import STAIN_METHODS, HedJitter, StainNormalizer, fit_from_files
from bonetumor.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

#: Version 2 added ``hed_jitter`` and ``stain_normalization``.
POLICY_FORMAT_VERSION = 2
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
    """The augmentation applied to training tiles, in order: stain normalisation, rotation, flips, zoom, HED jitter.

    Attributes:
        rotation_degrees: Uniform random rotation in +/- this many degrees.
        hflip_p: Probability of a horizontal flip.
        vflip_p: Probability of a vertical flip.
        zoom_max: Largest zoom; a random square crop of at least ``1/zoom_max`` of the side is resized back.
        hed_jitter: Strength of the HED stain jitter (:class:`bonetumor.stain.HedJitter`); 0 = off.
        stain_normalization: ``none``, ``reinhard`` or ``macenko``: which normaliser training fits on each fold's
            training tiles and applies first (deterministic, also at evaluation and serving time).
    """

    rotation_degrees: float
    hflip_p: float
    vflip_p: float
    zoom_max: float
    hed_jitter: float = 0.0
    stain_normalization: str = "none"

    @classmethod
    def from_config(cls, config: AugmentConfig) -> AugmentPolicy:
        """Take the policy fields from the augment section of params.yaml."""
        return cls(
            config.rotation_degrees,
            config.hflip_p,
            config.vflip_p,
            config.zoom_max,
            config.hed_jitter,
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
            f"{POLICY_FORMAT_VERSION} adds hed_jitter and stain_normalization); rerun `bonetumor augment` "
            "(dvc repro does this)"
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


def geometric_ops(policy: AugmentPolicy, image_size: int) -> list[v2.Transform]:
    """Return the random rotation, flips and zoom; the last one (zoom) also brings the tile to ``image_size``."""
    ops: list[v2.Transform] = []
    if policy.rotation_degrees > 0:
        ops.append(v2.RandomRotation(policy.rotation_degrees, fill=ROTATION_FILL))
    if policy.hflip_p > 0:
        ops.append(v2.RandomHorizontalFlip(policy.hflip_p))
    if policy.vflip_p > 0:
        ops.append(v2.RandomVerticalFlip(policy.vflip_p))
    # Zoom: crop a random square covering 1/zoom_max**2 to all of the tile's area, resized to the model size.
    ops.append(
        v2.RandomResizedCrop(
            (image_size, image_size), scale=(1.0 / policy.zoom_max**2, 1.0), ratio=(1.0, 1.0), antialias=True
        )
    )
    return ops


def augmentation_ops(policy: AugmentPolicy, image_size: int) -> list[Callable[[Any], Any]]:
    """Return the random steps of the policy: rotation, flips, zoom (to ``image_size``), then HED jitter.

    The jitter comes after the zoom so that it colours the small model-size tile, not the larger source tile.
    """
    ops: list[Callable[[Any], Any]] = list(geometric_ops(policy, image_size))
    if policy.hed_jitter > 0:
        ops.append(HedJitter(policy.hed_jitter))
    return ops


def train_image_ops(
    policy: AugmentPolicy, image_size: int, stain: StainNormalizer | None = None
) -> list[Callable[[Any], Any]]:
    """Return the image-to-image part of the training transform: stain normalisation, then the random steps.

    Raises:
        ConfigError: ``stain`` was fitted with another method than the policy names.
    """
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
    return ([stain] if stain is not None else []) + augmentation_ops(policy, image_size)


def build_train_transform(
    preprocess: PreprocessConfig, policy: AugmentPolicy, stain: StainNormalizer | None = None
) -> v2.Compose:
    """Return the training transform.

    Stain normalisation (deterministic, the same as at evaluation and serving time), then rotation, flips, zoom,
    HED jitter, then the shared resize-and-normalise tail of :func:`bonetumor.preprocess.build_eval_transform`.

    Args:
        preprocess: The preprocess section.
        policy: The augmentation policy.
        stain: The stain normaliser fitted on this training set's tiles, or None when the policy uses none.

    Raises:
        ConfigError: ``stain`` was fitted with another method than the policy names.
    """
    return v2.Compose(train_image_ops(policy, preprocess.image_size, stain) + tensor_tail(preprocess))


PreviewColumn = tuple[str, Callable[[Image.Image], Image.Image]]


def preview_columns(
    policy: AugmentPolicy, image_size: int, samples: int, stain: StainNormalizer | None
) -> list[PreviewColumn]:
    """Return the preview's columns as (title, image-to-image step), one transform per column.

    Original; stain-normalised (when a normaliser is given); ``PREVIEW_HED_EXAMPLES`` HED-jitter-only examples
    (when the jitter is on); one geometric (rotation, flip, zoom) example; ``samples`` full-pipeline samples.
    """
    resize = v2.Compose([CenterSquareCrop(), v2.Resize((image_size, image_size), antialias=True)])
    columns: list[PreviewColumn] = [("original", resize)]
    if stain is not None:
        columns.append((f"stain-normalised ({stain.method})", v2.Compose([stain, resize])))
    if policy.hed_jitter > 0:
        jitter = v2.Compose([resize, HedJitter(policy.hed_jitter)])
        columns += [(f"HED jitter {i + 1}", jitter) for i in range(PREVIEW_HED_EXAMPLES)]
    columns.append(("geometric (rot/flip/zoom)", v2.Compose(geometric_ops(policy, image_size))))
    full = v2.Compose(train_image_ops(policy, image_size, stain))
    columns += [(f"full pipeline {i + 1}", full) for i in range(samples)]
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
        preprocess: The preprocess section (model input size).
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
    columns = preview_columns(policy, preprocess.image_size, config.preview_samples, stain)
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
    return (
        f"stain normalisation {policy.stain_normalization}, rotation +/-{policy.rotation_degrees:g} deg, "
        f"hflip p={policy.hflip_p:g}, vflip p={policy.vflip_p:g}, zoom up to {policy.zoom_max:g}x, {jitter}"
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
