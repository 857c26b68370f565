"""CPU inference latency and agreement of the deployment variants: torch eager, ONNX Runtime FP32 and INT8, pruned VGG.

For each architecture (random initialisation: this measures speed and numerical agreement, not accuracy) and
input size, it times torch eager FP32, ONNX Runtime FP32 and ONNX Runtime INT8 (static QDQ, calibrated on
generated tiles), and for VGGs the model pruned by ``--prune-amount`` in eager mode, ONNX Runtime FP32 and INT8.
It prints milliseconds per image (mean, p50, p95) per batch size, and the top-1 agreement and largest
probability difference of each variant against its reference (the unpruned eager model; the pruned eager model
for the pruned exports). A pruned model is not fine-tuned here, so its agreement with the unpruned model says
nothing about the accuracy after fine-tuning. Random-init models give near-tied or saturated probabilities, so
re-measure agreement on the trained champion and real tiles before trusting INT8.

Usage::

    python -m benchmarks.inference_latency [--archs resnet50 vgg19] [--size 128 224] [--batch 1 8]
        [--threads 2] [--repeats 10] [--large-repeats 4] [--tiles 32] [--calibration 16]
        [--prune-amount 0.5] [--images DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torch import nn

from bonetumor.config import PreprocessConfig
from bonetumor.training.export import agreement, export_onnx, measure_latency, quantize_int8, softmax
from bonetumor.training.models import build_model
from bonetumor.training.pruning import prune_vgg
from bonetumor.transforms.decode import decode_image
from bonetumor.transforms.preprocess import build_eval_transform
from bonetumor.utils import write_json

#: Mean colours of generated tiles (pink stroma, purple necrosis, dark tumour nuclei), as in the test fixtures.
COLOURS = ((225, 120, 160), (150, 60, 200), (90, 40, 120))


def generated_tiles(count: int, seed: int, size: int = 256) -> list[Image.Image]:
    """Return ``count`` RGB tiles: one of three H&E-like colours, shifted per tile, plus blotches and noise."""
    rng = np.random.default_rng(seed)
    tiles = []
    for i in range(count):
        colour = np.array(COLOURS[i % len(COLOURS)], dtype=float) + rng.normal(0, 20, 3)
        # Low-frequency blotches (upsampled coarse noise) give the convolutions some structure to respond to.
        coarse = rng.normal(0, 30, (size // 32, size // 32, 3))
        blotches = np.kron(coarse, np.ones((32, 32, 1)))
        pixels = colour + blotches + rng.normal(0, 15, (size, size, 3))
        tiles.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB"))
    return tiles


def folder_tiles(folder: Path, count: int) -> list[Image.Image]:
    """Return up to ``count`` decoded JPEG/PNG/TIFF tiles found under ``folder`` (sorted by path)."""
    suffixes = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)[:count]
    if not paths:
        raise SystemExit(f"--images {folder}: no JPEG, PNG or TIFF tiles found")
    return [decode_image(p) for p in paths]


@dataclass
class Variant:
    """One deployable form of a model: how to run a preprocessed batch, and what to compare it with."""

    name: str
    run: Callable[[np.ndarray], np.ndarray]
    reference: str
    file_mb: float | None = None


def eager(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Return a function that runs ``model`` (eval mode, inference mode) on a float32 batch."""
    model.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return run


def onnx_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Return a function that runs an ONNX file with ONNX Runtime (CPU, ``threads`` intra-op threads)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: batch})[0])

    return run


def logits_of(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Run ``run`` over ``x`` in batches and return all logits."""
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def megabytes(path: Path) -> float:
    """File size in MB."""
    return path.stat().st_size / 1e6


def variants_for(
    arch: str, size: int, args: argparse.Namespace, calibration: np.ndarray, folder: Path
) -> tuple[list[Variant], dict[str, Any]]:
    """Build the model of ``arch`` and every deployable variant of it; return them and notes for the report."""
    torch.manual_seed(0)
    model = build_model(arch, 3).eval()
    notes: dict[str, Any] = {}
    variants = [Variant("eager fp32", eager(model), "eager fp32")]
    candidates: list[tuple[str, nn.Module, str]] = [("", model, "eager fp32")]
    if arch.startswith("vgg") and args.prune_amount > 0:
        start = time.perf_counter()
        pruned, summary = prune_vgg(model, args.prune_amount, torch.from_numpy(calibration[:1]))
        notes["prune"] = {
            "seconds": round(time.perf_counter() - start, 2),
            "params": [summary.params_before, summary.params_after],
            "macs": [summary.macs_before, summary.macs_after],
            "plan_after": list(summary.plan_after),
        }
        variants.append(Variant(f"pruned{args.prune_amount:g} eager", eager(pruned), "eager fp32"))
        candidates.append((f"pruned{args.prune_amount:g} ", pruned, f"pruned{args.prune_amount:g} eager"))
    for prefix, module, reference in candidates:
        fp32 = export_onnx(module, size, folder / f"{arch}-{prefix.strip() or 'full'}-{size}.onnx")
        variants.append(Variant(f"{prefix}ort fp32", onnx_runner(fp32, args.threads), reference, megabytes(fp32)))
        start = time.perf_counter()
        int8 = quantize_int8(fp32, fp32.with_suffix(".int8.onnx"), list(calibration))
        notes[f"{prefix}int8"] = {"method": int8.method, "seconds": round(time.perf_counter() - start, 1)}
        if int8.fallback_reason:
            notes[f"{prefix}int8"]["fallback_reason"] = int8.fallback_reason
        variants.append(
            Variant(f"{prefix}ort int8", onnx_runner(int8.path, args.threads), reference, megabytes(int8.path))
        )
    return variants, notes


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print one line per architecture, size, variant and batch size."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "vgg19"])
    parser.add_argument("--size", nargs="+", type=int, default=[128, 224], help="input sizes in pixels")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes to time")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement below 224 px")
    parser.add_argument("--large-repeats", type=int, default=4, help="timed calls per measurement at >= 224 px")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiles", type=int, default=32, help="tiles for the agreement check")
    parser.add_argument("--calibration", type=int, default=16, help="tiles calibrating the INT8 quantization")
    parser.add_argument("--prune-amount", type=float, default=0.5, help="share of VGG filters removed (0: none)")
    parser.add_argument("--images", type=Path, help="take tiles from this folder instead of generating them")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"cpu: {os.cpu_count()} cores, {args.threads} threads; load average {load:.1f}; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; {args.tiles} agreement tiles, {args.calibration} calibration tiles"
    )
    if args.images:
        images = folder_tiles(args.images, args.tiles + args.calibration)
        eval_images, calibration_images = images[: args.tiles], images[args.tiles :] or images[: args.calibration]
    else:
        eval_images = generated_tiles(args.tiles, seed=1)
        calibration_images = generated_tiles(args.calibration, seed=2)
    header = (
        f"{'arch':<9} {'size':>4} {'variant':<20} {'MB':>6} {'batch':>5} {'ms/img':>8} {'p50':>8} {'p95':>8} "
        f"{'top1 agree':>10} {'max|dp|':>8}  vs"
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bonetumor-latency-") as tmp:
        for size in args.size:
            transform = build_eval_transform(PreprocessConfig(tile_size=size, input_size=size))
            x = np.stack([transform(im).numpy() for im in eval_images]).astype(np.float32)
            calibration = np.stack([transform(im).numpy() for im in calibration_images]).astype(np.float32)
            repeats = args.repeats if size < 224 else args.large_repeats
            for arch in args.archs:
                variants, notes = variants_for(arch, size, args, calibration, Path(tmp))
                print(f"\n{arch} @ {size} px: {notes}")
                print(header)
                probs = {v.name: softmax(logits_of(v.run, x)) for v in variants}
                for variant in variants:
                    scores = agreement(probs[variant.reference], probs[variant.name])
                    for batch in args.batch:
                        timing = measure_latency(variant.run, x[:batch], warmup=args.warmup, repeats=repeats)
                        row = {"arch": arch, "size": size, "variant": variant.name, "file_mb": variant.file_mb}
                        row.update(timing)
                        row.update(scores)
                        row["reference"] = variant.reference
                        results.append(row)
                        mb = f"{variant.file_mb:6.1f}" if variant.file_mb is not None else f"{'-':>6}"
                        print(
                            f"{arch:<9} {size:>4} {variant.name:<20} {mb} {batch:>5} "
                            f"{timing['ms_per_image_mean']:>8.1f} {timing['ms_per_image_p50']:>8.1f} "
                            f"{timing['ms_per_image_p95']:>8.1f} {scores['top1_agreement']:>10.3f} "
                            f"{scores['max_abs_prob_diff']:>8.4f}  {variant.reference}",
                            flush=True,
                        )
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
