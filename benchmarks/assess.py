"""Whole-slide assessment throughput: tiles per second end to end, the decode/inference split, peak memory.

It composes a generated slide of ``--tiles`` tissue tiles (a square of the sample's real tiles, a ring of glass
around it) as a pyramidal TIFF, then, for each ``--workers`` count, runs ``bonetumor.slide.assess.assess_slide``
with the registered model in a fresh child process and reports:

* end to end: tissue tiles per second of the whole call (open, thumbnail and mask, reading, classifying, the
  summary with its bootstrap, the CSV, GeoJSON and overlay);
* the split: seconds the read threads spent reading and decoding, and seconds in the model;
* decode alone (every tissue tile read at ``assess.read_size``, one thread) and the model alone (the same tiles,
  already decoded, in batches of ``assess.batch_size``), in tiles per second;
* peak resident memory of the child (``ru_maxrss``) and its resident memory once the model was loaded, so the
  increase is what the assessment itself used.

Goal (PASS/FAIL printed, not the exit code): at least 20 tiles/s end to end.

Usage::

    python -m benchmarks.assess [--project DIR] [--alias A] [--tiles 400] [--workers 1 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_TILES_PER_SECOND = 20.0


def _layout(tiles: int, seed: int = 0) -> list[str]:
    """A square of ``tiles`` tissue cells (classes drawn at random), one cell of glass around it."""
    import numpy as np

    side = math.isqrt(tiles)
    if side * side != tiles:
        raise SystemExit(f"--tiles {tiles}: expected a square number (400 = 20 x 20)")
    rng = np.random.default_rng(seed)
    inner = ["".join(rng.choice(list("NXV"), size=side)) for _ in range(side)]
    glass = "." * (side + 2)
    return [glass, *[f".{row}." for row in inner], glass]


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: argparse.Namespace) -> None:
    """One measured run (in its own process, so the peak memory is the assessment's)."""
    import csv
    import dataclasses

    from bonetumor.registry.model_registry import open_served_model
    from bonetumor.slide.assess import assess_slide
    from bonetumor.slide.sources import TileSpec, open_source

    holder, config = open_served_model(Path(args.project) / "params.yaml", args.alias or None)
    model = holder.current
    cfg = dataclasses.replace(config.assess, workers=args.workers[0])
    rss_model = _rss_mb()
    with tempfile.TemporaryDirectory() as out:
        result = assess_slide(args.slide, model, cfg, out, progress=False)
        with result.files["csv"].open() as handle:
            side = result.summary["tiling"]["tile_side_px"]
            tiles = [TileSpec(int(r["x"]), int(r["y"]), side) for r in csv.DictReader(handle)]
    summary = result.summary
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the checks below hold every tile
    # Decode alone and the model alone, on the same tissue tiles.
    source = open_source(args.slide, cfg.max_image_pixels, cfg.tcia_tile_px)
    start = time.perf_counter()
    images = [source.read(tile, cfg.read_size) for tile in tiles]
    decode_s = time.perf_counter() - start
    source.close()
    start = time.perf_counter()
    for i in range(0, len(images), cfg.batch_size):
        model.classify_tiles(images[i : i + cfg.batch_size])
    model_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "workers": cfg.workers,
                "tiles": summary["tiles"],
                "seconds": summary["timing"]["seconds"],
                "tiles_per_second": summary["timing"]["tiles_per_second"],
                "read_seconds_in_workers": summary["timing"]["read_seconds_in_workers"],
                "classify_seconds": summary["timing"]["classify_seconds"],
                "decode_alone_tiles_per_second": round(len(tiles) / decode_s, 1),
                "model_alone_tiles_per_second": round(len(tiles) / model_s, 1),
                "rss_after_model_mb": round(rss_model, 1),
                "peak_rss_mb": round(peak_mb, 1),
                "runtime": model.engine_name,
                "model_version": model.version,
                "necrosis_percent": summary["necrosis_percent"],
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default=".", help="project folder with params.yaml and a registered model")
    parser.add_argument("--alias", default="", help="alias or version (default: what champion.json names)")
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", default="", help="write the figures here")
    parser.add_argument("--slide", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    project = Path(args.project).resolve()
    alias = args.alias
    champion = project / "outputs" / "register" / "champion.json"
    if not alias and champion.is_file():
        alias = json.loads(champion.read_text())["alias"]
    from bonetumor.slide.demo import sample_tile_source, write_demo_slide

    with tempfile.TemporaryDirectory() as tmp:
        slide = write_demo_slide(
            Path(tmp) / "bench.tif", sample_tile_source(project / "data" / "sample" / "images"), _layout(args.tiles)
        )
        runs = []
        for workers in args.workers:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.assess",
                "--child",
                "--project",
                str(project),
                "--slide",
                str(slide),
                "--workers",
                str(workers),
            ] + (["--alias", alias] if alias else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=Path(__file__).parent.parent)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"Generated slide: {args.tiles} tissue tiles of the sample + a ring of glass; {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        "| read workers | tissue tiles | end to end tiles/s | s | read s (threads) | model s | decode alone tiles/s "
        "| model alone tiles/s | RSS after model MB | peak RSS MB |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(
            f"| {r['workers']} | {r['tiles']} | {r['tiles_per_second']:.1f} | {r['seconds']:.2f} | "
            f"{r['read_seconds_in_workers']:.2f} | {r['classify_seconds']:.2f} | {r['decode_alone_tiles_per_second']}"
            f" | {r['model_alone_tiles_per_second']} | {r['rss_after_model_mb']} | {r['peak_rss_mb']} |"
        )
    best = max(r["tiles_per_second"] for r in runs)
    verdict = "PASS" if best >= GOAL_TILES_PER_SECOND else "FAIL"
    print(
        f"goal >= {GOAL_TILES_PER_SECOND:g} tiles/s end to end: {verdict} ({best:.1f}); model version "
        f"{runs[0]['model_version']} on {runs[0]['runtime']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "goal": verdict}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
