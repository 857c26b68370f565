"""``bonetumor check`` (run by ``make pipeline`` before ``dvc repro``): mistakes are named before any output is
deleted, with a hint for a misspelt key, a missing class folder, absent weights, a dead server or a locked store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port
from typer.testing import CliRunner

from bonetumor.cli.main import app
from bonetumor.config import Config
from bonetumor.errors import ConfigError
from bonetumor.stages import preflight

runner = CliRunner()


def _project(tmp_path: Path, sample_images: Path, **sections: dict[str, object]) -> Path:
    params = {"data": {"source": str(sample_images)}, "tracking": {"uri": "sqlite:///mlflow.db"}, **sections}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_repository_params_pass() -> None:
    lines = preflight(REPO / "params.yaml")
    assert any("data/sample/images: Non-Tumor 10, Non-Viable-Tumor 10, Viable-Tumor 10" in line for line in lines)
    assert any(line.startswith("resnet50: ") for line in lines)


def test_a_valid_project_passes_and_creates_nothing(tmp_path: Path, sample_images: Path) -> None:
    lines = preflight(_project(tmp_path, sample_images))
    assert any("Non-Tumor 10, Non-Viable-Tumor 10, Viable-Tumor 10" in line for line in lines)
    assert any("new sqlite database" in line for line in lines)
    assert not (tmp_path / "mlflow.db").exists()  # the check creates nothing


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ({"train": {"epoch": 3}}, "train.epoch: unknown key (did you mean 'epochs'? That key was replaced by steps"),
        ({"train": {"stepz": 3}}, "train.stepz: unknown key (did you mean 'steps'?)"),
        ({"serving": {"runtim": "torch"}}, "serving.runtim: unknown key (did you mean 'runtime'?)"),
        ({"trian": {"steps": 3}}, "unknown section(s) ['trian'] (did you mean 'train'?)"),
    ],
)
def test_a_misspelt_key_gets_a_did_you_mean(raw: dict[str, dict[str, object]], hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(raw, source="params.yaml")
    assert hint in str(caught.value)


def test_a_typo_fails_the_check_in_one_line(tmp_path: Path, sample_images: Path) -> None:
    params = _project(tmp_path, sample_images, train={"epoch": 3})
    result = runner.invoke(app, ["check", "--params", str(params)])
    assert result.exit_code == 1
    assert "train.epoch: unknown key (did you mean 'epochs'?" in result.output
    assert "Traceback" not in result.output


def test_every_problem_is_listed_at_once(tmp_path: Path, sample_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "images" / "Non-Tumor").mkdir(parents=True)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "data": {"source": "images"},
                "train": {"architectures": ["resnet50"], "weights": "imagenet"},
                "tracking": {"uri": f"http://127.0.0.1:{free_port()}"},
            }
        )
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError) as caught:
        preflight(params)
    message = str(caught.value)
    assert "3 problem(s) found before the pipeline touched any output" in message
    assert "class folders do not match the class set" in message
    assert "train.weights=imagenet: no ImageNet weights for resnet50" in message
    assert "bonetumor weights fetch resnet50" in message
    assert "is not reachable" in message
    assert "start it (mlflow server ...) or set MLFLOW_TRACKING_URI" in message


def test_a_store_locked_by_another_run_is_named(tmp_path: Path, sample_images: Path) -> None:
    params = _project(tmp_path, sample_images)
    holder = sqlite3.connect(tmp_path / "mlflow.db")
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")  # what a second pipeline mid-write looks like
    try:
        from bonetumor.runtime import check_tracking_store

        with pytest.raises(ConfigError, match=r"another process holds the lock on mlflow\.db"):
            check_tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}", timeout=0.2)
        with pytest.raises(ConfigError, match="another run"):
            preflight(params)
    finally:
        holder.rollback()
        holder.close()
    assert any("not locked" in line for line in preflight(params))


def test_make_pipeline_checks_before_dvc_repro() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\npipeline:", 1)[1].split("\n\n", 1)[0]
    assert recipe.index("bonetumor check") < recipe.index("dvc repro")
