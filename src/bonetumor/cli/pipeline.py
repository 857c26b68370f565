"""``bonetumor pipeline ...``: compile, run locally, submit or schedule the Kubeflow pipeline.

A thin adapter: the package imports no orchestration framework, so each command runs the project's
``python -m pipelines.<module>`` (this interpreter, in the project folder: the one holding params.yaml and
``pipelines/``), passing the options through, and exits with its status. Paths on this machine are made absolute
first, so they mean what they meant where the command was typed; paths in the pods (``--source-dir``) are not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

pipeline_app = typer.Typer(
    name="pipeline",
    help="Kubeflow pipeline: compile it, run it here (kfp.local), submit or schedule it on a cluster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ProjectOption = Annotated[
    Path, typer.Option("--project", help="Project folder, holding params.yaml and pipelines/ (default: here).")
]
ParamsOption = Annotated[
    Path | None, typer.Option("--params", "-p", help="params.yaml (default: the project folder's).")
]
HostOption = Annotated[
    str | None,
    typer.Option(
        help="KFP API endpoint, e.g. http://localhost:8080 after a port-forward (default: $KF_PIPELINES_ENDPOINT)."
    ),
]
ExperimentOption = Annotated[str | None, typer.Option(help="KFP experiment (default: bonetumor-training).")]
DataVersionOption = Annotated[
    str | None,
    typer.Option(help="DVC md5 of the tiles folder, <md5>.dir (default: its .dvc file, else dvc.lock's ingest stage)."),
]
DvcRemoteOption = Annotated[
    str | None, typer.Option(help="DVC remote the pods pull that version from, s3://... (default: none).")
]
SourceDirOption = Annotated[
    str | None,
    typer.Option(help="Tiles folder inside the image, used without a remote (default: /app/data/sample/images)."),
]
TrackingOption = Annotated[
    str | None, typer.Option(help="MLflow tracking URI as the pods see it (default: the in-cluster server).")
]
NamespaceOption = Annotated[str | None, typer.Option(help="Kubernetes namespace (multi-user KFP only).")]
PackageOption = Annotated[
    Path | None, typer.Option(help="Compiled pipeline (default: the committed pipelines/training_pipeline.yaml).")
]
TokenOption = Annotated[
    Path | None,
    typer.Option(help="File holding a bearer token for the KFP API (default: $KF_PIPELINES_SA_TOKEN_PATH)."),
]
ServiceAccountOption = Annotated[
    str | None, typer.Option(help="Kubernetes ServiceAccount of the run's pods (default: KFP's).")
]
NoCacheOption = Annotated[
    bool, typer.Option("--no-cache", help="Run every task anew (default: the compiled caching settings).")
]


def _project(project: Path) -> Path:
    """The project folder, absolute; exit 1 with a clear message when it has no ``pipelines/``."""
    folder = project.resolve()
    if not (folder / "pipelines").is_dir():
        typer.secho(
            f"error: {folder} has no pipelines/ folder: run this in the project folder (the one holding "
            "params.yaml and pipelines/) or pass --project DIR",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)
    return folder


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(path.expanduser().resolve())


def _run_module(module: str, project: Path, options: dict[str, str | int | bool | None]) -> None:
    """Run ``python -m pipelines.<module>`` in ``project`` with ``options`` (None and False left out).

    Raises:
        typer.Exit: With the module's exit status when it is not 0.
    """
    command = [sys.executable, "-m", f"pipelines.{module}"]
    for flag, value in options.items():
        if value is True:
            command.append(flag)
        elif value is not None and value is not False:
            command += [flag, str(value)]
    code = subprocess.run(command, cwd=project, check=False).returncode
    if code:
        raise typer.Exit(code=code if code > 0 else 128 - code)


def _run_options(
    project: Path,
    params: Path | None,
    host: str | None,
    experiment: str | None,
    data_version: str | None,
    dvc_remote: str | None,
    source_dir: str | None,
    mlflow_tracking_uri: str | None,
    namespace: str | None,
    package: Path | None,
    token_file: Path | None,
    service_account: str | None,
    no_cache: bool,
) -> dict[str, str | int | bool | None]:
    """The options submit and schedule share, paths on this machine made absolute."""
    return {
        "--host": host,
        "--experiment": experiment,
        "--params": _absolute(params) or str(project / "params.yaml"),
        "--data-version": data_version,
        "--dvc-remote": dvc_remote,
        "--source-dir": source_dir,
        "--mlflow-tracking-uri": mlflow_tracking_uri,
        "--namespace": namespace,
        "--package": _absolute(package),
        "--token-file": _absolute(token_file),
        "--service-account": service_account,
        "--no-cache": no_cache,
    }


@pipeline_app.command("compile")
def compile_(
    image: Annotated[str | None, typer.Option(help="Image of every task, REGISTRY/bonetumor:TAG.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="YAML to write (default: pipelines/training_pipeline.yaml).")
    ] = None,
    params: ParamsOption = None,
    project: ProjectOption = Path(),
) -> None:
    """Compile the pipeline for an image, with params.yaml's kubeflow section (resources, retries, GPUs)."""
    folder = _project(project)
    options: dict[str, str | int | bool | None] = {
        "--image": image,
        "--output": _absolute(output),
        "--params": _absolute(params) or str(folder / "params.yaml"),
    }
    _run_module("compile", folder, options)


@pipeline_app.command("run-local")
def run_local(
    params: ParamsOption = None,
    source_dir: Annotated[
        Path | None, typer.Option(help="Tiles folder, one sub-folder per class (default: data.source).")
    ] = None,
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI of the steps that log (relative: to the project).")
    ] = None,
    pipeline_root: Annotated[Path | None, typer.Option(help="Where the tasks write their artifacts.")] = None,
    project: ProjectOption = Path(),
) -> None:
    """Run the pipeline on this machine (kfp.local), one task at a time, its loops compiled from params.yaml."""
    folder = _project(project)
    options: dict[str, str | int | bool | None] = {
        "--params": _absolute(params) or str(folder / "params.yaml"),
        "--source-dir": _absolute(source_dir),
        "--tracking-uri": tracking_uri,
        "--pipeline-root": _absolute(pipeline_root),
    }
    _run_module("local_run", folder, options)


@pipeline_app.command("submit")
def submit(
    host: HostOption = None,
    experiment: ExperimentOption = None,
    params: ParamsOption = None,
    data_version: DataVersionOption = None,
    dvc_remote: DvcRemoteOption = None,
    source_dir: SourceDirOption = None,
    mlflow_tracking_uri: TrackingOption = None,
    namespace: NamespaceOption = None,
    package: PackageOption = None,
    token_file: TokenOption = None,
    service_account: ServiceAccountOption = None,
    no_cache: NoCacheOption = False,
    project: ProjectOption = Path(),
) -> None:
    """Submit one run; its name carries the git commit and the data version. params.yaml is checked first."""
    folder = _project(project)
    options = _run_options(
        folder,
        params,
        host,
        experiment,
        data_version,
        dvc_remote,
        source_dir,
        mlflow_tracking_uri,
        namespace,
        package,
        token_file,
        service_account,
        no_cache,
    )
    _run_module("submit", folder, options)


@pipeline_app.command("schedule")
def schedule(
    cron: Annotated[str, typer.Option(help="KFP cron: 6 fields, seconds first; '0 0 2 * * 1' is Mondays at 02:00:00.")],
    host: HostOption = None,
    name: Annotated[str | None, typer.Option(help="Start of the recurring run's name (default: bonetumor).")] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Runs of the schedule at once, 1-10 (default: 1).")
    ] = None,
    catchup: Annotated[bool, typer.Option("--catchup", help="Run the missed runs of a paused schedule.")] = False,
    experiment: ExperimentOption = None,
    params: ParamsOption = None,
    data_version: DataVersionOption = None,
    dvc_remote: DvcRemoteOption = None,
    source_dir: SourceDirOption = None,
    mlflow_tracking_uri: TrackingOption = None,
    namespace: NamespaceOption = None,
    package: PackageOption = None,
    token_file: TokenOption = None,
    service_account: ServiceAccountOption = None,
    no_cache: NoCacheOption = False,
    project: ProjectOption = Path(),
) -> None:
    """Schedule a recurring run on a cron; its name carries the commit and the data version every run trains."""
    folder = _project(project)
    options = _run_options(
        folder,
        params,
        host,
        experiment,
        data_version,
        dvc_remote,
        source_dir,
        mlflow_tracking_uri,
        namespace,
        package,
        token_file,
        service_account,
        no_cache,
    )
    recurring = {"--cron": cron, "--name": name, "--max-concurrency": max_concurrency, "--catchup": catchup}
    _run_module("schedule", folder, {**recurring, **options})
