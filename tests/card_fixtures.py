"""Model card sources with known figures (made up for tests, laid out as the evaluate stage's reports are)."""

from __future__ import annotations

import copy
from typing import Any

from bonetumor.registry.model_card import CardSources

CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
#: Rows are true classes: 8 of 10 Non-Tumor right, 6 of 10 Non-Viable-Tumor, 9 of 10 Viable-Tumor.
CONFUSION = [[8, 1, 1], [2, 6, 2], [0, 1, 9]]


def _summary(mean: float, low: float | None, high: float | None, n: int = 4) -> dict[str, Any]:
    return {"n": n, "n_dropped": 0, "mean": mean, "std": 0.05, "ci_low": low, "ci_high": high, "level": 0.95}


def report(f1_mean: float = 0.71, accuracy: float = 23 / 30) -> dict[str, Any]:
    """One model's evaluation report (``outputs/evaluate/reports/<model>.json``), the fields the card reads."""
    per_class = {}
    for i, name in enumerate(CLASSES):
        tp, actual, predicted = CONFUSION[i][i], sum(CONFUSION[i]), sum(r[i] for r in CONFUSION)
        precision, recall = tp / predicted, tp / actual
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall),
            "support": actual,
        }
    return {
        "accuracy": accuracy,
        "f1_macro": 0.76,
        "fold_f1_macro_mean": f1_mean,
        "per_class": per_class,
        "confusion_matrix": CONFUSION,
        "fold_summary": {
            "f1_macro": _summary(f1_mean, f1_mean - 0.12, f1_mean + 0.1),
            "accuracy": _summary(accuracy, accuracy - 0.1, accuracy + 0.1),
            **{f"recall_{c}": _summary(0.7, 0.5, 0.9) for c in CLASSES},
        },
        "calibration": {"temperature": 1.7, "temperature_at_bound": False, "ece_before": 0.21, "ece_after": 0.08},
        "referral": {
            "confidence_threshold": 0.62,
            "coverage": 0.6,
            "accepted_accuracy": 0.94,
            "accepted_target_recall": 0.9,
            "target_met": True,
            "max_error": 0.1,
            "confidence": 0.95,
            "accepted_error_upper": 0.09,
            "accepted_recall_lower": 0.86,
        },
    }


def metadata(init: str = "imagenet (IMAGENET1K_V2)") -> dict[str, Any]:
    """A bundle's metadata as a dict (``dataclasses.asdict(ModelMetadata)``), the fields the card reads."""
    return {
        "arch": "resnet50",
        "classes": list(CLASSES),
        "tile_size": 256,
        "input_size": 224,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "dropout": 0.5,
        "test_crops": 5,
        "test_flips": True,
        "provenance": {
            "init": init,
            "refit_steps": 240,
            "params_hash": "p-new",
            "git_commit": "abc1234",
            "folds_digest": "folds-1",
        },
        "versions": {"torch": "2.13.0", "numpy": "2.1.0", "mlflow": "3.17.0"},
        "stain": {"method": "reinhard"},
        "referral": None,
        "input_checks": {"min_size": 128, "min_tissue_fraction": 0.3},
        "runtime": {"engine": "onnx-fp32", "reason": "INT8 was not scored out of fold"},
        "format_version": 5,
    }


def sources(version: str = "3", previous: dict[str, Any] | None = None, **changes: Any) -> CardSources:
    """Card sources of a version that beats its baseline and met its referral targets."""
    base = CardSources(
        model={
            "name": "bone-tumor-classifier",
            "version": version,
            "alias": "champion",
            "run_id": "r" * 32,
            "cv_run_id": "c" * 32,
            "registered_at": "2026-12-03T09:00:00+00:00",
        },
        metadata=metadata(),
        scores=report(),
        baseline=report(f1_mean=0.62, accuracy=0.7),
        baseline_what={
            "model": "random forest",
            "trees": 500,
            "features": "RGB and HSV histograms, 16 bins per channel",
            "tile_size": 128,
            "stain_normalization": False,
        },
        others={"vgg19_bn": {"fold_f1_macro_mean": 0.55, "accuracy": 0.6}},
        data={
            "tiles": 30,
            "slides": 12,
            "patients": 4,
            "per_class": dict.fromkeys(CLASSES, 10),
            "data_version": "data-1",
            "dvc_md5": "d41d8cd98f00b204e9800998ecf8427e.dir",
            "restore": {"restorable": True, "commands": ["git checkout abc1234", "dvc checkout data/sample.dvc"]},
            "synthetic": {"use_synthetic": False, "reason": "GAN tiles did not help on the folds"},
            "group_by": "slide",
        },
        test=None,
        gate={"promoted": True, "reason": "first champion"},
        previous=previous,
        settings={"target_class": "Viable-Tumor", "target_recall": 0.9, "max_error": 0.1, "confidence_level": 0.95},
    )
    data = copy.deepcopy(base.to_dict())
    data.update(changes)
    return CardSources.from_dict(data)
