"""Balance: a small conditional GAN per training set fills under-represented classes with synthetic tiles.

For each fold, the GAN is trained on that fold's training tiles only (never on its validation tiles), then
generates tiles of each class that falls short of ``target_ratio`` times the largest class. The fold's training
manifest lists real and synthetic tiles, the latter with ``synthetic = True``; validation sets never contain
synthetic tiles. The ``full`` training set (all tiles, for the final refit) is balanced the same way.

The GAN (:mod:`bonetumor.balance.networks`) is built for a few dozen tiles per class: a generator with
class-conditional batch norm, a projection discriminator with spectral norm, the hinge loss, differentiable
augmentation of every tile the discriminator sees (:mod:`bonetumor.balance.diffaugment`), class-balanced batches,
and tiles sampled from a moving average of the generator's weights. Its training is checkpointed and resumes.

Every set's GAN gets a quality report (:mod:`bonetumor.balance.quality`): a sheet of real and generated tiles per
class, KID against its real-vs-real floor, a real-vs-synthetic two-sample classifier, and a memorisation check.
Every synthetic tile records the generator's MLflow run, its training set, seed and index, and its class, in its
manifest row and in its PNG's text chunks. Whether training uses the tiles is the gate's call
(:mod:`bonetumor.balance.ablation`): the quality report must pass and the ablation must not show them hurting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from bonetumor.balance.diffaugment import diff_augment, parse_policy
from bonetumor.balance.networks import Discriminator, Generator
from bonetumor.balance.quality import QualityReport, quality_report, render_closest_pairs, render_sample_grid
from bonetumor.config import BalanceConfig, Config, save_resolved
from bonetumor.data.datasets import (
    DECISION_FILE,
    FULL_SET,
    TRAIN_MANIFEST,
    label_indices,
    split_tables,
    training_set_names,
)
from bonetumor.data.manifest import read_manifest, resolve_paths, write_manifest
from bonetumor.data.split import development_rows, read_folds
from bonetumor.errors import ArtifactError, ConfigError, DatasetError
from bonetumor.faults import fault_point
from bonetumor.training.checkpoint import read_checkpoint, restore_rng, rng_state, write_checkpoint
from bonetumor.transforms.decode import decode_image
from bonetumor.utils import EtaTimer, atomic_dir, read_json, seed_everything, sha256_file, write_json

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
#: Each set's sheet of real and generated tiles, and the folder holding a copy of every set's figures (`dvc plots`).
SAMPLES_FILE, SAMPLES_DIR = "gan_samples.png", "gan_samples"
#: Each set's closest (synthetic, real) pairs, loss curves and quality report.
CLOSEST_FILE, LOSSES_FILE, QUALITY_FILE = "gan_closest_pairs.png", "gan_losses.png", "quality.json"
#: Tags of a GAN's MLflow run: the stage, the training set, the quality verdict.
STAGE_TAG, SET_TAG, QUALITY_TAG = "bonetumor.stage", "bonetumor.training_set", "bonetumor.gan.quality"


@dataclass
class GanResult:
    """A trained generator (the moving average of the generator's weights) and how its training went.

    Attributes:
        generator: The EMA generator, in eval mode: it makes every synthetic tile.
        d_loss: Last hinge loss of the discriminator.
        g_loss: Last loss of the generator.
        steps: Optimisation steps trained.
        resumed_from: The step its training resumed after (0 = from scratch).
        seconds: Wall time of this process's share of the training.
        history: ``{"step", "d_loss", "g_loss", "d_real", "d_fake"}`` every :data:`HISTORY_EVERY` steps.
    """

    generator: Generator
    d_loss: float
    g_loss: float
    steps: int
    resumed_from: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


#: Steps between two entries of :attr:`GanResult.history` (the loss curves).
HISTORY_EVERY = 10
#: File of a training set's GAN checkpoint inside its checkpoint folder.
GAN_CHECKPOINT = "gan.pt"
#: Bump when the checkpoint content changes; an older checkpoint is then ignored (the GAN trains from scratch).
GAN_CHECKPOINT_FORMAT = 1


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


def gan_fingerprint(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: BalanceConfig, seed: int
) -> str:
    """Return the key a GAN checkpoint must carry to be resumed: the tiles, labels, settings and seed."""
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().numpy().tobytes())
    digest.update(labels.detach().cpu().numpy().astype(np.int64).tobytes())
    training = {
        key: value
        for key, value in dataclasses.asdict(config).items()
        if key not in ("enabled", "gate", "target_ratio", "checkpoint_every", "device", "quality", "ablation")
    }
    payload = {"format": GAN_CHECKPOINT_FORMAT, "classes": num_classes, "seed": seed, "config": training}
    digest.update(json.dumps(payload, sort_keys=True).encode())
    return digest.hexdigest()


def train_gan(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: BalanceConfig,
    name: str = "",
    *,
    seed: int | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> GanResult:
    """Train a conditional GAN on tiles of several classes (hinge loss, DiffAugment, spectral norm, EMA).

    Each step draws a class-balanced batch (a class uniformly, then one of its tiles, randomly flipped and
    rotated), so the minority classes get as much signal as the majority. The discriminator takes one step on
    augmented real and generated tiles with the hinge loss; the generator one step against it; the moving average
    of the generator's weights is then updated (``ema_decay``). With ``checkpoint_dir`` the whole state (networks,
    optimisers, average and every random generator) is written every ``checkpoint_every`` steps, and a training
    killed in between resumes after the last checkpoint to the same result as an uninterrupted one.

    Args:
        images: Tiles in [-1, 1], shape (N, 3, S, S) with S = ``config.image_size``.
        labels: Class index of each tile.
        num_classes: Number of classes the generator can be asked for.
        config: The balance section (networks, steps, batch, learning rates, EMA, augmentations, seed).
        name: Training set name for progress lines.
        seed: Seed of initialisation and training (default ``config.seed``).
        checkpoint_dir: Folder of this training's checkpoint, or None (no checkpoints).
        progress: Show a progress bar on stderr.

    Returns:
        The EMA generator (in eval mode), its last losses, and the loss history.

    Raises:
        DatasetError: Fewer than 2 tiles, or images and labels of different lengths.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != config.image_size:
        raise DatasetError(
            f"GAN {name}: tiles of shape {tuple(images.shape)}; expected (N, 3, {config.image_size}, "
            f"{config.image_size}) for balance.image_size {config.image_size}"
        )
    if len(images) != len(labels) or len(images) < 2:
        raise DatasetError(f"GAN {name}: {len(images)} tiles and {len(labels)} labels; expected as many, 2 or more")
    seed = config.seed if seed is None else seed
    seed_everything(seed)
    device = _device(config.device)
    state = _GanState(config, num_classes, device)
    fingerprint = gan_fingerprint(images, labels, num_classes, config, seed)
    path = None if checkpoint_dir is None or config.checkpoint_every == 0 else Path(checkpoint_dir) / GAN_CHECKPOINT
    saved = None if path is None else read_checkpoint(path, fingerprint, f"GAN {name}")
    if saved is not None:
        state.restore(saved)
        log.info("GAN %s: resuming after step %d from checkpoint %s", name, state.step, path)
    resumed_from, started = state.step, time.monotonic()
    present = sorted(set(labels.tolist()))
    by_class = {c: torch.nonzero(labels == c).flatten() for c in present}
    images = images.to(device)
    bar = tqdm(
        total=config.steps,
        initial=state.step,
        desc=f"GAN {name}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    timer = EtaTimer(config.steps - state.step)
    with bar, logging_redirect_tqdm() if progress else contextlib.nullcontext():
        for step in range(state.step + 1, config.steps + 1):
            fault_point("gan-step")
            classes = torch.tensor(present)[torch.randint(len(present), (config.batch_size,))]
            picks = torch.stack([by_class[int(c)][torch.randint(len(by_class[int(c)]), ())] for c in classes])
            losses = state.train_step(_random_dihedral(images[picks.to(device)]), classes.to(device))
            timer.step()
            bar.update(1)
            if step % HISTORY_EVERY == 0 or step == config.steps:
                state.history.append({"step": float(step), **losses})
                bar.set_postfix(d_loss=f"{losses['d_loss']:.3f}", g_loss=f"{losses['g_loss']:.3f}")
            if step % max(config.steps // 4, 1) == 0 or step == config.steps:
                log.info(
                    "GAN %s step %d/%d d_loss=%.3f g_loss=%.3f (ETA %s)",
                    name,
                    step,
                    config.steps,
                    losses["d_loss"],
                    losses["g_loss"],
                    timer.eta(),
                )
            if path is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                write_checkpoint(path, {"fingerprint": fingerprint, **state.save()})
    last = state.history[-1] if state.history else {"d_loss": math.nan, "g_loss": math.nan}
    return GanResult(
        state.averaged(),
        float(last["d_loss"]),
        float(last["g_loss"]),
        config.steps,
        resumed_from=resumed_from,
        seconds=time.monotonic() - started,
        history=state.history,
    )


class _GanState:
    """The networks, optimisers and moving average of one GAN training, its step and loss history."""

    def __init__(self, config: BalanceConfig, num_classes: int, device: torch.device) -> None:
        self.augmentations = parse_policy(config.diffaugment)
        self.latent_dim = config.latent_dim
        self.device = device
        self.generator = Generator(config.latent_dim, num_classes, config.image_size, config.width).to(device)
        self.discriminator = Discriminator(num_classes, config.image_size, config.width).to(device)
        self.ema = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
        # Adam with beta1 = 0 (no momentum), the usual setting of spectrally normalised hinge GANs; the
        # discriminator learns faster than the generator (two time-scale update rule, Heusel et al. 2017).
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=(0.0, 0.99))
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=config.lr * config.d_lr_factor, betas=(0.0, 0.99)
        )
        self.step = 0
        self.history: list[dict[str, float]] = []

    def train_step(self, real: torch.Tensor, classes: torch.Tensor) -> dict[str, float]:
        """One discriminator and one generator step (hinge loss, DiffAugment on both sides), then the average."""
        augment = self.augmentations
        fake = self.generator(torch.randn(len(real), self.latent_dim, device=self.device), classes)
        self.opt_d.zero_grad(set_to_none=True)
        d_real = self.discriminator(diff_augment(real, augment), classes)
        d_fake = self.discriminator(diff_augment(fake.detach(), augment), classes)
        d_loss = F.relu(1.0 - d_real).mean() + F.relu(1.0 + d_fake).mean()
        d_loss.backward()
        self.opt_d.step()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss = -self.discriminator(diff_augment(fake, augment), classes).mean()
        g_loss.backward()
        self.opt_g.step()
        self.ema.update_parameters(self.generator)
        self.step += 1
        return {
            "d_loss": float(d_loss.item()),
            "g_loss": float(g_loss.item()),
            "d_real": float(d_real.mean().item()),
            "d_fake": float(d_fake.mean().item()),
        }

    def save(self) -> dict[str, Any]:
        """The whole state, as a checkpoint holds it (tensors and plain values: ``weights_only`` loads it)."""
        return {
            "step": self.step,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": rng_state(),
            "history": [torch.tensor([row[key] for key in HISTORY_KEYS]) for row in self.history],
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Load a state :meth:`save` returned."""
        self.generator.load_state_dict(saved["generator"])
        self.discriminator.load_state_dict(saved["discriminator"])
        self.ema.load_state_dict(saved["ema"])
        self.opt_g.load_state_dict(saved["opt_g"])
        self.opt_d.load_state_dict(saved["opt_d"])
        restore_rng(saved["rng"])
        self.history = [dict(zip(HISTORY_KEYS, row.tolist(), strict=True)) for row in saved["history"]]
        self.step = int(saved["step"])

    def averaged(self) -> Generator:
        """The moving average of the generator, in eval mode, on the CPU (tiles are generated there)."""
        averaged = self.ema.module
        if not isinstance(averaged, Generator):  # AveragedModel keeps a deep copy of the module it was given
            raise TypeError(f"the moving average holds a {type(averaged).__name__}; expected a Generator")
        return averaged.cpu().eval()


def _device(name: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else the CPU.

    Raises:
        ConfigError: ``cuda`` without a GPU.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("balance.device: cuda, but torch sees no GPU here; expected auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


#: The columns of a loss-history row.
HISTORY_KEYS = ("step", "d_loss", "g_loss", "d_real", "d_fake")


@torch.no_grad()
def generate(generator: Generator, label: int, count: int, latent_dim: int, seed: int) -> np.ndarray:
    """Generate ``count`` tiles of one class as uint8 arrays (count, S, S, 3).

    Tile ``i`` is drawn alone, with every random number it uses (its noise vector and the generator's per-pixel
    noise) from a generator seeded by ``(seed, i)``: the seed, the index and the generator's weights name it, and
    its provenance records all three. The global random state is left as it was.
    """
    tiles = []
    with torch.random.fork_rng(devices=[]):
        for index in range(count):
            torch.manual_seed(seed * 1_000_003 + index)
            z = torch.randn(1, latent_dim)
            tiles.append(generator(z, torch.full((1,), label, dtype=torch.long)))
    images = torch.cat(tiles) if tiles else torch.zeros(0, 3, 1, 1)
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
    *,
    run_id: str = "",
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Balance one training set, report on its GAN, and write its training manifest (real plus synthetic rows).

    Args:
        train_rows: The real training tiles (manifest rows; paths relative to ``dataset_dir``).
        dataset_dir: The data set manifest's folder.
        classes: Class order.
        config: The balance section of params.yaml.
        out_dir: This training set's folder; synthetic tiles go to ``synthetic/<class>/``.
        name: Training set name (``fold-<k>`` or ``full``), for logs and the summary.
        seed_offset: Added to ``config.seed`` so each training set draws different noise.
        run_id: The MLflow run of this set's GAN, recorded in every synthetic tile's manifest row and PNG.
        checkpoint_dir: Folder of the GAN's checkpoint (a killed training resumes), or None.
        progress: Show the GAN's progress bar.

    Returns:
        A summary: counts before and after, tiles generated per class, the GAN's training, its quality report.
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
        "quality": None,
    }
    real = train_rows.assign(synthetic=False)
    rows: list[dict[str, Any]] = []
    if sum(needed.values()) > 0:
        images = load_gan_images(resolve_paths(train_rows, dataset_dir), config.image_size)
        labels = torch.tensor(label_indices(train_rows["label"], classes))
        result = train_gan(
            images,
            labels,
            len(classes),
            config,
            name=name,
            seed=config.seed + seed_offset,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
        summary["gan"] = {
            "run_id": run_id,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "seconds": round(result.seconds, 2),
            "final_d_loss": result.d_loss,
            "final_g_loss": result.g_loss,
            "history": result.history,
        }
        rows = _write_synthetic(result, needed, classes, config, out_dir, name, seed_offset, run_id)
        report = _quality(result, images, labels, train_rows, classes, config, name, seed_offset, out_dir)
        summary["quality"] = report.to_dict()
        plot_losses(result.history, out_dir / LOSSES_FILE, f"GAN losses, {name}")
    table = pd.concat([real, pd.DataFrame(rows)], ignore_index=True) if rows else real
    for column in ("gan_seed", "gan_index"):
        if column in table.columns:  # integers, empty on real rows (not floats, as NaN would make them)
            table[column] = table[column].astype("Int64")
    write_manifest(table, out_dir / TRAIN_MANIFEST)
    after = table["label"].value_counts()
    summary["counts_after"] = {c: int(after.get(c, 0)) for c in classes}
    log.info("%s: %s -> %s", name, counts, summary["counts_after"])
    return summary


def _write_synthetic(
    result: GanResult,
    needed: dict[str, int],
    classes: Sequence[str],
    config: BalanceConfig,
    out_dir: Path,
    name: str,
    seed_offset: int,
    run_id: str,
) -> list[dict[str, Any]]:
    """Generate each class's missing tiles into ``synthetic/<class>/`` and return their manifest rows."""
    rows: list[dict[str, Any]] = []
    for index, label in enumerate(classes):
        if needed[label] == 0:
            continue
        seed = config.seed + seed_offset + index
        tiles = generate(result.generator, index, needed[label], config.latent_dim, seed)
        folder = out_dir / "synthetic" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, tile in enumerate(tiles):
            provenance = {"generator_run_id": run_id, "training_set": name, "gan_seed": seed, "gan_index": i}
            file = folder / f"synthetic-{name}-{label}-{i:04d}.png"
            save_synthetic_png(tile, file, {**provenance, "class": label})
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
                    **provenance,
                }
            )
    return rows


def _quality(
    result: GanResult,
    images: torch.Tensor,
    labels: torch.Tensor,
    train_rows: pd.DataFrame,
    classes: Sequence[str],
    config: BalanceConfig,
    name: str,
    seed_offset: int,
    out_dir: Path,
) -> QualityReport:
    """Generate the report's tiles (``quality.tiles_per_class`` of every class seen), measure and draw them."""
    present = sorted(set(labels.tolist()))
    # Seeds apart from the training tiles' (seed + index): the report judges fresh draws of the same generator.
    drawn = [
        generate(
            result.generator, c, config.quality.tiles_per_class, config.latent_dim, config.seed + seed_offset + 500 + c
        )
        for c in present
    ]
    synthetic = np.concatenate(drawn)
    synthetic_labels = np.repeat(np.asarray(present), config.quality.tiles_per_class)
    real = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    real_labels = labels.numpy()
    report = quality_report(
        real,
        real_labels,
        [str(slide) for slide in train_rows["slide"]],
        synthetic,
        synthetic_labels,
        classes,
        config.quality,
        name,
        seed=config.seed + seed_offset,
    )
    # The sheet's rows are the classes this set has (a class with no real tile has no generator either).
    remap = {c: i for i, c in enumerate(present)}
    render_sample_grid(
        real,
        np.asarray([remap[int(c)] for c in real_labels]),
        synthetic,
        np.asarray([remap[int(c)] for c in synthetic_labels]),
        [classes[c] for c in present],
        out_dir / SAMPLES_FILE,
        title=f"{name}: real and GAN tiles per class ({config.image_size} px, {result.steps} steps)",
        per_class=min(8, config.quality.tiles_per_class),
    )
    render_closest_pairs(report, real, synthetic, out_dir / CLOSEST_FILE)
    write_json(out_dir / QUALITY_FILE, report.to_dict())
    verdict = "passes" if report.passed else "fails: " + "; ".join(report.failures)
    log.info(
        "GAN %s quality: KID %.4f (floor %.4f, ratio %.1f), two-sample accuracy %.2f, near copies %.0f%%; %s",
        name,
        report.kid,
        report.kid_floor,
        report.kid_ratio,
        report.two_sample_accuracy,
        100 * report.memorised_fraction,
        verdict,
    )
    return report


def save_synthetic_png(tile: np.ndarray, path: Path, provenance: dict[str, Any]) -> Path:
    """Write a synthetic tile as PNG with its provenance as text chunks (``bonetumor.<key>``, read by any viewer)."""
    info = PngInfo()
    info.add_text("bonetumor.synthetic", "true")
    for key, value in provenance.items():
        info.add_text(f"bonetumor.{key}", str(value))
    Image.fromarray(tile, mode="RGB").save(path, pnginfo=info)
    return path


def read_png_provenance(path: str | Path) -> dict[str, str]:
    """Return the ``bonetumor.*`` text chunks of a PNG (a synthetic tile's provenance), keys without the prefix."""
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    return {key.removeprefix("bonetumor."): value for key, value in text.items() if key.startswith("bonetumor.")}


def plot_losses(history: Sequence[dict[str, float]], out_png: Path, title: str) -> Path:
    """Draw the discriminator's and the generator's losses over the steps."""
    fig = Figure(figsize=(6, 3))
    axis = fig.subplots()
    steps = [row["step"] for row in history]
    axis.plot(steps, [row["d_loss"] for row in history], label="discriminator (hinge)")
    axis.plot(steps, [row["g_loss"] for row in history], label="generator")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend(fontsize=7)
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png


def run_balance(
    config: Config,
    manifest_path: str | Path,
    folds_path: str | Path,
    out_dir: str | Path,
    sets: Sequence[str] | None = None,
    *,
    project_dir: str | Path,
    decision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The balance stage: one training manifest per fold and for ``full``, each GAN's report, and the gate.

    ``full`` holds every tile outside the held-out test set. Each GAN sees only its own training set's tiles and
    has an MLflow run (``gan-<set>``: settings, losses, quality figures and sheets) whose id every synthetic tile
    records. With every fold's set balanced, the ablation runs on the folds and the gate decides whether training
    uses the synthetic tiles (:func:`bonetumor.balance.ablation.decide`); ``decision.json`` records it.

    Writes ``<out_dir>/<set>/`` (``train_manifest.csv``, ``synthetic/``, ``quality.json`` and figures),
    ``<out_dir>/summary.json``, ``<out_dir>/decision.json`` and ``<out_dir>/gan_samples/``.

    Args:
        config: The whole config.
        manifest_path: The data set manifest.
        folds_path: The folds file.
        out_dir: Output folder.
        sets: The training sets to balance (default: every fold's and ``full``). A Kubeflow run balances each set
            in its own task; a set's tiles and seed are the same whichever sets are balanced with it.
        project_dir: Base folder of a relative tracking URI (and of the GAN checkpoints' MLflow runs).
        decision: The gate's decision to record instead of deciding here: a Kubeflow task balancing ``full`` alone
            gets it from the task that ran the ablation. Without it, the gate decides when every fold's set is here.

    Raises:
        ConfigError: ``sets`` names a training set the folds file does not have.
    """
    from bonetumor.balance.ablation import decide

    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
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
    # Beside the output, not in it: a killed stage keeps them for its rerun, and the output's swap leaves them.
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints"
    tracking = _GanTracking(config, manifest_path, project_dir) if config.balance.enabled else None
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "balance"))

        def balance_set(name: str, balance: BalanceConfig) -> None:
            # The seed offset is the set's place among all sets, so a set balanced alone draws the same tiles.
            offset = every.index(name)
            rows = (
                development_rows(manifest, folds)
                if name == FULL_SET
                else split_tables(manifest, folds, int(name.split("-")[1]))[0]
            )
            with contextlib.ExitStack() as stack:
                run_id = stack.enter_context(tracking.run(name)) if tracking is not None and balance.enabled else ""
                summary["sets"][name] = balance_training_set(
                    rows,
                    manifest_path.parent,
                    config.data.classes,
                    balance,
                    tmp / name,
                    name,
                    seed_offset=1000 * offset,
                    run_id=run_id,
                    checkpoint_dir=checkpoints / name,
                    progress=config.train.progress,
                )
                if run_id:
                    tracking.log(tmp / name, summary["sets"][name])  # type: ignore[union-attr]

        for name in (n for n in names if n != FULL_SET):
            balance_set(name, config.balance)
        write_json(tmp / SUMMARY_FILE, summary)
        if decision is not None:
            write_json(tmp / DECISION_FILE, decision)
        elif all(name in names for name in every if name != FULL_SET):
            decision = decide(config, manifest_path, folds_path, tmp, project_dir=project_dir)
        if FULL_SET in names:
            # The gate decided on the folds: when it refuses their tiles, the refit's set needs no GAN at all.
            refused = decision is not None and not decision["use_synthetic"]
            balance_set(FULL_SET, dataclasses.replace(config.balance, enabled=False) if refused else config.balance)
            if refused and config.balance.enabled:
                summary["sets"][FULL_SET]["skipped"] = "no GAN: the gate refused the folds' GAN tiles"
        _copy_sheets(tmp, names)
        write_json(tmp / SUMMARY_FILE, summary)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return summary


def _copy_sheets(out_dir: Path, names: Sequence[str]) -> None:
    # One folder of every set's sample sheet, for `dvc plots show` (dvc.yaml's top-level plots): a folder that
    # exists, empty when nothing was generated, because DVC warns about a listed path that is missing.
    sheets = out_dir / SAMPLES_DIR
    sheets.mkdir(exist_ok=True)
    if (out_dir / "ablation.png").is_file():
        shutil.copyfile(out_dir / "ablation.png", sheets / "ablation.png")
    for name in names:
        for source, suffix in ((SAMPLES_FILE, ""), (CLOSEST_FILE, "-closest"), (LOSSES_FILE, "-losses")):
            if (out_dir / name / source).is_file():
                shutil.copyfile(out_dir / name / source, sheets / f"{name}{suffix}.png")


class _GanTracking:
    """The MLflow runs of the GANs (``gan-<set>``), in the pipeline's experiment, with its provenance tags."""

    def __init__(self, config: Config, manifest_path: Path, project_dir: str | Path) -> None:
        from bonetumor.registry.tracking import close_interrupted_runs, process_tags, provenance_tags, setup_mlflow

        self.config = config
        self.experiment_id = setup_mlflow(config.tracking, project_dir)
        close_interrupted_runs(self.experiment_id)
        self.tags = {**provenance_tags(config, manifest_path, project_dir), **process_tags(), STAGE_TAG: "balance"}

    @contextlib.contextmanager
    def run(self, name: str) -> Iterator[str]:
        """Open the run of one set's GAN and yield its id."""
        import mlflow

        from bonetumor.registry.tracking import flatten_params

        with mlflow.start_run(run_name=f"gan-{name}", tags={**self.tags, SET_TAG: name}) as run:
            mlflow.log_params(flatten_params(self.config, ("balance",)))
            yield str(run.info.run_id)

    def log(self, set_dir: Path, summary: dict[str, Any]) -> None:
        """Log one set's counts, losses, quality figures and sheets on its open run."""
        import mlflow

        gan = summary.get("gan")
        metrics = {f"generated_{label}": float(n) for label, n in summary["generated"].items()}
        if gan is not None:
            metrics |= {"gan_seconds": float(gan["seconds"]), "gan_resumed_from": float(gan["resumed_from"])}
            for row in gan["history"]:
                mlflow.log_metrics({"d_loss": row["d_loss"], "g_loss": row["g_loss"]}, step=int(row["step"]))
        if summary.get("quality") is not None:
            metrics |= {key: float(value) for key, value in _quality_metrics(summary["quality"]).items()}
            mlflow.set_tag(QUALITY_TAG, "passed" if summary["quality"]["passed"] else "failed")
        mlflow.log_metrics(metrics)
        for file in (SAMPLES_FILE, CLOSEST_FILE, LOSSES_FILE, QUALITY_FILE):
            if (set_dir / file).is_file():
                mlflow.log_artifact(str(set_dir / file), "quality")


def _quality_metrics(quality: dict[str, Any]) -> dict[str, float]:
    keys = ("kid", "kid_std", "kid_floor", "kid_ratio", "two_sample_accuracy", "memorised_fraction")
    found = {f"gan_{key}": float(quality[key]) for key in keys if quality.get(key) is not None}
    return found | {"gan_quality_passed": 1.0 if quality["passed"] else 0.0}


def merge_balance_outputs(
    config: Config,
    balance_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    manifest_path: str | Path,
    folds_path: str | Path,
    project_dir: str | Path,
) -> dict[str, Any]:
    """Merge balance outputs of distinct training sets into one, laid out as :func:`run_balance` writes it.

    With every fold's set merged, the ablation runs and the gate decides (``decision.json``), as in
    :func:`run_balance`.

    Args:
        config: The whole config (its resolved ``data`` and ``balance`` sections are saved beside the output).
        balance_dirs: :func:`run_balance` outputs, each of some training sets.
        out_dir: Output folder.
        manifest_path: The data set manifest.
        folds_path: The folds file.
        project_dir: Base folder of a relative tracking URI (the ablation's MLflow run).

    Returns:
        The merged ``summary.json``, with the gate's ``decision``.

    Raises:
        ArtifactError: An output lacks its summary, or two outputs hold the same training set.
    """
    from bonetumor.balance.ablation import decide

    summary: dict[str, Any] = {"target_ratio": None, "enabled": None, "sets": {}}
    with atomic_dir(out_dir) as tmp:
        save_resolved(config, tmp, ("data", "balance"))
        for folder in map(Path, balance_dirs):
            part = read_json(folder / SUMMARY_FILE, "balance summary")
            summary["target_ratio"], summary["enabled"] = part["target_ratio"], part["enabled"]
            for name, info in part["sets"].items():
                if name in summary["sets"]:
                    raise ArtifactError(f"training set {name} is in two balance outputs ({folder}); expected each once")
                summary["sets"][name] = info
                shutil.copytree(folder / name, tmp / name)
        summary["sets"] = dict(sorted(summary["sets"].items()))
        write_json(tmp / SUMMARY_FILE, summary)
        summary["decision"] = decide(config, manifest_path, folds_path, tmp, project_dir=project_dir)
        _copy_sheets(tmp, list(summary["sets"]))
    return summary
