import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import CLASSES, DatasetFactory, tiny_params
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from bonetumor.balance.gan import run_balance
from bonetumor.config import Config
from bonetumor.data.ingest import ingest, run_ingest
from bonetumor.data.manifest import read_manifest
from bonetumor.data.split import run_split
from bonetumor.errors import ArtifactError
from bonetumor.evaluation.evaluate import run_evaluation
from bonetumor.registry.register import run_registration
from bonetumor.registry.tracking import data_version
from bonetumor.serving.predictor import Predictor
from bonetumor.training.cross_validation import run_cross_validation
from bonetumor.transforms.augment import run_augment
from bonetumor.transforms.decode import decode_image
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


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_the_refit_model_is_scored_once_on_the_held_out_test_set(make_dataset: DatasetFactory, tmp_path: Path) -> None:
    # The stages in process, cheap settings: 12 generated slides of 3 tiles, a quarter of them held out, 2 folds,
    # ResNet50 only, 2 steps on one thread, no GAN, no Grad-CAM, no ONNX export, no validation suite.
    source = make_dataset(per_slide=3, slides=4, size=40)
    params = tiny_params(
        data={"source": str(source)},
        split={"test_fraction": 0.25},
        balance={"enabled": False},
        train={"architectures": ["resnet50"], "progress": False, "num_threads": 1},
        evaluate={"gradcam_per_class": 0},
        register={"export_onnx": False},
        tracking={"uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    config = Config.from_dict(params)
    out = tmp_path / "outputs"
    manifest_path = out / "ingest" / "manifest.csv"
    run_ingest(config, tmp_path, out / "ingest")
    folds = run_split(config, manifest_path, out / "split")
    run_augment(config, manifest_path, out / "augment")
    run_balance(config, manifest_path, out / "split" / "folds.json", out / "balance", project_dir=tmp_path)
    args = (manifest_path, out / "split" / "folds.json", out / "augment" / "policy.json", out / "balance")
    run_cross_validation(config, *args, out / "train", tmp_path)
    run_evaluation(config, out / "train", out / "evaluate", tmp_path)
    champion = run_registration(
        config,
        manifest_path,
        out / "augment" / "policy.json",
        out / "balance",
        out / "train",
        out / "evaluate",
        out / "register",
        tmp_path,
        out / "split" / "folds.json",
    )

    # The test tiles are whole slides that no fold saw.
    test_paths = sorted(folds["test_paths"])
    assert 0 < len(test_paths) < 36
    oof = pd.read_csv(out / "train" / "resnet50" / "oof.csv")
    assert not set(oof["path"]) & set(test_paths)
    assert len(oof) + len(test_paths) == 36
    manifest = read_manifest(manifest_path).set_index("path")
    assert not set(manifest.loc[test_paths, "slide"]) & set(manifest.loc[list(oof["path"]), "slide"])

    # The figures, recomputed from the registered bundle's own predictions on those tiles.
    predictor = Predictor.from_bundle(out / "register" / "bundle")
    answers = predictor.predict_images([decode_image(manifest_path.parent / p) for p in test_paths])
    y_true = [CLASSES.index(str(label)) for label in manifest.loc[test_paths, "label"]]
    y_pred = [CLASSES.index(a["label"]) for a in answers]
    present = sorted(set(y_true) | set(y_pred))
    test = champion["test"]
    assert test["n"] == len(test_paths)
    assert test["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert test["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="macro"))
    assert test["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, labels=present, average="weighted"))
    assert test["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    accepted = [not a["referral"]["refer"] for a in answers]
    assert test["referral_coverage"] == pytest.approx(sum(accepted) / len(accepted))
    assert json.loads((out / "register" / "test_metrics.json").read_text()) == test

    # Recorded on the refit run and on the registered version.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    metrics = client.get_run(champion["run_id"]).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(test["accuracy"])
    assert metrics["test_f1_macro"] == pytest.approx(test["f1_macro"])
    for name in CLASSES:
        assert metrics[f"test_recall_{name}"] == pytest.approx(test["per_class"][name]["recall"])
    assert "evaluation/test_metrics.json" in {a.path for a in client.list_artifacts(champion["run_id"], "evaluation")}
    version = client.get_model_version(config.register.model_name, champion["version"])
    assert version.tags["bonetumor.test_accuracy"] == f"{test['accuracy']:.4f}"
