from pathlib import Path

import yaml
from typer.testing import CliRunner

from bonetumor.cli.main import app

runner = CliRunner()


def test_help_lists_every_stage() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "validate", "split", "augment", "balance", "train", "evaluate", "register", "predict"):
        assert command in result.output


def test_bad_params_exit_1_with_the_field_named(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"split": {"n_folds": 1}}))
    result = runner.invoke(app, ["split", "--params", str(params)])
    assert result.exit_code == 1
    assert "split.n_folds" in result.output
    assert "Traceback" not in result.output


def test_ingest_of_a_missing_folder_is_one_clear_line(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "nowhere"}}))
    result = runner.invoke(app, ["ingest", "--params", str(params), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "nowhere is not a folder" in result.output
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_predict_without_a_registered_model_explains(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tracking": {"uri": "sqlite:///mlflow.db"}}))
    result = runner.invoke(app, ["predict", "--params", str(params), str(tmp_path / "x.jpg")])
    assert result.exit_code == 1
    # Checked before MLflow is asked (which would create an empty database and then report no model).
    assert f"the MLflow database does not exist at {tmp_path / 'mlflow.db'}" in result.output
    assert "run `make pipeline` to train and register a model" in result.output
    assert not (tmp_path / "mlflow.db").exists()
