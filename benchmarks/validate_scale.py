"""Data validation at scale: decode, hashes, tissue fraction and the Great Expectations suites on N tiles.

Generates N synthetic TCIA-named JPEG tiles once into a cache folder (smooth H&E-like pink/purple textures on
white glass, a few near-blank tiles, a few exact and near duplicates), ingests them, then prints the seconds of:
:func:`bonetumor.data.validate.validate_dataset` end to end without Data Docs (decode + suites + report: the figure
the < 60 s goal on 2 cores is about), decoding alone, the suites alone, the suites with Data Docs (so the Data
Docs build alone is the difference), and the vectorised pairwise near-duplicate search alone.

Usage::

    python -m benchmarks.validate_scale [--tiles 10000] [--size 256] [--workers 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from bonetumor.config import Config
from bonetumor.data.ingest import ingest
from bonetumor.data.validate import check_tiles, hamming_pairs, inspect_tiles, validate_dataset
from bonetumor.errors import DataValidationError

CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
#: Stain colours (RGB) tiles are painted with: eosin pink, haematoxylin purple, and a paler pink.
STAINS = np.array([[226, 120, 168], [120, 70, 160], [240, 180, 210]], dtype=np.float32)
GLASS = np.array([245, 245, 245], dtype=np.float32)


def synthetic_tile(seed: int, size: int, blank: bool = False) -> Image.Image:
    """Return an H&E-like tile: tissue where a smooth random field is high, white glass elsewhere."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((int(rng.integers(4, 12)),) * 2).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    threshold = 0.97 if blank else rng.uniform(0.15, 0.5)
    tissue = np.clip((field - threshold) * 6.0, 0.0, 1.0)[..., None]
    mix = rng.dirichlet(np.ones(3)).astype(np.float32)
    texture = rng.normal(0.0, 18.0, (size, size, 1)).astype(np.float32)
    colour = (mix @ STAINS)[None, None, :] + texture
    pixels = GLASS * (1.0 - tissue) + colour * tissue + rng.normal(0.0, 2.0, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def _write(job: tuple[int, str, int, bool]) -> None:
    seed, path, size, blank = job
    synthetic_tile(seed, size, blank).save(path, quality=90)


def make_dataset(folder: Path, count: int, size: int, workers: int) -> Path:
    """Write ``count`` tiles (once: an existing complete folder is reused) and return the class-folder root.

    About 1 % of the tiles are near-blank; the last 0.2 % are copies: half byte-identical (exact duplicates in
    the same class), half re-encoded at JPEG quality 70 (near-duplicates).
    """
    done = folder / ".complete"
    if done.is_file() and done.read_text() == f"{count} {size}":
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for label in CLASSES:
        (folder / label).mkdir(parents=True)
    n_copies = max(2, count // 500)
    jobs, names = [], []
    for index in range(count - n_copies):
        label = CLASSES[index % 3]
        case, slide = 1 + index % 40, index % 97
        name = folder / label / f"Case-{case}-A{slide}-{index * 7 % 50000}-{index}.jpg"
        jobs.append((index, str(name), size, index % 100 == 0))
        names.append(name)
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        list(pool.map(_write, jobs, chunksize=64))
    for copy in range(n_copies):
        source = names[copy * 37 % len(names)]
        target = source.with_name(source.stem.rsplit("-", 1)[0] + f"-{count + copy}.jpg")
        if copy % 2:
            shutil.copyfile(source, target)
        else:
            Image.open(source).save(target, quality=70)
    done.write_text(f"{count} {size}")
    return folder


def _cpu_seconds() -> float:
    # This process and its finished children (the decoding pool is joined before inspect_tiles returns).
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(label: str, step: Callable[[], object], repeats: int = 1, extra: str = "") -> float:
    """Run ``step`` ``repeats`` times; print the fastest wall time and its CPU time (all processes); return it.

    CPU seconds do not grow when other programs share the cores, so they show the real cost on a busy machine.
    """
    best_wall, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        step()
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        if wall < best_wall:
            best_wall, best_cpu = wall, cpu
    print(f"{label:<46} {best_wall:>8.2f} s wall {best_cpu:>8.2f} s CPU {extra}", flush=True)
    return best_wall


def main(argv: list[str] | None = None) -> None:
    """Generate (once) and validate the tiles, printing one line per measured step."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.validate_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="tile side in pixels")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (validate.workers; 0 = cores)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/validate_scale"))
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per step; the fastest is printed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the report's warnings are printed once, at the end
    config = Config.from_dict({"validate": {"workers": args.workers}})
    out = args.out.resolve()
    print(f"{args.tiles} tiles of {args.size} px, {args.workers or os.cpu_count()} workers, {os.cpu_count()} cores")

    images = out / f"tiles-{args.tiles}-{args.size}"
    measure(
        "generate tiles (cached after the first run)", lambda: make_dataset(images, args.tiles, args.size, args.workers)
    )
    manifest = ingest(images, CLASSES, out / "ingest" / "manifest.csv")
    outcome: dict[str, object] = {}

    def end_to_end() -> None:
        try:
            outcome["report"] = validate_dataset(manifest, out / "ingest", config, out / "report.json")
        except DataValidationError as exc:
            outcome["error"] = str(exc).splitlines()[0]

    measure("validate_dataset end to end, no Data Docs", end_to_end, args.repeats, "<- goal: < 60 s on 2 cores")
    tables: list[pd.DataFrame] = []
    measure(
        "  decode, checksum, phash, tissue fraction",
        lambda: tables.append(inspect_tiles(manifest, out / "ingest", args.workers)),
    )
    table = tables[0]
    suites = measure("  GX suites, duplicates and report", lambda: check_tiles(table, config), args.repeats)
    docs = out / "data_docs"
    with_docs = measure("GX suites with Data Docs", lambda: check_tiles(table, config, docs), args.repeats)
    print(f"{'  so Data Docs alone':<46} {with_docs - suites:>8.2f} s wall")
    codes = np.array([int(h, 16) for h in table["phash"].dropna()], dtype=np.uint64)
    pairs = hamming_pairs(codes, config.validate.near_duplicate_distance)
    measure(
        f"  pairwise phash search ({len(codes)} hashes)",
        lambda: hamming_pairs(codes, config.validate.near_duplicate_distance),
        args.repeats,
        f"{len(pairs[0])} pairs",
    )
    if "error" in outcome:
        print(f"validation failed (timings still count): {outcome['error']}")
    report = outcome.get("report")
    if isinstance(report, dict):
        print(
            f"report: {report['n_tiles']} tiles, {report['n_low_tissue']} near-blank, "
            f"{report['n_duplicate_pairs']} exact and {report['n_near_duplicate_pairs']} near-duplicate pairs"
        )
        for warning in report["warnings"]:
            print(f"  warning: {warning[:160]}")


if __name__ == "__main__":
    main()
