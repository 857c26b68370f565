"""Balance: a small conditional GAN per training set fills under-represented classes with synthetic tiles.

For each fold, the GAN is trained on that fold's training tiles only (never on its validation tiles), then
generates tiles of each class that falls short of ``target_ratio`` times the largest class. The fold's training
manifest lists real and synthetic tiles, the latter with ``synthetic = True``; validation sets never contain
synthetic tiles. The ``full`` training set (all tiles, for the final refit) is balanced the same way.

The GAN is a compact conditional DCGAN (class embedding times noise into the generator, one-hot class planes
into the discriminator) trained with the non-saturating loss, one-sided label smoothing and class-balanced
batches, so minority classes get as much signal as the majority.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torch.nn import functional as F

from bonetumor.config import BalanceConfig, Config, save_resolved
from bonetumor.data.datasets import FULL_SET, TRAIN_MANIFEST, label_indices, split_tables, training_set_names
from bonetumor.data.manifest import read_manifest, resolve_paths, write_manifest
from bonetumor.data.split import development_rows, read_folds
from bonetumor.errors import ArtifactError, ConfigError, DatasetError
from bonetumor.transforms.decode import decode_image
from bonetumor.utils import EtaTimer, atomic_dir, read_json, seed_everything, sha256_file, write_json

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
#: Each set's grid of generated tiles, and the folder holding a copy of every set's grid (for `dvc plots`).
SAMPLES_FILE, SAMPLES_DIR = "gan_samples.png", "gan_samples"


class Generator(nn.Module):
    """Noise and class to an RGB tile in [-1, 1]: a linear projection to 4x4, then upsampling blocks."""

    def __init__(self, latent_dim: int, num_classes: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        n_up = int(math.log2(image_size)) - 2
        channels = [width * 2 ** (n_up - i) for i in range(n_up + 1)]
        self.start_channels = channels[0]
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.project = nn.Sequential(
            nn.Linear(latent_dim, channels[0] * 16), nn.BatchNorm1d(channels[0] * 16), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            blocks += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
        blocks += [nn.Conv2d(channels[-1], 3, 3, padding=1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Generate one tile per (noise vector, class index) pair."""
        h = self.project(z * self.embed(labels))
        return self.blocks(h.view(-1, self.start_channels, 4, 4))


class Discriminator(nn.Module):
    """RGB tile plus one-hot class planes to a real/fake logit."""

    def __init__(self, num_classes: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        self.num_classes = num_classes
        n_down = int(math.log2(image_size)) - 2
        layers: list[nn.Module] = []
        c_in = 3 + num_classes
        for i in range(n_down):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * 16, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return one real-vs-fake logit per (tile, class index) pair."""
        planes = F.one_hot(labels, self.num_classes).float()[:, :, None, None]
        planes = planes.expand(-1, -1, images.shape[2], images.shape[3])
        return self.head(self.features(torch.cat([images, planes], dim=1)).flatten(1)).squeeze(1)


@dataclass
class GanResult:
    """A trained generator and its last losses."""

    generator: Generator
    d_loss: float
    g_loss: float
    steps: int


def load_gan_images(files: Sequence[Path], image_size: int) -> torch.Tensor:
    """Decode tiles and resize them to the GAN size, scaled to [-1, 1] (N, 3, S, S)."""
    arrays = [
        np.asarray(decode_image(f).resize((image_size, image_size), Image.Resampling.LANCZOS), dtype=np.float32)
        for f in files
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _random_dihedral(batch: torch.Tensor) -> torch.Tensor:
    # Tissue has no orientation: random flips and right-angle rotations stretch a tiny training set for free.
    if torch.rand(()) < 0.5:
        batch = batch.flip(3)
    return torch.rot90(batch, int(torch.randint(0, 4, ())), dims=(2, 3))


def train_gan(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: BalanceConfig, name: str = ""
) -> GanResult:
    """Train a conditional GAN on tiles of several classes.

    Args:
        images: Tiles in [-1, 1], shape (N, 3, S, S) with S = ``config.image_size``.
        labels: Class index of each tile.
        num_classes: Number of classes the generator can be asked for.
        config: GAN size, steps, batch size, learning rate and seed.
        name: Training set name for progress messages.

    Returns:
        The generator (in eval mode) and its final losses.
    """
    seed_everything(config.seed)
    generator = Generator(config.latent_dim, num_classes, config.image_size)
    discriminator = Discriminator(num_classes, config.image_size)
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(0.5, 0.999))
    present = sorted(set(labels.tolist()))
    by_class = {c: torch.nonzero(labels == c).flatten() for c in present}
    timer = EtaTimer(config.steps)
    for step in range(1, config.steps + 1):
        # Class-balanced batch: draw a class uniformly, then a tile of that class.
        classes = torch.tensor(present)[torch.randint(len(present), (config.batch_size,))]
        picks = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), ())] for c in classes])
        real = _random_dihedral(images[picks])
        z = torch.randn(config.batch_size, config.latent_dim)
        fake = generator(z, classes)

        opt_d.zero_grad()
        d_loss = F.binary_cross_entropy_with_logits(
            discriminator(real, classes), torch.full((config.batch_size,), 0.9)
        ) + F.binary_cross_entropy_with_logits(discriminator(fake.detach(), classes), torch.zeros(config.batch_size))
        d_loss.backward()
        opt_d.step()

        opt_g.zero_grad()
        g_loss = F.binary_cross_entropy_with_logits(discriminator(fake, classes), torch.ones(config.batch_size))
        g_loss.backward()
        opt_g.step()
        timer.step()
        if step % max(config.steps // 4, 1) == 0 or step == config.steps:
            log.info(
                "GAN %s step %d/%d d_loss=%.3f g_loss=%.3f (ETA %s)",
                name,
                step,
                config.steps,
                d_loss.item(),
                g_loss.item(),
                timer.eta(),
            )
    generator.eval()
    return GanResult(generator, float(d_loss.item()), float(g_loss.item()), config.steps)


@torch.no_grad()
def generate(generator: Generator, label: int, count: int, latent_dim: int, seed: int) -> np.ndarray:
    """Generate ``count`` tiles of one class as uint8 arrays (count, S, S, 3)."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(count, latent_dim, generator=rng)
    images = generator(z, torch.full((count,), label, dtype=torch.long))
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def deficits(counts: dict[str, int], target_ratio: float) -> dict[str, int]:
    """Return how many synthetic tiles each class needs to reach ``target_ratio`` times the largest class.

    Classes with no real tile get none: a GAN cannot learn a class it never saw.
    """
    target = math.ceil(target_ratio * max(counts.values(), default=0))
    return {label: (max(0, target - n) if n > 0 else 0) for label, n in counts.items()}


def balance_training_set(
    train_rows: pd.DataFrame,
    dataset_dir: str | Path,
    classes: Sequence[str],
    config: BalanceConfig,
    out_dir: str | Path,
    name: str,
    seed_offset: int = 0,
) -> dict[str, Any]:
    """Balance one training set and write its training manifest (real plus synthetic rows) into ``out_dir``.

    Args:
        train_rows: The real training tiles (manifest rows; paths relative to ``dataset_dir``).
        dataset_dir: The data set manifest's folder.
        classes: Class order.
        config: The balance section of params.yaml.
        out_dir: This training set's folder; synthetic tiles go to ``synthetic/<class>/``.
        name: Training set name (``fold-<k>`` or ``full``), for logs and the summary.
        seed_offset: Added to ``config.seed`` so each training set draws different noise.

    Returns:
        A summary: counts before and after, tiles generated per class, and GAN losses.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if train_rows.empty:
        raise DatasetError(f"training set {name} is empty; nothing to train or balance")
    counts_series = train_rows["label"].value_counts()
    counts = {c: int(counts_series.get(c, 0)) for c in classes}
    needed = deficits(counts, config.target_ratio) if config.enabled else dict.fromkeys(classes, 0)
    skipped = [c for c, n in counts.items() if n == 0]
    if skipped and config.enabled:
        log.warning("%s: no real tiles of %s, so the GAN cannot generate them", name, skipped)
    summary: dict[str, Any] = {
        "counts_before": counts,
        "generated": needed,
        "classes_without_tiles": skipped,
        "gan": None,
    }
    real = train_rows.assign(synthetic=False)
    rows: list[dict[str, Any]] = []
    if sum(needed.values()) > 0:
        images = load_gan_images(resolve_paths(train_rows, dataset_dir), config.image_size)
        labels = torch.tensor(label_indices(train_rows["label"], classes))
        result = train_gan(images, labels, len(classes), config, name=name)
        summary["gan"] = {"steps": result.steps, "final_d_loss": result.d_loss, "final_g_loss": result.g_loss}
        for index, label in enumerate(classes):
            if needed[label] == 0:
                continue
            tiles = generate(
                result.generator, index, needed[label], config.latent_dim, config.seed + seed_offset + index
            )
            folder = out_dir / "synthetic" / label
            folder.mkdir(parents=True, exist_ok=True)
            for i, tile in enumerate(tiles):
                file = folder / f"synthetic-{name}-{label}-{i:04d}.png"
                Image.fromarray(tile, mode="RGB").save(file)
                rows.append(
                    {
                        "path": file.relative_to(out_dir).as_posix(),
                        "label": label,
                        "case": "synthetic",
                        "slide": f"synthetic-{name}",
                        "sha256": sha256_file(file),
                        "width": config.image_size,
                        "height": config.image_size,
                        "synthetic": True,
                    }
                )
        render_samples(out_dir / "synthetic", classes, out_dir / SAMPLES_FILE, title=f"GAN tiles, {name}")
    table = pd.concat([real, pd.DataFrame(rows)], ignore_index=True) if rows else real
    write_manifest(table, out_dir / TRAIN_MANIFEST)
    after = table["label"].value_counts()
    summary["counts_after"] = {c: int(after.get(c, 0)) for c in classes}
    log.info("%s: %s -> %s", name, counts, summary["counts_after"])
    return summary


def render_samples(synthetic_dir: Path, classes: Sequence[str], out_png: Path, title: str, per_class: int = 8) -> Path:
    """Draw up to ``per_class`` generated tiles of each class in a row, for a quick visual check."""
    rows = [(c, sorted((synthetic_dir / c).glob("*.png"))[:per_class]) for c in classes if (synthetic_dir / c).is_dir()]
    fig = Figure(figsize=(1.2 * per_class, 1.3 * max(len(rows), 1)))
    axes = fig.subplots(max(len(rows), 1), per_class, squeeze=False)
    for r, (label, files) in enumerate(rows):
        for c in range(per_class):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c < len(files):
                axis.imshow(Image.open(files[c]).convert("RGB"))
            if c == 0:
                axis.set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png


def run_balance(
    config: Config,
    manifest_path: str | Path,
    folds_path: str | Path,
    out_dir: str | Path,
    sets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The balance stage: one balanced training manifest per fold, plus ``full`` for the refit.

    ``full`` holds every tile outside the held-out test set.

    Writes ``<out_dir>/<set>/train_manifest.csv``, ``<out_dir>/<set>/synthetic/`` and ``<out_dir>/summary.json``.
    Each GAN sees only its own training set's tiles.

    Args:
        config: The whole config.
        manifest_path: The data set manifest.
        folds_path: The folds file.
        out_dir: Output folder.
        sets: The training sets to balance (default: every fold's and ``full``). A Kubeflow run balances each set
            in its own task; a set's tiles and seed are the same whichever sets are balanced with it.

    Raises:
        ConfigError: ``sets`` names a training set the folds file does not have.
    """
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    folds = read_folds(folds_path, manifest, manifest_path)
    every = training_set_names(len(folds["folds"]))
    unknown = [name for name in sets or () if name not in every]
    if unknown:
        raise ConfigError(f"balance: unknown training set(s) {unknown}; expected some of {every} ({folds_path})")
    names = [name for name in every if sets is None or name in sets]
    summary: dict[str, Any] = {
        "target_ratio": config.balance.target_ratio,
        "enabled": config.balance.enabled,
        "sets": {},
    }
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "balance"))
        for name in names:
            # The seed offset is the set's place among all sets, so a set balanced alone draws the same tiles.
            offset = every.index(name)
            rows = (
                development_rows(manifest, folds)
                if name == FULL_SET
                else split_tables(manifest, folds, int(name.split("-")[1]))[0]
            )
            summary["sets"][name] = balance_training_set(
                rows,
                manifest_path.parent,
                config.data.classes,
                config.balance,
                tmp / name,
                name,
                seed_offset=1000 * offset,
            )
        # One folder of every set's sample sheet, for `dvc plots show` (dvc.yaml's top-level plots): a folder that
        # exists, empty when nothing was generated, because DVC warns about a listed path that is missing.
        sheets = tmp / SAMPLES_DIR
        sheets.mkdir()
        for name in names:
            if (tmp / name / SAMPLES_FILE).is_file():
                shutil.copyfile(tmp / name / SAMPLES_FILE, sheets / f"{name}.png")
        write_json(tmp / SUMMARY_FILE, summary)
    return summary


def merge_balance_outputs(config: Config, balance_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """Merge balance outputs of distinct training sets into one, laid out as :func:`run_balance` writes it.

    Args:
        config: The whole config (its resolved ``data`` and ``balance`` sections are saved beside the output).
        balance_dirs: :func:`run_balance` outputs, each of some training sets.
        out_dir: Output folder.

    Returns:
        The merged ``summary.json``.

    Raises:
        ArtifactError: An output lacks its summary, or two outputs hold the same training set.
    """
    summary: dict[str, Any] = {"target_ratio": None, "enabled": None, "sets": {}}
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "balance"))
        (tmp / SAMPLES_DIR).mkdir()
        for folder in map(Path, balance_dirs):
            part = read_json(folder / SUMMARY_FILE, "balance summary")
            summary["target_ratio"], summary["enabled"] = part["target_ratio"], part["enabled"]
            for name, info in part["sets"].items():
                if name in summary["sets"]:
                    raise ArtifactError(f"training set {name} is in two balance outputs ({folder}); expected each once")
                summary["sets"][name] = info
                shutil.copytree(folder / name, tmp / name)
                if (folder / SAMPLES_DIR / f"{name}.png").is_file():
                    shutil.copyfile(folder / SAMPLES_DIR / f"{name}.png", tmp / SAMPLES_DIR / f"{name}.png")
        summary["sets"] = dict(sorted(summary["sets"].items()))
        write_json(tmp / SUMMARY_FILE, summary)
    return summary
