"""Compile the training pipeline to YAML, or check that the committed file is fresh.

Usage::

    python -m pipelines.compile                                   # (re)write pipelines/training_pipeline.yaml
    python -m pipelines.compile --check                           # exit 1 when the committed YAML is stale
    python -m pipelines.compile --image REGISTRY/bonetumor:TAG --output pipeline.yaml [--params params.yaml]

``bonetumor pipeline compile`` runs the same. The image of every task and the cluster settings of params.yaml
(``kubeflow``: resources, retries, parallelism, secrets; ``train.accelerator``) are compiled in; the image is also
named in the pipeline's description. The committed YAML uses the default image and the committed params.yaml.
The output is deterministic: compiling twice gives the same bytes, so ``--check`` (and CI) can compare files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kfp import compiler

from bonetumor.config import load_config
from bonetumor.errors import ConfigError
from components.stages import DEFAULT_IMAGE
from pipelines.training_pipeline import build_pipeline

ROOT = Path(__file__).resolve().parent.parent
#: The committed, compiled pipeline.
PIPELINE_YAML = ROOT / "pipelines" / "training_pipeline.yaml"
#: How the file is named in messages (relative to the repository root).
PIPELINE_YAML_NAME = "pipelines/training_pipeline.yaml"
#: The params.yaml the committed YAML is compiled from.
PARAMS = ROOT / "params.yaml"


def compile_pipeline(path: str | Path, image: str = DEFAULT_IMAGE, params: str | Path = PARAMS) -> Path:
    """Compile the training pipeline into a YAML file.

    Args:
        path: Output file.
        image: Container image of every task.
        params: params.yaml whose ``kubeflow`` section and ``train.accelerator`` shape the tasks.

    Returns:
        The written file.

    Raises:
        ConfigError: ``params`` is missing or invalid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(load_config(params), image)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
    return path


def is_up_to_date(committed: str | Path = PIPELINE_YAML) -> bool:
    """Compile into a temporary file and compare it byte for byte with ``committed``.

    Args:
        committed: The committed YAML.

    Returns:
        True when ``committed`` exists and equals a fresh compile.
    """
    committed = Path(committed)
    with tempfile.TemporaryDirectory(prefix="bonetumor-kfp-") as tmp:
        fresh = compile_pipeline(Path(tmp) / committed.name)
        return committed.is_file() and fresh.read_bytes() == committed.read_bytes()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.compile``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 on success, 1 when ``--check`` finds the committed YAML stale or params.yaml is invalid.
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help=f"fail when {PIPELINE_YAML_NAME} differs from a fresh compile"
    )
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"image of every task (default: {DEFAULT_IMAGE})")
    parser.add_argument("--output", default=str(PIPELINE_YAML), help=f"output file (default: {PIPELINE_YAML_NAME})")
    parser.add_argument("--params", default=str(PARAMS), help="params.yaml with the kubeflow section")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if not is_up_to_date():
                print(f"error: {PIPELINE_YAML_NAME} is out of date; run `make compile`", file=sys.stderr)
                return 1
            print(f"{PIPELINE_YAML_NAME} is up to date")
            return 0
        written = compile_pipeline(args.output, args.image, args.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written} (image {args.image})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
