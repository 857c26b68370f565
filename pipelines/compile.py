"""Compile the training pipeline to ``pipelines/training_pipeline.yaml``, or check that the committed file is fresh.

Usage::

    python -m pipelines.compile           # (re)write pipelines/training_pipeline.yaml
    python -m pipelines.compile --check   # exit 1 when the committed YAML differs from a fresh compile

The output is deterministic: compiling twice gives the same bytes, so ``--check`` (and CI) can compare files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from kfp import compiler

from pipelines.training_pipeline import training_pipeline

#: The committed, compiled pipeline.
PIPELINE_YAML = Path(__file__).resolve().parent / "training_pipeline.yaml"
#: How the file is named in messages (relative to the repository root).
PIPELINE_YAML_NAME = "pipelines/training_pipeline.yaml"


def compile_pipeline(path: str | Path) -> Path:
    """Compile the training pipeline into a YAML file.

    Args:
        path: Output file.

    Returns:
        The written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=training_pipeline, package_path=str(path))
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
        The exit status: 0 on success, 1 when ``--check`` finds the committed YAML stale.
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.compile", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help=f"fail when {PIPELINE_YAML_NAME} differs from a fresh compile"
    )
    args = parser.parse_args(argv)
    if args.check:
        if not is_up_to_date():
            print(f"error: {PIPELINE_YAML_NAME} is out of date; run `make compile`", file=sys.stderr)
            return 1
        print(f"{PIPELINE_YAML_NAME} is up to date")
        return 0
    compile_pipeline(PIPELINE_YAML)
    print(f"wrote {PIPELINE_YAML_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
