"""``bonetumor data ...``: bring real data sets into the project (a thin adapter over :mod:`bonetumor.data.importer`).

The package itself never imports DVC; this command runs the ``dvc`` executable, and only when the project folder
is a DVC repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bonetumor.cli.common import run_stage, stage_config

if TYPE_CHECKING:
    from bonetumor.data.importer import ImportResult

data_app = typer.Typer(
    name="data",
    help="Bring real data sets into the project: class folders under data_import.target, tracked with DVC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _dvc_executable() -> str | None:
    # The dvc installed beside this interpreter first (the project venv), then whatever PATH offers.
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else shutil.which("dvc")


def _print_summary(result: ImportResult, project: Path) -> None:
    counts = ", ".join(f"{label}: {n}" for label, n in result.counts.items())
    typer.echo(f"{result.name}: {result.total} tiles ({counts})")
    if result.excluded:
        left_out = ", ".join(f"{label!r}: {n}" for label, n in result.excluded.items())
        typer.echo(f"excluded by data_import.label_map: {sum(result.excluded.values())} ({left_out})")
    if result.conversions:
        typer.echo(f"converted to 8-bit RGB: {len(result.conversions)} (listed in {result.report.name})")
    if result.duplicates:
        typer.echo(f"identical duplicates left out: {len(result.duplicates)} (listed in {result.report.name})")
    state = "unchanged, already imported" if result.unchanged else "written"
    typer.echo(f"{_relative(result.dest, project)}: {state} (digest {result.digest[:12]})")


def _relative(path: Path, project: Path) -> str:
    try:
        return path.relative_to(project).as_posix()
    except ValueError:
        return str(path)


def _track(result: ImportResult, project: Path, use_dvc: bool) -> None:
    """Run ``dvc add`` on the imported folder when the project is a DVC repository, else say how to.

    An unchanged import is not added again, unless it has no ``.dvc`` file yet (imported earlier with --no-dvc).
    """
    dest = _relative(result.dest, project)
    if not use_dvc:
        typer.echo(f"not tracked (--no-dvc); to track it: dvc add {dest}")
        return
    if result.unchanged and result.dest.with_name(f"{result.dest.name}.dvc").is_file():
        return
    dvc = _dvc_executable()
    if not (project / ".dvc").is_dir() or dvc is None:
        why = "is not a DVC repository" if dvc else "has no dvc executable on PATH"
        typer.echo(f"{project} {why}; to track the data: cd {project} && dvc init && dvc add {dest}")
        return
    completed = subprocess.run([dvc, "add", dest], cwd=project, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout).strip()
        typer.secho(
            f"error: `dvc add {dest}` failed (exit {completed.returncode}): {output}\n"
            f"the data is imported at {result.dest}; fix the cause and run `dvc add {dest}` in {project}",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)
    typer.echo(f"dvc add {dest}: tracked in {dest}.dvc (commit it with git)")


@data_app.command("import")
def import_(
    source: Annotated[
        Path, typer.Argument(help="Folder or .zip (TCIA/Kaggle download, or class folders), or a path,label CSV.")
    ],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Data set name (default: the source's name).")
    ] = None,
    params: Annotated[
        Path, typer.Option("--params", "-p", help="params.yaml; its folder is the project folder.")
    ] = Path("params.yaml"),
    dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="Run `dvc add` on the result (DVC repos).")] = True,
) -> None:
    """Import a data set into data_import.target/<name> as class folders, checked tile by tile."""
    # Imported here: the import module pulls in torch (through preprocess), which `bonetumor --help` should not
    # pay for.
    from bonetumor.data.importer import import_dataset

    def command() -> None:
        config, project = stage_config(params)
        result = import_dataset(source, config, project, name)
        _print_summary(result, project)
        _track(result, project, dvc)
        dest = _relative(result.dest, project)
        typer.echo(f"share it: dvc push (after `git add {dest}.dvc` and a commit)")
        typer.echo(f"use it: set in {params.name}  data.source: {dest}")

    run_stage(command)
