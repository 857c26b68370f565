"""Submit the compiled training pipeline to a Kubeflow Pipelines endpoint.

Usage::

    python -m pipelines.submit --host https://kfp.example.org [--params params.yaml]
        [--source-dir /app/data/sample/images] [--mlflow-tracking-uri http://mlflow:5000] [--experiment NAME]

params.yaml is validated with :func:`bonetumor.config.load_config` before anything is sent, and the resolved
config (every section, defaults filled in) becomes the pipeline's ``params`` argument, so the run does not depend
on the defaults of the package version inside the image. ``data.source`` is replaced by ``--source-dir`` and
``tracking.uri`` by ``--mlflow-tracking-uri`` inside the pipeline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import kfp

from bonetumor.config import load_config
from bonetumor.errors import ConfigError
from pipelines.compile import PIPELINE_YAML
from pipelines.training_pipeline import DEFAULT_MLFLOW_TRACKING_URI, DEFAULT_SOURCE_DIR, PIPELINE_NAME


def build_arguments(params_file: str | Path, source_dir: str, mlflow_tracking_uri: str) -> dict[str, Any]:
    """Validate params.yaml and build the pipeline's run arguments.

    Args:
        params_file: The params.yaml to send.
        source_dir: Folder of class sub-folders, as seen from the pipeline's pods.
        mlflow_tracking_uri: MLflow tracking URI, as seen from the pipeline's pods.

    Returns:
        The ``arguments`` of the run: ``source_dir``, ``params`` and ``mlflow_tracking_uri``.

    Raises:
        bonetumor.errors.ConfigError: params.yaml is missing or invalid.
    """
    config = load_config(params_file)
    return {"source_dir": source_dir, "params": config.to_dict(), "mlflow_tracking_uri": mlflow_tracking_uri}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.submit``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 when the run was created, 1 when params.yaml is invalid or the YAML is missing.
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    parser.add_argument("--params", default="params.yaml", help="params file to send (default: params.yaml)")
    parser.add_argument(
        "--source-dir", default=DEFAULT_SOURCE_DIR, help=f"tiles folder in the pods (default: {DEFAULT_SOURCE_DIR})"
    )
    parser.add_argument("--mlflow-tracking-uri", default=DEFAULT_MLFLOW_TRACKING_URI, help="MLflow URI in the pods")
    parser.add_argument("--experiment", default=PIPELINE_NAME, help=f"KFP experiment (default: {PIPELINE_NAME})")
    parser.add_argument("--namespace", default=None, help="Kubernetes namespace (multi-user deployments only)")
    parser.add_argument("--package", default=str(PIPELINE_YAML), help="compiled pipeline (default: the committed YAML)")
    args = parser.parse_args(argv)

    if not Path(args.package).is_file():
        print(f"error: {args.package} not found; run `make compile` (python -m pipelines.compile)", file=sys.stderr)
        return 1
    try:
        arguments = build_arguments(args.params, args.source_dir, args.mlflow_tracking_uri)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    client = kfp.Client(host=args.host, namespace=args.namespace) if args.namespace else kfp.Client(host=args.host)
    result = client.create_run_from_pipeline_package(
        args.package,
        arguments=arguments,
        experiment_name=args.experiment,
        namespace=args.namespace,
    )
    print(f"submitted run {result.run_id} to {args.host} (experiment {args.experiment})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
