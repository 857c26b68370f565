from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES
from PIL import Image

from bonetumor.evaluation.plots import (
    normalise_rows,
    per_class_report,
    plot_comparison,
    plot_confusion,
    plot_roc_pr,
    report_markdown,
)


def assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 100
        assert image.height > 100


def test_normalise_rows_divides_by_row_sums_and_keeps_empty_rows_zero() -> None:
    counts = np.array([[8, 2, 0], [0, 0, 0], [1, 3, 6]])
    rates = normalise_rows(counts)
    assert rates[0] == pytest.approx([0.8, 0.2, 0.0])
    assert rates[2] == pytest.approx(counts[2] / 10)
    assert rates[1].tolist() == [0.0, 0.0, 0.0]  # a class without tiles: no division by zero
    assert rates[[0, 2]].sum(axis=1) == pytest.approx([1.0, 1.0])


def test_normalise_rows_rejects_non_square_and_negative() -> None:
    with pytest.raises(ValueError, match="square"):
        normalise_rows([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match="negative"):
        normalise_rows([[1, -1], [0, 2]])


def test_plot_confusion_writes_png(tmp_path: Path) -> None:
    out = plot_confusion([[5, 1, 0], [2, 3, 1], [0, 0, 4]], CLASSES, "test", tmp_path / "cm.png")
    assert out == tmp_path / "cm.png"
    assert_png(out)
    with pytest.raises(ValueError, match="2 classes"):
        plot_confusion([[5, 1, 0], [2, 3, 1], [0, 0, 4]], CLASSES[:2], "test", tmp_path / "bad.png")


def test_roc_pr_is_perfect_on_separable_scores(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(3), 20)
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 0.3, (60, 3))
    probs[np.arange(60), labels] = rng.uniform(0.7, 1.0, 60)  # the true class always ranks first
    result = plot_roc_pr(probs, labels, CLASSES, "separable", tmp_path / "roc.png")
    assert result["roc_auc"] == {c: 1.0 for c in CLASSES}
    assert result["average_precision"] == {c: pytest.approx(1.0) for c in CLASSES}
    assert result["roc_auc_macro"] == 1.0
    assert_png(tmp_path / "roc.png")


def test_roc_pr_is_chance_on_random_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 3000)
    probs = rng.dirichlet(np.ones(3), 3000)
    result = plot_roc_pr(probs, labels, CLASSES, "random", tmp_path / "roc.png")
    for name in CLASSES:
        assert result["roc_auc"][name] == pytest.approx(0.5, abs=0.04)
        # Average precision of random scores is the class prevalence.
        prevalence = float(np.mean(labels == CLASSES.index(name)))
        assert result["average_precision"][name] == pytest.approx(prevalence, abs=0.04)


def test_roc_pr_absent_class_is_none_and_left_out_of_macro(tmp_path: Path) -> None:
    labels = np.array(["Non-Tumor"] * 5 + ["Viable-Tumor"] * 5)  # class names are accepted too
    probs = np.zeros((10, 3))
    probs[:5, 0] = 0.9
    probs[5:, 2] = 0.9
    probs[:, 1] = 0.1
    result = plot_roc_pr(probs, labels, CLASSES, "absent", tmp_path / "roc.png")
    assert result["roc_auc"]["Non-Viable-Tumor"] is None
    assert result["average_precision"]["Non-Viable-Tumor"] is None
    assert result["roc_auc"]["Non-Tumor"] == 1.0
    assert result["roc_auc_macro"] == 1.0
    assert_png(tmp_path / "roc.png")


def test_roc_pr_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        plot_roc_pr(np.zeros((4, 2)), np.array([0, 1, 2, 0]), CLASSES, "bad", tmp_path / "roc.png")


def test_per_class_report_matches_hand_computed_case() -> None:
    # class 0: 3 tiles, 2 found, 3 predicted; class 1: 1 tile, found, 2 predicted; class 2: 2 tiles, 1 found.
    report = per_class_report([0, 0, 0, 1, 2, 2], [0, 0, 1, 1, 2, 0], CLASSES)
    nt, nv, vt = (report["per_class"][c] for c in CLASSES)
    assert nt == {
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(2 / 3),
        "support": 3,
    }
    assert nv == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert vt == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["macro"]["precision"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert report["weighted"]["precision"] == pytest.approx((3 * 2 / 3 + 1 * 1 / 2 + 2 * 1) / 6)
    assert report["weighted"]["recall"] == pytest.approx(4 / 6)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["n"] == 6


def test_per_class_report_absent_class_is_zero_and_names_work() -> None:
    report = per_class_report(["Non-Tumor", "Viable-Tumor"], ["Non-Tumor", "Viable-Tumor"], CLASSES)
    assert report["per_class"]["Non-Viable-Tumor"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["Viable-Tumor"]["f1"] == 1.0
    with pytest.raises(ValueError, match="unknown class"):
        per_class_report(["Bone"], ["Non-Tumor"], CLASSES)


def test_report_markdown_has_a_row_per_class_and_averages() -> None:
    report = per_class_report([0, 0, 0, 1, 2, 2], [0, 0, 1, 1, 2, 0], CLASSES)
    text = report_markdown(report, CLASSES)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(CLASSES) + 2  # header, classes, macro and weighted
    assert "| Non-Viable-Tumor | 0.500 | 1.000 | 0.667 | 1 |" in text
    assert "Accuracy: 0.667 (n=6)" in text


def test_plot_comparison_writes_png_with_and_without_intervals(tmp_path: Path) -> None:
    scores: dict[str, dict[str, float | None]] = {
        "resnet50": {"f1_macro": 0.8, "f1_macro_ci_low": 0.7, "f1_macro_ci_high": 0.9, "accuracy": 0.85},
        "vgg19": {"f1_macro": 0.75, "f1_macro_ci_low": None, "f1_macro_ci_high": None, "accuracy": 0.8},
    }
    out = plot_comparison(scores, ["f1_macro", "accuracy"], "comparison", tmp_path / "cmp.png")
    assert_png(out)
    with pytest.raises(ValueError, match="nothing to compare"):
        plot_comparison({}, ["f1_macro"], "empty", tmp_path / "none.png")
