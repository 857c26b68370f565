import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import CLASSES, SAMPLE, bundle_metadata
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from bonetumor.cli.main import app
from bonetumor.config import TrackingConfig
from bonetumor.errors import ModelNotFoundError
from bonetumor.registry.model_registry import load_predictor, log_and_register, promote, resolve_version
from bonetumor.registry.tracking import resolve_tracking_uri, setup_mlflow
from bonetumor.serving.predictor import Predictor, save_bundle
from bonetumor.training.models import build_model


def test_relative_sqlite_uri_is_resolved_against_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///x/m.db"), tmp_path) == f"sqlite:///{tmp_path}/x/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://mlflow:5000"


def labelled_model(label: int) -> nn.Module:
    """An untrained ResNet50 whose head's bias makes it call every tile ``CLASSES[label]``, confidently."""
    torch.manual_seed(label)
    model = build_model("resnet50", 3).eval()
    with torch.no_grad():
        model.get_parameter("fc.1.bias").copy_(10.0 * torch.eye(3)[label])
    return model


def test_register_load_and_predict_through_a_real_sqlite_registry(tmp_path: Path) -> None:
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), tmp_path)
    # Two versions with different weights: version 1 calls every tile Non-Tumor, version 2 Viable-Tumor.
    models = {"1": labelled_model(0), "2": labelled_model(2)}
    bundles = {v: save_bundle(m, bundle_metadata(), tmp_path / f"bundle-{v}") for v, m in models.items()}
    tile = (SAMPLE / "images" / "Non-Tumor" / "P9-B6-5195-29864.jpg").read_bytes()
    expected = {v: Predictor(m, bundle_metadata()).predict_bytes(tile) for v, m in models.items()}
    assert (expected["1"]["label"], expected["2"]["label"]) == (CLASSES[0], CLASSES[2])
    with mlflow.start_run() as run:
        first = log_and_register(bundles["1"], bundle_metadata(), "m", "champion", {"bonetumor.data_version": "abc"})
        second = log_and_register(bundles["2"], bundle_metadata(), "m", "champion", {"bonetumor.data_version": "def"})
    assert (str(first.version), str(second.version)) == ("1", "2")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert client.get_model_version("m", "1").tags["bonetumor.data_version"] == "abc"
    assert client.get_model_version("m", "2").run_id == run.info.run_id

    # Each version, by number or by alias, answers with its own weights.
    for alias_or_version, version in (("1", "1"), ("champion", "2")):
        loaded = load_predictor("m", alias_or_version)
        assert (loaded.name, loaded.version) == ("m", version)
        got = loaded.predict_bytes(tile)
        assert got["label"] == expected[version]["label"], alias_or_version
        assert got["probabilities"] == pytest.approx(expected[version]["probabilities"], abs=1e-6)
        assert got["model"] == {"name": "m", "version": version}

    # The CLI answers per tile: a bad file gets an error line, the good one is still classified, exit status 1.
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"register": {"model_name": "m"}, "tracking": {"uri": "sqlite:///mlflow.db"}})
    )
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(tile)
    bad.write_bytes(b"not a jpeg")
    result = CliRunner().invoke(app, ["predict", "--params", str(tmp_path / "params.yaml"), str(bad), str(good)])
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert "not a recognised image" in lines[0]["error"]
    assert lines[1]["label"] == expected["2"]["label"]
    assert (lines[1]["model"]["name"], lines[1]["model"]["version"]) == ("m", "2")
    assert lines[1]["probabilities"] == pytest.approx(expected["2"]["probabilities"], abs=1e-6)
    assert lines[1]["referral"]["reason"].startswith("not enough tissue")  # the near-blank tile, as /predict says

    # Any MLflow client can use the same registered model as a pyfunc on a dataframe of encoded images.
    out = mlflow.pyfunc.load_model("models:/m@champion").predict(pd.DataFrame({"image": [tile]}))
    assert out.loc[0, "label"] == expected["2"]["label"]
    for c in CLASSES:
        assert out.loc[0, f"prob_{c}"] == pytest.approx(expected["2"]["probabilities"][c], abs=1e-6)

    # Moving the alias back (a rollback) moves what it loads: version 1's weights again.
    promote("m", "1", "champion", "rollback")
    rolled_back = load_predictor("m", "champion")
    assert rolled_back.version == "1"
    assert rolled_back.predict_bytes(tile)["probabilities"] == pytest.approx(expected["1"]["probabilities"], abs=1e-6)


def test_missing_model_or_alias_says_how_to_get_one(tmp_path: Path) -> None:
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"no model version nothing@champion at sqlite.*make pipeline"):
        resolve_version("nothing", "champion")
