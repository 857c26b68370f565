import json
import math
from pathlib import Path

import pytest
from conftest import CLASSES

from bonetumor.config import Config
from bonetumor.data.ingest import ingest
from bonetumor.errors import ArtifactError
from bonetumor.registry.register import run_registration
from bonetumor.registry.tracking import data_version
from bonetumor.utils import write_json


def test_data_version_follows_the_tiles_not_their_paths(sample_copy: Path, tmp_path: Path) -> None:
    ingest(sample_copy, CLASSES, tmp_path / "a" / "manifest.csv")
    ingest(sample_copy, CLASSES, tmp_path / "b" / "c" / "manifest.csv", copy_images_to=tmp_path / "b" / "c" / "images")
    assert data_version(tmp_path / "a" / "manifest.csv") == data_version(tmp_path / "b" / "c" / "manifest.csv")
    # Relabelling one tile is new data.
    tile = next((sample_copy / "Non-Tumor").iterdir())
    tile.rename(sample_copy / "Viable-Tumor" / tile.name)
    ingest(sample_copy, CLASSES, tmp_path / "d" / "manifest.csv")
    assert data_version(tmp_path / "d" / "manifest.csv") != data_version(tmp_path / "a" / "manifest.csv")


def test_a_stale_evaluation_never_registers(tmp_path: Path) -> None:
    write_json(tmp_path / "train" / "runs.json", {"architectures": {"resnet50": {"run_id": "new", "refit_steps": 1}}})
    write_json(
        tmp_path / "evaluate" / "comparison.json",
        {"winner": "resnet50", "scores": {"resnet50": {}}, "cv_run_ids": {"resnet50": "old"}, "ranking": ["resnet50"]},
    )
    with pytest.raises(ArtifactError, match="the evaluation is stale"):
        run_registration(
            Config(),
            tmp_path / "m.csv",
            tmp_path / "p.json",
            tmp_path / "balance",
            tmp_path / "train",
            tmp_path / "evaluate",
            tmp_path / "register",
            tmp_path,
            tmp_path / "folds.json",
        )
    assert not (tmp_path / "register").exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before touching MLflow


def test_undefined_metrics_are_written_as_null(tmp_path: Path) -> None:
    write_json(tmp_path / "m.json", {"f1": math.nan, "per_fold": [1.0, math.inf]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"f1": None, "per_fold": [1.0, None]}
