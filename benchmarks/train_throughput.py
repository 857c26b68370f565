"""Training throughput of the real loop against a bare forward+backward loop, per architecture and input size.

Prints images/s of :func:`bonetumor.engine.fit` (JPEG decode, augmentation, preprocessing, loss, Adam) and of a
bare loop over tensors already in memory on the device (forward, cross-entropy, backward, Adam step), and their
ratio: the overhead of our loop. Tiles are generated (random 256 px JPEGs): this measures speed, not accuracy.

Usage::

    python -m benchmarks.train_throughput [--archs resnet50 vgg19] [--sizes 128 224] [--images 32]
        [--batch-size 16] [--device auto] [--threads 0] [--workers 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from bonetumor.augment import AugmentPolicy
from bonetumor.config import Config
from bonetumor.datasets import TileDataset
from bonetumor.engine import fit, select_device, training_dataset
from bonetumor.models import build_model


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
    """Images per second of one epoch of :func:`fit` (after a warm-up epoch), without validation."""
    model = build_model(arch, 3)
    fit(model, dataset, None, config.train, device, 1, "warm-up")
    _sync(device)
    start = time.perf_counter()
    fit(model, dataset, None, config.train, device, 1, "timed")
    _sync(device)
    return len(dataset) / (time.perf_counter() - start)


def bare_throughput(arch: str, size: int, images: int, batch_size: int, device: torch.device) -> float:
    """Images per second of forward + cross-entropy + backward + Adam on in-memory tensors."""
    model = build_model(arch, 3).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, 3, (batch_size,), device=device)
    steps = max(1, images // batch_size)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one line per architecture and size."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vgg19"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--images", type=int, default=32, help="images per timed epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding tiles (train.num_workers)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; {args.images} images per epoch, batch {args.batch_size}, "
        f"{args.workers} loader workers"
    )
    print(f"{'arch':<10} {'size':>5} {'loop img/s':>11} {'bare img/s':>11} {'loop/bare':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_tiles(Path(tmp), args.images)
        for arch in args.archs:
            for size in args.sizes:
                config = Config.from_dict(
                    {
                        "preprocess": {"image_size": size},
                        "train": {"batch_size": args.batch_size, "device": args.device},
                    }
                )
                policy = AugmentPolicy.from_config(config.augment)
                table = {"file": files, "label": [config.data.classes[i % 3] for i in range(len(files))]}
                dataset = training_dataset(pd.DataFrame(table), config, policy)
                ours = loop_throughput(dataset, config, arch, device)
                bare = bare_throughput(arch, size, args.images, args.batch_size, device)
                print(f"{arch:<10} {size:>5} {ours:>11.1f} {bare:>11.1f} {ours / bare:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
