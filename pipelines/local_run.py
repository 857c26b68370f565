"""Run the Kubeflow pipeline on this machine with kfp.local: every task a subprocess of this environment.

Usage::

    python -m pipelines.local_run [--params params.yaml] [--source-dir data/sample/images]
        [--tracking-uri sqlite:///mlflow-kfp.db] [--pipeline-root .kfp]

``bonetumor pipeline run-local`` runs the same. kfp's SubprocessRunner cannot loop over a task's output
(kfp 2.17: "Parent pipeline input argument ... not found"), so the local run compiles the pipeline with the folds
and groups of params.yaml written into its loops (:func:`pipelines.training_pipeline.static_fan_out`): the same
components and DAG; only the loops' items come from the compiler instead of ``cv_plan``, and register runs
without its ``dsl.If`` (kfp.local skips a condition's body; the register stage refuses by itself instead).
Each task writes its artifacts under the pipeline root, as on a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from kfp import compiler

from bonetumor.config import Config, load_config
from bonetumor.errors import ConfigError
from pipelines.training_pipeline import PIPELINE_NAME, build_pipeline, run_params, static_fan_out

ROOT = Path(__file__).resolve().parent.parent


def run_local(config: Config, source_dir: str | Path, tracking_uri: str, pipeline_root: str | Path) -> Path:
    """Compile the pipeline for ``config``'s folds and groups and run it under kfp.local.

    Args:
        config: The run's params (they go to every task as the ``params`` argument).
        source_dir: Tiles folder, one sub-folder per class.
        tracking_uri: MLflow tracking URI of the tasks that log.
        pipeline_root: Where kfp.local writes every task's artifacts.

    Returns:
        The run's folder under ``pipeline_root`` (one sub-folder per task).

    Raises:
        RuntimeError: A task failed (kfp.local names it).
    """
    from kfp import local
    from kfp.components import load_component_from_file

    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    package = pipeline_root / "local_pipeline.yaml"
    # One task at a time: a sqlite store takes one writer (bonetumor.locks.store_lock refuses a second one), and
    # this machine is one node. A cluster runs kubeflow.parallelism fold tasks against its MLflow server.
    serial = dataclasses.replace(config, kubeflow=dataclasses.replace(config.kubeflow, parallelism=1))
    pipeline = build_pipeline(serial, fan_out=static_fan_out(config), conditional=False)
    compiler.Compiler().compile(pipeline, str(package))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        workspace_root=str(pipeline_root / "workspace"),
    )
    before = set(pipeline_root.glob(f"{PIPELINE_NAME}-*"))
    load_component_from_file(str(package))(
        source_dir=str(Path(source_dir).resolve()), params=run_params(config), mlflow_tracking_uri=tracking_uri
    )
    (run_dir,) = set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - before
    return run_dir


def summary(run_dir: Path) -> dict[str, Any]:
    """What a local run decided: the evaluation's winner, whether it registered, and the registered model."""
    import json

    comparison = json.loads((run_dir / "evaluate" / "evaluation" / "comparison.json").read_text(encoding="utf-8"))
    champion_file = run_dir / "register" / "model" / "champion.json"
    champion = json.loads(champion_file.read_text(encoding="utf-8")) if champion_file.is_file() else None
    return {"winner": comparison["winner"], "registered": champion}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.local_run``.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        The exit status: 0 when the run finished, 1 when params.yaml is invalid.
    """
    parser = argparse.ArgumentParser(prog="python -m pipelines.local_run", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"), help="params.yaml (default: the project's)")
    parser.add_argument("--source-dir", default=None, help="tiles folder (default: data.source of params.yaml)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow URI (default: sqlite:///<project>/mlflow-kfp.db)")
    parser.add_argument("--pipeline-root", default=str(ROOT / ".kfp"), help="artifacts folder (default: .kfp)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    project = Path(args.params).resolve().parent
    source = args.source_dir or str(project / config.data.source)
    uri = args.tracking_uri or f"sqlite:///{project / 'mlflow-kfp.db'}"
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the tasks get the URI as a parameter
    run_dir = run_local(config, source, uri, args.pipeline_root)
    result = summary(run_dir)
    print(f"local run: {run_dir}; winner {result['winner']}")
    registered = result["registered"]
    if registered:
        print(f"registered {registered['model_uri']} (version {registered['version']}, @{registered['alias']})")
    else:
        print("not registered: the evaluation did not allow it (register.min_macro_f1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
