import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES
from PIL import Image

from bonetumor.errors import ArtifactError
from bonetumor.evaluate import plot_confusion, rank_architectures, read_oof, score_oof
from bonetumor.metrics import classification_metrics, macro_f1


def oof_frame(labels: list[str], predictions: list[str], folds: list[int]) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"path": [f"t{i}.jpg" for i in range(len(labels))], "label": labels, "prediction": predictions}
    )
    frame["fold"] = folds
    for c in CLASSES:
        frame[f"prob_{c}"] = (frame["prediction"] == c).astype(float)
    return frame


def test_metrics_known_answer() -> None:
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(y_true, y_pred, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class"]["Non-Viable-Tumor"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert m["per_class"]["Viable-Tumor"]["recall"] == 0.5
    assert m["f1_macro"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))


def test_macro_f1_ignores_a_class_absent_from_labels_and_predictions() -> None:
    assert macro_f1([0, 0, 1], [0, 0, 1]) == 1.0  # class 2 absent: not a zero in the average
    assert macro_f1([0, 0, 1], [0, 2, 1]) < 1.0  # predicting an absent class is still an error


def test_score_oof_reports_per_fold_mean_and_spread() -> None:
    oof = oof_frame(
        ["Non-Tumor", "Viable-Tumor", "Non-Tumor", "Viable-Tumor"],
        ["Non-Tumor", "Viable-Tumor", "Viable-Tumor", "Viable-Tumor"],
        [0, 0, 1, 1],
    )
    scores = score_oof(oof, CLASSES)
    assert scores["fold_f1_macro"][0] == 1.0
    assert scores["fold_f1_macro"][1] == pytest.approx(np.mean([0.0, 2 / 3]))
    assert scores["fold_f1_macro_mean"] == pytest.approx(np.mean(scores["fold_f1_macro"]))
    assert scores["fold_f1_macro_std"] > 0
    json.dumps(scores)  # everything is plain JSON for DVC and MLflow


def test_ranking_uses_fold_f1_then_accuracy_then_configured_order() -> None:
    scores = {
        "a": {"fold_f1_macro_mean": 0.7, "accuracy": 0.8},
        "b": {"fold_f1_macro_mean": 0.9, "accuracy": 0.5},
        "c": {"fold_f1_macro_mean": 0.7, "accuracy": 0.9},
        "d": {"fold_f1_macro_mean": 0.7, "accuracy": 0.8},
    }
    assert rank_architectures(scores, ["d", "a", "b", "c"]) == ["b", "c", "d", "a"]


def test_confusion_plot_is_a_png(tmp_path: Path) -> None:
    out = plot_confusion([[3, 1, 0], [0, 0, 0], [2, 0, 4]], CLASSES, "test", tmp_path / "cm.png")
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.width > 500


def test_unreadable_oof_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="run `bonetumor train` first"):
        read_oof(tmp_path / "missing.csv", CLASSES)
    (tmp_path / "oof.csv").write_text("path,label\nx,y\n")
    with pytest.raises(ArtifactError, match=r"missing column\(s\)"):
        read_oof(tmp_path / "oof.csv", CLASSES)
