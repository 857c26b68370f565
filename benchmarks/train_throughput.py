"""Training throughput of the real loop against a bare forward+backward loop, per architecture and input size.

Prints images/s of :func:`bonetumor.training.engine.fit` (JPEG decode, augmentation, preprocessing, loss, AdamW) and of
a bare loop over tensors already in memory on the device (forward, cross-entropy, backward, Adam step), and their
ratio: the overhead of our loop. Tiles are generated (random 256 px JPEGs): this measures speed, not accuracy.

``--channels-last off on`` measures each memory format (``train.channels_last``; ``auto`` is what the engine
picks for the arch and device). The bare column is the median over ``--repeats`` rounds that alternate the order
of the formats, so that drifting load from other processes on a shared machine hits every format alike.

Usage::

    python -m benchmarks.train_throughput [--archs resnet50 vgg19] [--sizes 128 224] [--images 32]
        [--batch-size 16] [--device auto] [--threads 0] [--workers 0] [--channels-last off on] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from bonetumor.config import Config
from bonetumor.data.datasets import TileDataset
from bonetumor.training.engine import channels_last_enabled, fit, select_device, training_dataset
from bonetumor.training.models import build_model
from bonetumor.transforms.augment import AugmentPolicy
from bonetumor.transforms.stain import fit_from_files


def make_tiles(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` random 256 px RGB JPEG tiles and return their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"tile-{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loop_throughput(dataset: TileDataset, config: Config, arch: str, device: torch.device) -> float:
    """Images per second of :func:`fit` over as many steps as one pass of ``dataset`` (after a warm-up step)."""
    model = build_model(arch, 3)
    fit(model, dataset, None, config.train, device, 1, "warm-up", arch=arch)
    _sync(device)
    steps = max(1, len(dataset) // config.train.batch_size)
    start = time.perf_counter()
    fit(model, dataset, None, config.train, device, steps, "timed", arch=arch)
    _sync(device)
    return steps * config.train.batch_size / (time.perf_counter() - start)


def bare_throughput(
    arch: str,
    size: int,
    images: int,
    batch_size: int,
    device: torch.device,
    channels_last: Sequence[bool] = (False,),
    repeats: int = 1,
) -> list[float]:
    """Images per second of forward + cross-entropy + backward + Adam on in-memory tensors, per memory format.

    Each of ``repeats`` rounds builds a fresh model per entry of ``channels_last``, warms it up and times
    ``images`` images; the order of the formats alternates between rounds (ABBA), and each format's rate is its
    median over the rounds. Formats run one after the other, never interleaved: two live models stepped in turn
    ran 4-5x slower on this 2-core CPU, whatever their formats (cause not pinned down).
    """
    steps = max(1, images // batch_size)
    y = torch.randint(0, 3, (batch_size,), device=device)
    rates: list[list[float]] = [[] for _ in channels_last]
    for round_ in range(repeats):
        order = list(enumerate(channels_last))
        for i, nhwc in order if round_ % 2 == 0 else reversed(order):
            memory_format = torch.channels_last if nhwc else torch.contiguous_format
            torch.manual_seed(0)
            model = build_model(arch, 3).to(device).to(memory_format=memory_format).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)

            def step(
                model: nn.Module = model, optimizer: torch.optim.Optimizer = optimizer, x: torch.Tensor = x
            ) -> None:
                optimizer.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()

            step()  # warm-up
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            rates[i].append(steps * batch_size / (time.perf_counter() - start))
            del model, optimizer, x, step
    return [statistics.median(r) for r in rates]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one line per architecture and size."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vgg19"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 128, 224], help="input crop sides")
    parser.add_argument("--images", type=int, default=32, help="images per timed epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding tiles (train.num_workers)")
    parser.add_argument(
        "--channels-last",
        nargs="+",
        default=["off"],
        choices=["off", "on", "auto"],
        help="memory formats to measure (train.channels_last)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the bare loop (median reported)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; {args.images} images per epoch, batch {args.batch_size}, "
        f"{args.workers} loader workers"
    )
    print(f"{'arch':<10} {'size':>5} {'ch-last':>8} {'loop img/s':>11} {'bare img/s':>11} {'loop/bare':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_tiles(Path(tmp), args.images)
        for arch in args.archs:
            for size in args.sizes:
                formats = [channels_last_enabled(setting, device, arch) for setting in args.channels_last]
                bare = bare_throughput(arch, size, args.images, args.batch_size, device, formats, max(1, args.repeats))
                for setting, nhwc, bare_rate in zip(args.channels_last, formats, bare, strict=True):
                    config = Config.from_dict(
                        {
                            "preprocess": {"tile_size": size, "input_size": size},
                            "train": {
                                "batch_size": args.batch_size,
                                "device": args.device,
                                "channels_last": setting,
                                "progress": False,
                                "checkpoint": False,
                                "eval_every": 1000,
                                "weights": "none",
                            },
                        }
                    )
                    policy = AugmentPolicy.from_config(config.augment)
                    table = {"file": files, "label": [config.data.classes[i % 3] for i in range(len(files))]}
                    # The whole training transform, stain normalisation (fitted once, as per fold) included.
                    stain = fit_from_files(policy.stain_normalization, files, seed=0)
                    dataset = training_dataset(pd.DataFrame(table), config, policy, stain=stain)
                    ours = loop_throughput(dataset, config, arch, device)
                    label = f"{setting}={'on' if nhwc else 'off'}" if setting == "auto" else setting
                    print(
                        f"{arch:<10} {size:>5} {label:>8} {ours:>11.1f} {bare_rate:>11.1f} {ours / bare_rate:>10.2f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
