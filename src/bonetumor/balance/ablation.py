"""The ablation of imbalance strategies, and the gate that decides whether training uses the GAN's tiles.

On the same folds as the cross-validation, four arms fit the same model on each fold's training set and are
scored on the fold's validation tiles (real tiles of held-out slides, never synthetic):

* ``none``: the real tiles only;
* ``class_weighted``: the real tiles, each class weighted by the inverse of its frequency;
* ``oversample``: the real tiles, those of each short class repeated (seeded draws) up to ``target_ratio``;
* ``gan``: the real tiles and the GAN's synthetic tiles, as the balance stage wrote them.

The model is the colour-histogram random forest of the baseline (``balance.ablation.model: baseline``): 4 arms
times k folds of a CNN would cost as much as the cross-validation itself, and would tie the GAN stage to every
training setting. The forest reads exactly the colour statistics a poor GAN gets wrong, so a tile set that misleads
it is caught; whether the tiles help a CNN is the cross-validation's to show, with ``balance.gate: always``.

The gate (:func:`gate`) lets training use the synthetic tiles only when every training set's quality report passes
its thresholds and the ``gan`` arm's mean per-fold macro-F1 and minority-class recall are not lower than the
``none`` arm's by more than the tolerances of ``balance.ablation``. The decision, its reason and the figures go to
``decision.json`` (read by :func:`bonetumor.data.datasets.load_training_table`), ``ablation.md`` (always written,
the quality reports' table too) and an MLflow run (``balance-ablation``); the evaluation appends ``ablation.md`` to
``comparison.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bonetumor.config import Config
from bonetumor.data.datasets import DECISION_FILE, FULL_SET, label_indices, load_training_table, split_tables
from bonetumor.data.manifest import read_manifest, resolve_paths
from bonetumor.data.split import read_folds
from bonetumor.evaluation.stats import fold_summary
from bonetumor.utils import EtaTimer, format_interval, read_json, write_json

log = logging.getLogger(__name__)

#: The arms, in report order.
ARMS = ("none", "class_weighted", "oversample", "gan")
#: The ablation's figures, their table and plot, in the balance output (beside ``decision.json``).
ABLATION_FILE, ABLATION_MD, ABLATION_PNG = "ablation.json", "ablation.md", "ablation.png"
#: Tags of the ablation's MLflow run.
DECISION_TAG = "bonetumor.balance.use_synthetic"


def oversample(rows: pd.DataFrame, label_column: str, target_ratio: float, seed: int) -> pd.DataFrame:
    """Return ``rows`` with the tiles of each short class repeated up to ``target_ratio`` times the largest class.

    Repeats are drawn with replacement from the class's own tiles by a generator seeded with ``seed``; every
    original tile stays exactly once.
    """
    counts = rows[label_column].value_counts()
    target = int(np.ceil(target_ratio * counts.max())) if len(counts) else 0
    rng = np.random.default_rng(seed)
    extra = [
        rows[rows[label_column] == label].iloc[rng.integers(0, n, target - n)]
        for label, n in counts.items()
        if n < target
    ]
    return pd.concat([rows, *extra], ignore_index=True) if extra else rows.reset_index(drop=True)


def _arm_table(arm: str, table: pd.DataFrame, config: Config, seed: int) -> pd.DataFrame:
    real = table[~table["synthetic"]]
    if arm == "gan":
        return table
    if arm == "oversample":
        return oversample(real, "label", config.balance.target_ratio, seed)
    return real


def run_ablation(
    config: Config, manifest_path: str | Path, folds_path: str | Path, balance_dir: str | Path
) -> dict[str, Any]:
    """Fit every arm on every fold and score it on the fold's validation tiles.

    Args:
        config: The whole config (``balance``, ``baseline``, ``evaluate.confidence_level``).
        manifest_path: The data set manifest.
        folds_path: The folds file.
        balance_dir: The balance output being written (every fold's training manifest and ``summary.json``).

    Returns:
        ``{"model", "folds": [...], "arms": {arm: {"macro_f1": fold summary, "minority_recall": fold summary,
        "per_fold": [...]}}, "minority_classes": {fold: [...]}}``.

    Raises:
        ArtifactError: A fold's training manifest is missing.
    """
    from bonetumor.training.candidates.baseline import HistogramForest

    manifest_path, balance_dir = Path(manifest_path), Path(balance_dir)
    manifest = read_manifest(manifest_path)
    folds = read_folds(folds_path, manifest, manifest_path)
    classes = config.data.classes
    summary = read_json(balance_dir / "summary.json", "balance summary")
    per_arm: dict[str, list[dict[str, float]]] = {arm: [] for arm in ARMS}
    minority: dict[str, list[str]] = {}
    fold_ids = [int(info["fold"]) for info in folds["folds"]]
    timer = EtaTimer(len(fold_ids) * len(ARMS))
    for fold in fold_ids:
        name = f"fold-{fold}"
        table = load_training_table(balance_dir, name, manifest_path.parent, apply_gate=False)
        _, val_rows = split_tables(manifest, folds, fold)
        if val_rows.empty:
            continue
        generated = summary["sets"][name]["generated"]
        counts = summary["sets"][name]["counts_before"]
        short = [c for c in classes if generated.get(c, 0) > 0] or [
            c for c in classes if 0 < counts.get(c, 0) < max(counts.values())
        ]
        minority[name] = short
        truth = np.asarray(label_indices(val_rows["label"], classes))
        cache = _FeatureCache(HistogramForest(config.baseline, classes))
        val_x = cache.features(resolve_paths(val_rows, manifest_path.parent))
        for arm in ARMS:
            rows = _arm_table(arm, table, config, seed=config.balance.seed + fold)
            labels = np.asarray(label_indices(rows["label"], classes))
            forest = HistogramForest(config.baseline, classes).forest
            if arm == "class_weighted":
                # N / (K * n_c) per class, the weights of train.class_weighted_loss (scikit-learn's "balanced").
                forest.set_params(class_weight="balanced")
            forest.fit(cache.features(list(rows["file"])), labels)
            predicted = np.asarray(forest.classes_)[forest.predict_proba(val_x).argmax(1)]
            per_arm[arm].append(_fold_scores(truth, predicted, classes, short, fold, len(rows)))
            timer.step()
        log.info(
            "ablation %s: macro-F1 %s (ETA %s)",
            name,
            ", ".join(f"{arm} {per_arm[arm][-1]['macro_f1']:.3f}" for arm in ARMS),
            timer.eta(),
        )
    level = config.evaluate.confidence_level
    arms = {
        arm: {
            "macro_f1": fold_summary([row["macro_f1"] for row in rows], level),
            "minority_recall": fold_summary([row["minority_recall"] for row in rows], level),
            "per_fold": rows,
        }
        for arm, rows in per_arm.items()
    }
    return {"model": config.balance.ablation.model, "folds": fold_ids, "minority_classes": minority, "arms": arms}


class _FeatureCache:
    """Each tile's histograms, computed once per fold: the arms share most of their tiles."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.rows: dict[str, np.ndarray] = {}

    def features(self, files: Sequence[Path]) -> np.ndarray:
        missing = list(dict.fromkeys(str(f) for f in files if str(f) not in self.rows))
        if missing:
            self.rows.update(zip(missing, self.probe.features(missing), strict=True))
        return np.stack([self.rows[str(f)] for f in files])


def _fold_scores(
    truth: np.ndarray, predicted: np.ndarray, classes: Sequence[str], short: Sequence[str], fold: int, n_train: int
) -> dict[str, float]:
    from bonetumor.evaluation.metrics import macro_f1

    recalls = [
        float(np.mean(predicted[truth == classes.index(c)] == classes.index(c)))
        for c in short
        if np.any(truth == classes.index(c))
    ]
    return {
        "fold": float(fold),
        "n_train": float(n_train),
        "n_val": float(len(truth)),
        "macro_f1": macro_f1(truth, predicted),
        "accuracy": float(np.mean(truth == predicted)),
        "minority_recall": float(np.mean(recalls)) if recalls else float("nan"),
    }


def gate(config: Config, summary: dict[str, Any], ablation: dict[str, Any] | None) -> dict[str, Any]:
    """Decide whether training uses the synthetic tiles, and say why.

    Args:
        config: The whole config (``balance.gate``, quality thresholds, ablation tolerances).
        summary: The balance ``summary.json`` (every set's quality report).
        ablation: :func:`run_ablation`'s result, or None (not run).

    Returns:
        ``{"use_synthetic", "reason", "gate", "failures", "quality", "ablation"}``: ``quality`` maps each set to
        whether its report passed; ``ablation`` holds the two arms' means and the differences compared.
    """
    balance = config.balance
    generated = sum(sum(info["generated"].values()) for info in summary["sets"].values())
    quality = {
        name: info["quality"]["passed"] for name, info in summary["sets"].items() if info.get("quality") is not None
    }
    failures = [
        f"{name}: {failure}"
        for name, info in summary["sets"].items()
        if info.get("quality") is not None
        for failure in info["quality"]["failures"]
    ]
    compared: dict[str, Any] = {}
    if ablation is not None:
        none, gan = ablation["arms"]["none"], ablation["arms"]["gan"]
        for metric, tolerance, key in (
            ("macro_f1", balance.ablation.max_macro_f1_drop, "max_macro_f1_drop"),
            ("minority_recall", balance.ablation.max_minority_recall_drop, "max_minority_recall_drop"),
        ):
            ours, theirs = gan[metric]["mean"], none[metric]["mean"]
            if ours is None or theirs is None:
                continue
            compared[metric] = {"gan": ours, "none": theirs, "difference": ours - theirs, "tolerance": tolerance}
            if theirs - ours > tolerance:
                failures.append(
                    f"the ablation: GAN tiles lower the mean per-fold {metric.replace('_', '-')} from {theirs:.3f} "
                    f"(real tiles only) to {ours:.3f}, more than balance.ablation.{key} {tolerance}"
                )
    document: dict[str, Any] = {"gate": balance.gate, "failures": failures, "quality": quality, "ablation": compared}
    if not balance.enabled:
        use, reason = False, "balance.enabled is false: no GAN was trained and no synthetic tile was made"
    elif generated == 0:
        use, reason = False, "no training set falls short of balance.target_ratio: no synthetic tile was needed"
    elif balance.gate == "never":
        use, reason = False, "balance.gate is never: the synthetic tiles were made and reported, not trained on"
    elif balance.gate == "always":
        verdict = "though " + "; ".join(failures) if failures else "and every check passed"
        use, reason = True, f"balance.gate is always: the synthetic tiles are used, {verdict}"
    elif failures:
        use, reason = False, "the synthetic tiles are not used: " + "; ".join(failures)
    else:
        checks = "every quality report passed" + (
            " and the ablation shows no harm" if compared else " (the ablation is off)"
        )
        use, reason = True, f"the synthetic tiles are used: {checks}"
    return {"use_synthetic": use, "reason": reason, **document}


def decide(
    config: Config,
    manifest_path: str | Path,
    folds_path: str | Path,
    balance_dir: str | Path,
    *,
    project_dir: str | Path,
) -> dict[str, Any]:
    """Run the ablation (when on and there are synthetic tiles), apply the gate, and record both.

    Writes ``decision.json``, and with the ablation ``ablation.json``, ``ablation.md`` and ``ablation.png``, into
    ``balance_dir``; logs them on an MLflow run ``balance-ablation`` when GAN tiles were made.

    Args:
        config: The whole config.
        manifest_path: The data set manifest.
        folds_path: The folds file.
        balance_dir: The balance output being written.
        project_dir: Base folder of a relative tracking URI.

    Returns:
        The decision (:func:`gate`).
    """
    balance_dir = Path(balance_dir)
    summary = read_json(balance_dir / "summary.json", "balance summary")
    made = sum(sum(info["generated"].values()) for name, info in summary["sets"].items() if name != FULL_SET)
    ablation = None
    if config.balance.enabled and config.balance.ablation.enabled and made > 0:
        ablation = run_ablation(config, manifest_path, folds_path, balance_dir)
        write_json(balance_dir / ABLATION_FILE, ablation)
        plot_ablation(ablation, balance_dir / ABLATION_PNG)
    decision = gate(config, summary, ablation)
    write_json(balance_dir / DECISION_FILE, decision)
    (balance_dir / ABLATION_MD).write_text(balance_markdown(summary, decision, ablation), encoding="utf-8")
    log.info("balance gate: %s", decision["reason"])
    if config.balance.enabled and made > 0:
        _log_decision(config, manifest_path, project_dir, balance_dir, decision, ablation)
    return decision


def _log_decision(
    config: Config,
    manifest_path: str | Path,
    project_dir: str | Path,
    balance_dir: Path,
    decision: dict[str, Any],
    ablation: dict[str, Any] | None,
) -> None:
    import mlflow

    from bonetumor.registry.tracking import flatten_params, process_tags, provenance_tags, setup_mlflow

    setup_mlflow(config.tracking, project_dir)
    tags = {**provenance_tags(config, manifest_path, project_dir), **process_tags(), "bonetumor.stage": "balance"}
    with mlflow.start_run(run_name="balance-ablation", tags={**tags, DECISION_TAG: str(decision["use_synthetic"])}):
        mlflow.log_params(flatten_params(config, ("balance",)))
        mlflow.set_tag("bonetumor.balance.reason", decision["reason"][:5000])
        if ablation is not None:
            mlflow.log_metrics(
                {
                    f"{arm}_{metric}_{key}": float(info[metric][key])
                    for arm, info in ablation["arms"].items()
                    for metric in ("macro_f1", "minority_recall")
                    for key in ("mean", "ci_low", "ci_high")
                    if info[metric][key] is not None
                }
            )
        for name in (DECISION_FILE, ABLATION_FILE, ABLATION_MD, ABLATION_PNG):
            if (balance_dir / name).is_file():
                mlflow.log_artifact(str(balance_dir / name), "ablation")


_ARM_TITLES = {
    "none": "real tiles only",
    "class_weighted": "class-weighted",
    "oversample": "oversampled real tiles",
    "gan": "real + GAN tiles",
}


def balance_markdown(summary: dict[str, Any], decision: dict[str, Any], ablation: dict[str, Any] | None) -> str:
    """Return the gate's decision, every GAN's quality report and the ablation as Markdown (``comparison.md``).

    Args:
        summary: The balance ``summary.json``.
        decision: The gate's decision (:func:`gate`).
        ablation: :func:`run_ablation`'s result, or None (not run).
    """
    lines = ["## GAN balancing", "", f"**Decision:** {decision['reason']}.", ""]
    reports = {name: info["quality"] for name, info in summary["sets"].items() if info.get("quality") is not None}
    if reports:
        lines += [
            "Quality of each training set's GAN tiles (random-feature KID against the real tiles, its slide-disjoint "
            "real-vs-real floor; a classifier telling real from GAN tiles, 0.5 = indistinguishable; near copies of "
            "real tiles):",
            "",
            "| training set | GAN tiles added | KID | floor | KID / floor | two-sample accuracy | near copies "
            "| passed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, report in reports.items():
            added = sum(summary["sets"][name]["generated"].values())
            lines.append(
                f"| {name} | {added} | {report['kid']:.4f} | {report['kid_floor']:.4f} | {report['kid_ratio']:.2f} | "
                f"{report['two_sample_accuracy']:.2f} | {100 * report['memorised_fraction']:.0f}% | "
                f"{'yes' if report['passed'] else 'no'} |"
            )
        lines.append("")
    if ablation is not None:
        lines += ["### Ablation", "", ablation_markdown(ablation)]
    return "\n".join(lines).rstrip("\n") + "\n"


def ablation_markdown(ablation: dict[str, Any]) -> str:
    """Return the ablation as a Markdown table (mean per-fold figures with their confidence intervals)."""
    lines = [
        f"Model: {ablation['model']} (colour-histogram random forest), the same folds as the cross-validation; "
        "minority classes: "
        + "; ".join(f"{name}: {', '.join(short) or '-'}" for name, short in ablation["minority_classes"].items()),
        "",
        "| imbalance strategy | macro-F1 (mean per fold, CI) | minority-class recall (mean per fold, CI) |",
        "|---|---|---|",
    ]
    for arm, info in ablation["arms"].items():
        lines.append(
            f"| {_ARM_TITLES.get(arm, arm)} | {format_interval(info['macro_f1'])} | "
            f"{format_interval(info['minority_recall'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_ablation(ablation: dict[str, Any], out_png: Path) -> Path:
    """Draw each arm's per-fold macro-F1 and minority recall (points) with their means and intervals (bars)."""
    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2, sharey=True)
    for axis, metric, title in zip(
        axes, ("macro_f1", "minority_recall"), ("macro-F1", "minority-class recall"), strict=True
    ):
        for x, (_arm, info) in enumerate(ablation["arms"].items()):
            values = [row[metric] for row in info["per_fold"] if not np.isnan(row[metric])]
            axis.scatter([x] * len(values), values, s=14, alpha=0.6)
            summary = info[metric]
            if summary["mean"] is not None:
                low = summary["ci_low"] if summary["ci_low"] is not None else summary["mean"]
                high = summary["ci_high"] if summary["ci_high"] is not None else summary["mean"]
                axis.errorbar(
                    [x + 0.15],
                    [summary["mean"]],
                    yerr=[[summary["mean"] - low], [high - summary["mean"]]],
                    fmt="o",
                    color="black",
                    capsize=3,
                )
        axis.set_xticks(
            range(len(ablation["arms"])), [_ARM_TITLES.get(a, a) for a in ablation["arms"]], fontsize=7, rotation=15
        )
        axis.set_title(title, fontsize=9)
        axis.set_ylim(0, 1.02)
    fig.suptitle("Imbalance strategies on the cross-validation folds (points: folds; bars: mean and CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    return out_png
