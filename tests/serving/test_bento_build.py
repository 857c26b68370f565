"""`make bento`'s two steps, offline: the project wheel (with the page) and `bentoml build` of bentofile.yaml."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, venv_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_bento_builds_offline_with_the_service_the_params_and_the_wheel(tmp_path: Path) -> None:
    context = tmp_path / "context"
    dist = context / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), "."],
        cwd=REPO,
        check=True,
        timeout=300,
    )
    wheel = next(dist.glob("bonetumor-*.whl"))
    assert {"bonetumor/serving/ui/index.html", "bonetumor/serving/ui/app.js"} <= set(zipfile.ZipFile(wheel).namelist())
    # Built from a copy whose bentofile points at this wheel: the repository's own dist/ is left alone.
    (context / "serving").mkdir(parents=True)
    (context / "serving" / "service.py").write_bytes((REPO / "serving" / "service.py").read_bytes())
    (context / "params.yaml").write_bytes((REPO / "params.yaml").read_bytes())
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert bentofile["python"]["lock_packages"] is False  # locking resolves every dependency online
    bentofile["python"]["wheels"] = [f"dist/{wheel.name}"]  # bentoml accepts paths inside the context only
    (context / "bentofile.yaml").write_text(yaml.safe_dump(bentofile))
    home = tmp_path / "bentoml-home"
    result = subprocess.run(
        ["bentoml", "build", "."], cwd=context, env=venv_env(BENTOML_HOME=str(home)), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (bento,) = [p for p in (home / "bentos" / "bone-tumor-classifier").iterdir() if p.name != "latest"]
    assert (bento / "src" / "serving" / "service.py").is_file()
    assert (bento / "src" / "params.yaml").is_file()
    assert [w.name for w in (bento / "env" / "python" / "wheels").iterdir()] == [wheel.name]
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    assert manifest["service"] == "serving.service:BoneTumorClassifier"
    routes = {api["route"] for api in manifest["schema"]["routes"]}
    assert {"/predict", "/predict_batch", "/explain", "/model_info"} <= routes
