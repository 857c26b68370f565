"""What the training recipe learns from the sample tiles, against the colour-histogram baseline, over seeds.

Grouped cross-validation as the pipeline does it (``split`` params: folds grouped by slide, the same seed), with
the real pieces: each fold's Macenko (or other) stain target fitted on its training tiles, the early-stopping
hold-out of training slides, :func:`bonetumor.training.engine.fit` on random crops, test-time views for the
out-of-fold predictions, and :class:`bonetumor.training.candidates.baseline.HistogramForest` on the same folds. No
MLflow, no GAN tiles (``balance``), no near-duplicate clusters in the split (the validate stage finds none in the
sample). Per model and seed it prints the mean per-fold macro-F1 (what the champion gate compares), the out-of-fold
accuracy and macro-F1, and the seconds it took; then the mean and spread over seeds.

Usage::

    python -m benchmarks.sample_learning [--params params.yaml] [--archs resnet50 vgg19] [--seeds 0 1 2]
        [--set train.steps=300 --set augment.color_jitter=0 ...] [--no-baseline]

``--set section.key=value`` overrides params.yaml (values are YAML: ``--set train.per_arch="{vgg19: {lr: 1e-3}}"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from bonetumor.config import Config
from bonetumor.data.datasets import label_indices, split_tables
from bonetumor.data.ingest import ingest
from bonetumor.data.manifest import resolve_paths
from bonetumor.data.split import make_folds
from bonetumor.evaluation.metrics import macro_f1
from bonetumor.runtime import configure_process
from bonetumor.training.candidates.baseline import BASELINE, HistogramForest
from bonetumor.training.cross_validation import early_stopping_split
from bonetumor.training.engine import eval_dataset, fit, predict_logits, select_device, training_dataset
from bonetumor.training.models import InitWeights, build_model, resolve_weights
from bonetumor.transforms.augment import AugmentPolicy
from bonetumor.transforms.stain import StainNormalizer, fit_from_files
from bonetumor.transforms.tta import TestTimeViews
from bonetumor.utils import seed_everything


def load_params(path: Path, overrides: list[str]) -> Config:
    """Read params.yaml and apply ``section.key=value`` overrides (YAML values), validated."""
    raw: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if not field:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    config = Config.from_dict(raw, source=str(path))
    source = Path(config.data.source)
    if not source.is_absolute():
        config = Config.from_dict({**raw, "data": {**raw.get("data", {}), "source": str(path.parent / source)}})
    return config


@dataclasses.dataclass(frozen=True)
class _Fold:
    """One fold of one seed: the training table (with ``file``), the validation tiles, and the stain normaliser."""

    k: int
    seed: int
    table: pd.DataFrame
    val_rows: pd.DataFrame
    val_files: list[Path]
    truth: list[int]
    stain: StainNormalizer | None


def run(config: Config, archs: list[str], seeds: list[int], baseline: bool) -> dict[str, list[dict[str, Any]]]:
    """Return, per model, one result per seed: mean per-fold macro-F1, OOF accuracy and macro-F1, seconds."""
    classes = config.data.classes
    device = select_device(config.train.device)
    inits = {arch: resolve_weights(arch, config.train.weights) for arch in archs}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in [*([BASELINE] if baseline else []), *archs]}
    with tempfile.TemporaryDirectory(prefix="bonetumor-bench-") as tmp:
        manifest = ingest(Path(config.data.source), classes, Path(tmp) / "manifest.csv")
        dataset_dir = Path(tmp)
        folds = make_folds(manifest, config.split, classes)
        policy = AugmentPolicy.from_config(config.augment)
        for seed in seeds:
            predictions: dict[str, dict[int, tuple[list[int], np.ndarray]]] = {name: {} for name in results}
            seconds: dict[str, float] = dict.fromkeys(results, 0.0)
            for fold_info in folds["folds"]:
                fold = _fold(manifest, folds, int(fold_info["fold"]), seed, dataset_dir, config, policy)
                if baseline:
                    started = time.monotonic()
                    predictions[BASELINE][fold.k] = (fold.truth, _baseline_logits(fold, config))
                    seconds[BASELINE] += time.monotonic() - started
                for arch in archs:
                    logits, best_step, took = _arch_logits(arch, fold, config, inits[arch], policy, device)
                    predictions[arch][fold.k] = (fold.truth, logits)
                    seconds[arch] += took
                    print(
                        f"  {arch} seed {seed} fold {fold.k}: macro-F1 "
                        f"{macro_f1(fold.truth, logits.argmax(1)):.3f} (best step {best_step})",
                        flush=True,
                    )
            for name, per_fold in predictions.items():
                results[name].append(_seed_result(name, seed, per_fold, seconds[name]))
    return results


def _fold(
    manifest: pd.DataFrame,
    folds: dict[str, Any],
    k: int,
    seed: int,
    dataset_dir: Path,
    config: Config,
    policy: AugmentPolicy,
) -> _Fold:
    """Return fold ``k`` for ``seed``, its stain target fitted on its training tiles."""
    classes = config.data.classes
    train_rows, val_rows = split_tables(manifest, folds, k)
    table = train_rows.assign(file=[str(f) for f in resolve_paths(train_rows, dataset_dir)], synthetic=False)
    truth = label_indices(val_rows["label"], classes)
    val_files = resolve_paths(val_rows, dataset_dir)
    stain = fit_from_files(policy.stain_normalization, list(table["file"]), seed=seed + k)
    return _Fold(k, seed, table, val_rows, val_files, truth, stain)


def _baseline_logits(fold: _Fold, config: Config) -> np.ndarray:
    """Fit the colour-histogram forest on the fold's training tiles; return its logits of the validation tiles."""
    classes = config.data.classes
    forest = HistogramForest(dataclasses.replace(config.baseline, seed=fold.seed), classes, fold.stain).fit(
        list(fold.table["file"]), label_indices(fold.table["label"], classes)
    )
    return forest.logits(fold.val_files)


def _arch_logits(
    arch: str, fold: _Fold, config: Config, init: InitWeights, policy: AugmentPolicy, device: torch.device
) -> tuple[np.ndarray, int, float]:
    """Train ``arch`` on the fold; return its validation logits (test-time views), best step and seconds taken.

    The seconds count the model's build, fit and prediction, not the early-stopping split before them.
    """
    cfg = config.for_arch(arch)
    train = dataclasses.replace(cfg.train, seed=fold.seed, progress=False)
    fit_rows, stop_rows = early_stopping_split(fold.table, cfg, seed=fold.seed + fold.k)
    views = TestTimeViews.from_config(cfg.preprocess)
    stop_set = (
        None if stop_rows is None else eval_dataset(list(stop_rows["file"]), list(stop_rows["label"]), cfg, fold.stain)
    )
    started = time.monotonic()
    seed_everything(fold.seed + fold.k)
    model = build_model(arch, len(config.data.classes), train.dropout, init, train.trainable)
    result = fit(
        model,
        training_dataset(fit_rows, cfg, policy, fold.stain),
        stop_set,
        train,
        device,
        train.steps,
        f"{arch} seed {fold.seed} fold {fold.k}",
        views=views,
    )
    val_set = eval_dataset(fold.val_files, list(fold.val_rows["label"]), cfg, fold.stain)
    logits = predict_logits(result.model, val_set, train, device, views)
    return logits, result.best_step, time.monotonic() - started


def _seed_result(
    name: str, seed: int, per_fold: dict[int, tuple[list[int], np.ndarray]], seconds: float
) -> dict[str, Any]:
    """Return (and print) one model's figures for one seed from its per-fold truth and logits."""
    fold_f1 = [macro_f1(t, logits.argmax(1)) for t, logits in per_fold.values()]
    truth_all = np.concatenate([t for t, _ in per_fold.values()])
    pred_all = np.concatenate([logits.argmax(1) for _, logits in per_fold.values()])
    result = {
        "seed": seed,
        "fold_f1_macro_mean": statistics.fmean(fold_f1),
        "oof_accuracy": float(np.mean(truth_all == pred_all)),
        "oof_f1_macro": macro_f1(truth_all, pred_all),
        "seconds": seconds,
        "folds": fold_f1,
    }
    print(
        f"{name} seed {seed}: per-fold macro-F1 {[round(f, 3) for f in fold_f1]} mean "
        f"{statistics.fmean(fold_f1):.3f}, OOF accuracy {result['oof_accuracy']:.3f}, "
        f"{seconds:.0f} s",
        flush=True,
    )
    return result


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--archs", nargs="*", default=None, help="default: train.architectures; none: baseline only")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    configure_process(False)
    config = load_params(args.params, args.overrides)
    archs = list(config.train.architectures if args.archs is None else args.archs)
    results = run(config, archs, args.seeds, baseline=not args.no_baseline)
    print()
    print(
        f"grouped {len(next(iter(results.values()))[0]['folds'])}-fold CV on {config.data.source}, seeds {args.seeds}"
    )
    print("| model | mean per-fold macro-F1 | OOF accuracy | OOF macro-F1 | seconds per seed |")
    print("| --- | --- | --- | --- | --- |")
    for name, runs in results.items():

        def spread(key: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r[key] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.3f} +/- {sd:.3f}"

        print(
            f"| {name} | {spread('fold_f1_macro_mean')} | {spread('oof_accuracy')} | {spread('oof_f1_macro')} | "
            f"{statistics.fmean(r['seconds'] for r in runs):.0f} |"
        )


if __name__ == "__main__":
    main()
