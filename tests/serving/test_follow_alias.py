"""A real `bentoml serve` follows `@champion` in a real registry: promote a version, the next answers change."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import mlflow
import pytest
import requests
from bento_server import MODEL_NAME, TILES, BentoServer, register_model, write_registry_project
from mlflow.tracking import MlflowClient

from bonetumor.config import TrackingConfig
from bonetumor.registry.model_registry import STATUS_TAG, promote
from bonetumor.registry.tracking import setup_mlflow

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def predict(url: str) -> requests.Response:
    return requests.post(f"{url}/predict", files={"image": (TILES[0].name, TILES[0].read_bytes())}, timeout=60)


def wait_for_version(url: str, version: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = predict(url).json()
        if answer["model"]["version"] == version:
            return answer
        time.sleep(0.3)
    pytest.fail(f"the service did not move to version {version} within {timeout} s")


def test_a_promoted_version_is_served_next_without_a_restart_or_a_dropped_request(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    write_registry_project(tmp_path, serving={"reload_seconds": 1})
    first = register_model(tmp_path, seed=0)
    second = register_model(tmp_path, seed=1, alias="challenger", card=False)  # as if registered before cards
    server = BentoServer.start(tmp_path, first)
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            response = predict(server.url)
            statuses.append(response.status_code)
            if response.status_code == 200:
                versions.append(response.json()["model"]["version"])

    try:
        before = predict(server.url).json()
        assert before["model"]["version"] == first
        assert (
            f"# Model card: {MODEL_NAME} version {first} " in requests.get(f"{server.url}/model_card", timeout=30).text
        )
        client_thread = threading.Thread(target=keep_asking)
        client_thread.start()
        setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), tmp_path)
        promote(MODEL_NAME, second, "champion", reason="reviewed")
        after = wait_for_version(server.url, second)
        time.sleep(1)
        stop.set()
        client_thread.join(timeout=60)
        # Every request in flight during the swap was answered, first by the old version, then by the new.
        assert set(statuses) == {200}
        assert versions == sorted(versions, key=int)
        assert set(versions) == {first, second}
        assert after["probabilities"] != before["probabilities"]  # other weights answer
        assert requests.get(f"{server.url}/model_info", timeout=30).json()["version"] == second
        # The card follows the alias too: the new version has none, and the answer says how to write one.
        card = requests.get(f"{server.url}/model_card", timeout=30)
        assert card.status_code == 404
        assert f"version {second} has no model card" in card.text
        assert f"bonetumor model-card {second} --log" in card.text

        # An alias that points at a registration that never finished is not followed.
        third = register_model(tmp_path, seed=2, alias="challenger")
        setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), tmp_path)
        client = MlflowClient()
        client.set_model_version_tag(MODEL_NAME, third, STATUS_TAG, "pending")
        client.set_registered_model_alias(MODEL_NAME, "champion", third)
        time.sleep(4)
        assert predict(server.url).json()["model"]["version"] == second
        info = requests.get(f"{server.url}/model_info", timeout=30).json()
        assert "'pending', not 'ready'" in info["alias_check"]["error"]

        # Nor is one whose logged model cannot be loaded (here its MLmodel file is gone).
        fourth = register_model(tmp_path, seed=3, alias="challenger")
        setup_mlflow(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"), tmp_path)
        source = str(client.get_model_version(MODEL_NAME, fourth).source)  # models:/m-<logged model id>
        logged = client.get_logged_model(source.removeprefix("models:/"))
        (Path(str(logged.artifact_location).removeprefix("file://")) / "MLmodel").unlink()
        client.set_registered_model_alias(MODEL_NAME, "champion", fourth)
        time.sleep(4)
        assert predict(server.url).json()["model"]["version"] == second
        info = requests.get(f"{server.url}/model_info", timeout=30).json()
        assert f"version {fourth} does not load from the registry" in info["alias_check"]["error"]
    finally:
        stop.set()
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        server.stop()
