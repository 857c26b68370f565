"""Shared fixtures: the real sample tiles, generated tiles with a known answer, and tiny configs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import pytest
import yaml
from PIL import Image

from bonetumor.config import Config, load_config
from bonetumor.serving.predictor import ModelMetadata
from bonetumor.transforms.augment import AugmentPolicy

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
CLASSES = ("Non-Tumor", "Non-Viable-Tumor", "Viable-Tumor")
#: A distinct mean colour per class, so generated tiles carry a learnable class signal.
CLASS_COLOURS = {"Non-Tumor": (225, 120, 160), "Non-Viable-Tumor": (150, 60, 200), "Viable-Tumor": (90, 40, 120)}

# Tests never read the developer's downloaded weights: train.weights auto sees an empty TORCH_HOME.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="bonetumor-torch-home-")

# Telemetry off and no progress bars in every test and the subprocesses they start.
for key, value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Tests run offline: train.weights auto must not try a download (its own tests switch this off).
    "BONETUMOR_OFFLINE": "1",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: with the default two, OpenMP's threads crawl when other jobs share the cores
    (366 s against 28 s for the GAN colour test, measured on 2 shared cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def _no_tracking_override_across_modules() -> Iterator[None]:
    """Module and session fixtures (a `dvc repro`, a registered test model) see no MLFLOW_TRACKING_URI either.

    ``mlflow.set_tracking_uri`` exports the variable, and the per-test isolation below restores on its way out the
    value it found, so a module fixture that set a URI would otherwise hand it to the next module's fixtures.
    """
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _isolated_tracking(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test may write to the developer's MLflow database: unset the override, reset the client URI."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]


@pytest.fixture
def sample_images() -> Path:
    """The 30 real TCIA tiles committed with the project (class sub-folders)."""
    return SAMPLE / "images"


@pytest.fixture
def sample_copy(tmp_path: Path) -> Path:
    """A writable copy of the sample class folders."""
    target = tmp_path / "images"
    shutil.copytree(SAMPLE / "images", target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def write_tile(path: Path, colour: tuple[int, int, int], size: int = 64, seed: int = 0, noise: float = 12.0) -> Path:
    """Write a JPEG tile of one colour plus noise."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, dtype=float) + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGB").save(path, quality=95)
    return path


class DatasetFactory(Protocol):
    """Signature of the ``make_dataset`` fixture."""

    def __call__(self, per_slide: int = 3, slides: int = 3, size: int = 64, root: Path | None = None) -> Path: ...


@pytest.fixture
def make_dataset(tmp_path: Path) -> DatasetFactory:
    """Build a class-folder data set of generated TCIA-named tiles with a clear colour signal per class.

    Each class gets ``slides`` slides of ``per_slide`` tiles; slide names follow the TCIA scheme so ingest
    parses case and slide. Returns the folder holding the class sub-folders.
    """

    def build(per_slide: int = 3, slides: int = 3, size: int = 64, root: Path | None = None) -> Path:
        root = root or tmp_path / "generated"
        for c, label in enumerate(CLASSES):
            for s in range(slides):
                case = f"Case-{10 + s % 2}"
                for t in range(per_slide):
                    name = f"{case}-P1-C{c}{s}-{100 * t + 7}-{200 + t}.jpg"
                    write_tile(root / label / name, CLASS_COLOURS[label], size, seed=hash((c, s, t)) % 10_000)
        return root

    return build


def tiny_params(**overrides: dict[str, object]) -> dict[str, dict[str, object]]:
    """Params small enough for a test: 40 px tiles seen as 32 px crops, 2 folds, 2 steps, a 5-step GAN."""
    params: dict[str, dict[str, object]] = {
        "preprocess": {"tile_size": 40, "input_size": 32},
        "validate": {"min_size": 32},
        "split": {"n_folds": 2},
        "augment": {"preview_tiles": 3, "preview_samples": 2},
        "balance": {
            "enabled": True,
            "steps": 5,
            "image_size": 32,
            "width": 8,
            "batch_size": 8,
            "quality": {"tiles_per_class": 4, "kid_subsets": 2},
        },
        "train": {
            "architectures": ["resnet50", "vgg19"],
            "weights": "auto",  # offline in tests: falls back to random initialisation, as the demo does here
            "steps": 2,
            "eval_every": 1,
            "batch_size": 8,
            "patience": 1,
        },
        "baseline": {"trees": 20},
        # INT8 copies of every fold model cost seconds per fold; the tests that need them switch them on.
        "candidates": {"int8": False},
    }
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    return params


def copy_repository(root: Path, overrides: dict[str, dict[str, object]]) -> Path:
    """Copy the repository's tracked and new files (no outputs) to ``root``, apply ``overrides`` to params.yaml
    section by section, and commit it all in a fresh git repository: a project ``dvc repro`` can run in."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for args in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(args, cwd=root, capture_output=True, check=True)
    return root


def plain_policy(**fields: object) -> AugmentPolicy:
    """An augmentation policy with everything off but what ``fields`` turns on."""
    base: dict[str, object] = {
        "rotation_degrees": 0.0,
        "rotate90": False,
        "hflip_p": 0.0,
        "vflip_p": 0.0,
        "zoom_max": 1.0,
        "hed_jitter": 0.0,
        "color_jitter": 0.0,
        "hue_jitter": 0.0,
        "stain_normalization": "none",
    }
    return AugmentPolicy(**{**base, **fields})  # type: ignore[arg-type]


@pytest.fixture
def tiny_config() -> Config:
    """A validated tiny config."""
    return Config.from_dict(tiny_params())


@pytest.fixture
def repo_params() -> Config:
    """The project's params.yaml."""
    return load_config(REPO / "params.yaml")


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this interpreter's bin folder first on PATH (dvc, bentoml, bonetumor)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def bundle_metadata(arch: str = "resnet50", size: int = 40) -> ModelMetadata:
    """Metadata of a small test bundle (3 classes, ``size`` px tiles, 32 px crops)."""
    return ModelMetadata(
        arch=arch,
        classes=CLASSES,
        tile_size=size,
        input_size=32,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        dropout=0.5,
        provenance={"data_version": "abc"},
        versions=ModelMetadata.current_versions(),
    )


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A registered model served by a real ``bentoml serve`` for the whole session (``bento_server.BentoServer``)."""
    from bento_server import serve_session

    server = serve_session(tmp_path_factory.mktemp("serving"))
    try:
        yield server
    finally:
        server.stop()
