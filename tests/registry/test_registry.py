import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from conftest import CLASSES, SAMPLE, bundle_metadata
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from bonetumor.cli.main import app
from bonetumor.config import TrackingConfig
from bonetumor.errors import ModelNotFoundError
from bonetumor.registry.model_registry import load_predictor, log_and_register, resolve_version
from bonetumor.registry.tracking import resolve_tracking_uri, setup_mlflow
from bonetumor.serving.predictor import save_bundle
from bonetumor.training.models import build_model


def test_relative_sqlite_uri_is_resolved_against_the_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_tracking_uri(TrackingConfig(uri="sqlite:///x/m.db"), tmp_path) == f"sqlite:///{tmp_path}/x/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "http://mlflow:5000"


def test_register_load_and_predict_through_a_real_sqlite_registry(tmp_path: Path) -> None:
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t"), tmp_path)
    torch.manual_seed(0)
    bundle = save_bundle(build_model("resnet50", 3).eval(), bundle_metadata(), tmp_path / "bundle")
    with mlflow.start_run() as run:
        first = log_and_register(bundle, bundle_metadata(), "m", "champion", {"bonetumor.data_version": "abc"})
        second = log_and_register(bundle, bundle_metadata(), "m", "champion", {"bonetumor.data_version": "def"})
    assert (str(first.version), str(second.version)) == ("1", "2")
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert client.get_model_version("m", "1").tags["bonetumor.data_version"] == "abc"
    assert client.get_model_version("m", "2").run_id == run.info.run_id

    predictor = load_predictor("m", "champion")
    assert (predictor.name, predictor.version) == ("m", "2")
    tile = (SAMPLE / "images" / "Non-Tumor" / "P9-B6-5195-29864.jpg").read_bytes()
    answer = predictor.predict_bytes(tile)
    assert answer["model"] == {"name": "m", "version": "2"}

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
    assert lines[1]["label"] == answer["label"]
    assert lines[1]["model"] == {"name": "m", "version": "2"}

    # Any MLflow client can use the same registered model as a pyfunc on a dataframe of encoded images.
    pyfunc = mlflow.pyfunc.load_model("models:/m@champion")
    out = pyfunc.predict(pd.DataFrame({"image": [tile]}))
    assert out.loc[0, "label"] == answer["label"]
    assert out.loc[0, f"prob_{CLASSES[0]}"] == pytest.approx(answer["probabilities"][CLASSES[0]], abs=1e-6)


def test_missing_model_or_alias_says_how_to_get_one(tmp_path: Path) -> None:
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"no model version nothing@champion at sqlite.*make pipeline"):
        resolve_version("nothing", "champion")
