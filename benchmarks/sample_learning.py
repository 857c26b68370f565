"""What the training recipe learns from the sample tiles, against the colour-histogram baseline, over seeds.

Grouped cross-validation as the pipeline does it (``split`` params: folds grouped by slide, the same seed), with
the real pieces: each fold's Macenko (or other) stain target fitted on its training tiles, the early-stopping
hold-out of training slides, :func:`bonetumor.training.engine.fit` on random crops, test-time views for the out-of-fold
predictions, and :class:`bonetumor.training.baseline.HistogramForest` on the same folds. No MLflow, no GAN tiles
(``balance``), no near-duplicate clusters in the split (the validate stage finds none in the sample). Per model
and seed it prints the mean per-fold macro-F1 (what the champion gate compares), the out-of-fold accuracy and
macro-F1, and the seconds it took; then the mean and spread over seeds.

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
import yaml

from bonetumor.config import Config
from bonetumor.data.datasets import label_indices, split_tables
from bonetumor.data.ingest import ingest
from bonetumor.data.manifest import resolve_paths
from bonetumor.data.split import make_folds
from bonetumor.evaluation.metrics import macro_f1
from bonetumor.runtime import configure_process
from bonetumor.training.baseline import BASELINE, HistogramForest
from bonetumor.training.cross_validation import early_stopping_split
from bonetumor.training.engine import eval_dataset, fit, predict_logits, select_device, training_dataset
from bonetumor.training.models import build_model, resolve_weights
from bonetumor.transforms.augment import AugmentPolicy
from bonetumor.transforms.stain import fit_from_files
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
                k = int(fold_info["fold"])
                train_rows, val_rows = split_tables(manifest, folds, k)
                table = train_rows.assign(
                    file=[str(f) for f in resolve_paths(train_rows, dataset_dir)], synthetic=False
                )
                truth = label_indices(val_rows["label"], classes)
                val_files = resolve_paths(val_rows, dataset_dir)
                stain = fit_from_files(policy.stain_normalization, list(table["file"]), seed=seed + k)
                if baseline:
                    started = time.monotonic()
                    forest = HistogramForest(dataclasses.replace(config.baseline, seed=seed), classes, stain).fit(
                        list(table["file"]), label_indices(table["label"], classes)
                    )
                    predictions[BASELINE][k] = (truth, forest.logits(val_files))
                    seconds[BASELINE] += time.monotonic() - started
                for arch in archs:
                    cfg = config.for_arch(arch)
                    train = dataclasses.replace(cfg.train, seed=seed, progress=False)
                    fit_rows, stop_rows = early_stopping_split(table, cfg, seed=seed + k)
                    views = TestTimeViews.from_config(cfg.preprocess)
                    stop_set = (
                        None
                        if stop_rows is None
                        else eval_dataset(list(stop_rows["file"]), list(stop_rows["label"]), cfg, stain)
                    )
                    started = time.monotonic()
                    seed_everything(seed + k)
                    model = build_model(arch, len(classes), train.dropout, inits[arch], train.trainable)
                    result = fit(
                        model,
                        training_dataset(fit_rows, cfg, policy, stain),
                        stop_set,
                        train,
                        device,
                        train.steps,
                        f"{arch} seed {seed} fold {k}",
                        views=views,
                    )
                    val_set = eval_dataset(val_files, list(val_rows["label"]), cfg, stain)
                    predictions[arch][k] = (truth, predict_logits(result.model, val_set, train, device, views))
                    seconds[arch] += time.monotonic() - started
                    print(
                        f"  {arch} seed {seed} fold {k}: macro-F1 "
                        f"{macro_f1(truth, predictions[arch][k][1].argmax(1)):.3f} (best step {result.best_step})",
                        flush=True,
                    )
            for name, per_fold in predictions.items():
                fold_f1 = [macro_f1(t, logits.argmax(1)) for t, logits in per_fold.values()]
                truth_all = np.concatenate([t for t, _ in per_fold.values()])
                pred_all = np.concatenate([logits.argmax(1) for _, logits in per_fold.values()])
                results[name].append(
                    {
                        "seed": seed,
                        "fold_f1_macro_mean": statistics.fmean(fold_f1),
                        "oof_accuracy": float(np.mean(truth_all == pred_all)),
                        "oof_f1_macro": macro_f1(truth_all, pred_all),
                        "seconds": seconds[name],
                        "folds": fold_f1,
                    }
                )
                print(
                    f"{name} seed {seed}: per-fold macro-F1 {[round(f, 3) for f in fold_f1]} mean "
                    f"{statistics.fmean(fold_f1):.3f}, OOF accuracy {results[name][-1]['oof_accuracy']:.3f}, "
                    f"{seconds[name]:.0f} s",
                    flush=True,
                )
    return results


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
