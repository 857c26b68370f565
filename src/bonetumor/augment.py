"""Augment: the augmentation policy as a versioned artifact, applied on the fly in training, and its preview.

The policy (rotation, flips, zoom) is written to ``policy.json`` with a format version and a content hash. The
train stage rebuilds the transform from that file, so a model's MLflow run names exactly the policy it saw.
Augmented tiles are never written to disk: every epoch draws new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from torchvision.transforms import v2

from bonetumor.config import AugmentConfig, Config, PreprocessConfig, save_resolved
from bonetumor.errors import ArtifactError
from bonetumor.manifest import read_manifest, resolve_paths
from bonetumor.preprocess import decode_image, tensor_tail
from bonetumor.utils import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

POLICY_FORMAT_VERSION = 1
POLICY_FILE = "policy.json"
PREVIEW_FILE = "preview.png"
#: Rotation leaves corners outside the tile; fill them with white, the colour of empty glass in H&E slides.
ROTATION_FILL = (255, 255, 255)


@dataclass(frozen=True)
class AugmentPolicy:
    """The augmentation applied to training tiles, in order: rotation, flips, zoom.

    Attributes:
        rotation_degrees: Uniform random rotation in +/- this many degrees.
        hflip_p: Probability of a horizontal flip.
        vflip_p: Probability of a vertical flip.
        zoom_max: Largest zoom; a random square crop of at least ``1/zoom_max`` of the side is resized back.
    """

    rotation_degrees: float
    hflip_p: float
    vflip_p: float
    zoom_max: float

    @classmethod
    def from_config(cls, config: AugmentConfig) -> AugmentPolicy:
        """Take the policy fields from the augment section of params.yaml."""
        return cls(config.rotation_degrees, config.hflip_p, config.vflip_p, config.zoom_max)

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
        ArtifactError: The file is missing, half-written, of another format version, or lacks fields.
    """
    document = read_json(path, "augmentation policy")
    if not isinstance(document, dict) or document.get("format_version") != POLICY_FORMAT_VERSION:
        raise ArtifactError(f"{path}: not an augmentation policy of format version {POLICY_FORMAT_VERSION}")
    try:
        policy = AugmentPolicy(**document["policy"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(
            f"{path}: malformed policy ({exc}); expected fields {list(AugmentPolicy.__annotations__)}"
        ) from exc
    if policy.digest() != document.get("digest"):
        raise ArtifactError(
            f"{path}: policy digest does not match its fields; the file was edited by hand or is corrupt"
        )
    return policy


def augmentation_ops(policy: AugmentPolicy, image_size: int) -> list[v2.Transform]:
    """Return the random steps of the policy; the last one (zoom) also brings the tile to ``image_size``."""
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


def build_train_transform(preprocess: PreprocessConfig, policy: AugmentPolicy) -> v2.Compose:
    """Return the training transform: the policy's random steps, then the shared resize-and-normalise tail."""
    return v2.Compose(augmentation_ops(policy, preprocess.image_size) + tensor_tail(preprocess))


def render_preview(
    manifest: pd.DataFrame,
    manifest_dir: str | Path,
    policy: AugmentPolicy,
    preprocess: PreprocessConfig,
    config: AugmentConfig,
    out_png: str | Path,
) -> Path:
    """Draw a grid: each row one real tile (original, then ``preview_samples`` augmented versions).

    Tiles are chosen round-robin over the classes, with the augment seed, so the grid shows every class.

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
    torch.manual_seed(config.seed)
    ops = v2.Compose(augmentation_ops(policy, preprocess.image_size))
    original = v2.Resize((preprocess.image_size, preprocess.image_size), antialias=True)
    cols = config.preview_samples + 1
    # matplotlib's object API, not pyplot: no global backend or figure state, safe in servers and threads.
    fig = Figure(figsize=(1.6 * cols, 1.6 * len(files)))
    axes = fig.subplots(len(files), cols, squeeze=False)
    for row, (index, file) in enumerate(zip(chosen, files, strict=True)):
        image = decode_image(file)
        views = [original(image)] + [ops(image) for _ in range(config.preview_samples)]
        for col, view in enumerate(views):
            axis = axes[row][col]
            axis.imshow(view)
            axis.set_xticks([])
            axis.set_yticks([])
            if col == 0:
                axis.set_ylabel(str(manifest.at[index, "label"]), fontsize=7)
            if row == 0:
                axis.set_title("original" if col == 0 else f"augmented {col}", fontsize=7)
    fig.suptitle(f"Augmentation policy {policy.digest()}: {describe(policy)}", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def describe(policy: AugmentPolicy) -> str:
    """Return a one-line human description of a policy."""
    return (
        f"rotation +/-{policy.rotation_degrees:g} deg, hflip p={policy.hflip_p:g}, "
        f"vflip p={policy.vflip_p:g}, zoom up to {policy.zoom_max:g}x"
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
