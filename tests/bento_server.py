"""A real registry and a real ``bentoml serve`` for the HTTP, page and reload tests (fixture ``served``).

``register_model`` writes a small (40 px tiles, 32 px views, untrained ResNet50) bundle with a Reinhard stain
target, a referral rule, input checks and its ONNX files, exactly as ``register`` lays one out, and registers it in
a sqlite MLflow registry. ``BentoServer`` runs ``bentoml serve`` on it as a subprocess on a free port.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import card_fixtures
import mlflow
import pytest
import requests
import torch
import yaml
from conftest import CLASSES, REPO, SAMPLE, bundle_metadata, free_port, venv_env

from bonetumor.config import TrackingConfig
from bonetumor.evaluation.calibration import ReferralPolicy
from bonetumor.registry.model_card import log_model_card
from bonetumor.registry.model_registry import log_and_register
from bonetumor.registry.tracking import setup_mlflow
from bonetumor.serving.engines import ONNX_DIR, decide_runtime
from bonetumor.serving.predictor import ModelMetadata, save_bundle
from bonetumor.training.candidates.int8 import int8_classifier
from bonetumor.training.models import build_model
from bonetumor.transforms.stain import StainNormalizer, fit_from_files
from bonetumor.transforms.tta import with_views

#: A referral rule that refers every tile below 0.99 confidence: an untrained model is never that sure.
REFER_BELOW = 0.99
MODEL_NAME = "bone-tumor-classifier"
TILES = sorted((SAMPLE / "images").rglob("*.jpg"))


def served_metadata(runtime: dict[str, Any] | None = None) -> ModelMetadata:
    """The test model's metadata with a Reinhard stain target, a referral rule and input checks."""
    stain = fit_from_files("reinhard", TILES[:8])
    referral = ReferralPolicy(
        classes=CLASSES,
        temperature=1.5,
        confidence_threshold=REFER_BELOW,
        target_class="Viable-Tumor",
        target_recall=0.95,
        safe_class="Non-Tumor",
        max_target_prob_when_safe=0.2,
        n_tiles=30,
        coverage=0.1,
        accepted_accuracy=1.0,
        accepted_target_recall=1.0,
        target_met=True,
    )
    return dataclasses.replace(
        bundle_metadata(),
        stain=None if stain is None else stain.to_dict(),
        referral=referral.to_dict(),
        provenance={
            "data_version": "abc",
            "init": "scratch (no ImageNet weights available)",
            "trained_at": "2026-12-01T10:00:00+00:00",
        },
        input_checks={"min_size": 128, "min_tissue_fraction": 0.25},
        runtime=runtime,
    )


def write_registry_project(root: Path, serving: dict[str, Any] | None = None) -> None:
    """A project folder whose params.yaml points at ``root/mlflow.db`` (and sets ``serving`` options)."""
    params: dict[str, Any] = {"tracking": {"uri": "sqlite:///mlflow.db"}}
    params["serving"] = {"prediction_log": "predictions.jsonl", "max_upload_bytes": 2_000_000, **(serving or {})}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def register_model(root: Path, seed: int, alias: str = "champion", onnx: bool = True, card: bool = True) -> str:
    """Register an untrained model (weights from ``seed``) with ONNX FP32 + INT8 files; return its version.

    With ``card``, the version gets a model card, as registration gives one (its figures are the test fixture's).
    """
    setup_mlflow(TrackingConfig(uri=f"sqlite:///{root}/mlflow.db"), root)
    torch.manual_seed(seed)
    model = build_model("resnet50", 3).eval()
    bundle = root / f"bundle-{seed}"
    meta = served_metadata()
    save_bundle(model, meta, bundle)
    if onnx:
        stain = StainNormalizer.from_dict(meta.stain) if meta.stain else None
        int8_classifier(
            with_views(model, meta.views),
            meta.preprocess,
            stain,
            TILES[:6],
            bundle / ONNX_DIR,
            "model",
            classes=CLASSES,
        )
    # No out-of-fold INT8 score here, so the decision is FP32, as for a pipeline run without candidates.int8.
    meta = dataclasses.replace(meta, runtime=decide_runtime("resnet50", {"resnet50": {"f1_macro": 0.5}}, 0.01, onnx))
    save_bundle(model, meta, bundle)

    def log_card(pending: Any) -> dict[str, str]:
        sources = card_fixtures.sources(str(pending.version), metadata=dataclasses.asdict(meta))
        return log_model_card(sources, root / f"card-{seed}")

    with mlflow.start_run():
        version = log_and_register(bundle, meta, MODEL_NAME, alias, {}, before_ready=log_card if card else None)
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    return str(version.version)


@dataclass
class BentoServer:
    """A ``bentoml serve`` subprocess of the project in ``root``."""

    root: Path
    url: str
    version: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, root: Path, version: str, **env: str) -> BentoServer:
        """Start serving and wait until ``/readyz`` answers 200 (fails the test with the log otherwise)."""
        port = free_port()
        log_path = root / f"bentoml-{port}.log"
        log = log_path.open("w")
        process = subprocess.Popen(
            ["bentoml", "serve", "service:BoneTumorClassifier", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO / "serving",
            env=venv_env(
                BONETUMOR_PROJECT_DIR=str(root),
                BENTOML_HOME=str(root / "bentoml-home"),
                TMPDIR=str(root / "tmp"),
                **env,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        server = cls(root, f"http://127.0.0.1:{port}", version, process, log_path)
        server.wait_ready()
        return server

    def wait_ready(self, timeout: float = 120) -> float:
        """Wait for ``/readyz``; return the seconds it took."""
        started = time.monotonic()
        while True:
            try:
                if requests.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except (requests.ConnectionError, requests.Timeout):
                pass
            if self.process.poll() is not None or time.monotonic() - started > timeout:
                self.stop()
                pytest.fail(f"bentoml serve did not become ready:\n{self.log()[-5000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the server and its workers."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def serve_session(root: Path) -> BentoServer:
    """Register one model in a fresh project at ``root`` and serve it."""
    (root / "tmp").mkdir()
    write_registry_project(root)
    return BentoServer.start(root, register_model(root, seed=0))


#: A small slide for the /assess tests: 6 x 5 tiles of 256 px at 4 um/px (1024 um each), glass around tissue.
ASSESS_LAYOUT: tuple[str, ...] = (
    "......",
    ".NXXV.",
    ".XVVN.",
    "..NX..",
    "......",
)


def tissue_tile_source(min_tissue: float = 0.6) -> Any:
    """Sample tiles per class with at least ``min_tissue`` tissue, in turn: none is skipped as glass when read."""
    import itertools

    from PIL import Image

    from bonetumor.slide.demo import CELL_CLASSES
    from bonetumor.transforms.tissue import tissue_fraction

    cycles: dict[str, Any] = {}
    for name in CELL_CLASSES.values():
        tiles = []
        for path in sorted((SAMPLE / "images" / name).glob("*.jpg")):
            with Image.open(path) as image:
                tile = image.convert("RGB")
            if tissue_fraction(tile) >= min_tissue:
                tiles.append(tile)
        assert tiles, f"no sample tile of {name} with {min_tissue:.0%} tissue"
        cycles[name] = itertools.cycle(tiles)

    def tile_for(name: str, index: int) -> Any:
        return next(cycles[name]).copy()

    return tile_for


def write_test_slide(path: Path, layout: tuple[str, ...] = ASSESS_LAYOUT) -> Path:
    """A pyramidal TIFF slide (OpenSlide ``generic-tiff``, mpp 4.0) of real tissue tiles on a known layout."""
    from bonetumor.slide.demo import write_demo_slide

    return write_demo_slide(path, tissue_tile_source(), layout=layout, tile_px=256, mpp=4.0)


def serve_project(root: Path, registry: Path, version: str, params: dict[str, Any]) -> BentoServer:
    """Serve, from a project of its own at ``root`` (``params``), the model registered in ``registry``'s MLflow."""
    (root / "tmp").mkdir(exist_ok=True)
    project: dict[str, Any] = {"tracking": {"uri": f"sqlite:///{registry / 'mlflow.db'}"}}
    for section, values in params.items():
        project.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(project))
    return BentoServer.start(root, version)
