"""Commands for auditors and platform teams: lineage, promotion history, rollback, model cards, drift, retraining.

Each is a thin call into :mod:`bonetumor.stages`; the logic is in ``bonetumor.registry`` and
``bonetumor.monitoring``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bonetumor.cli.common import ParamsOption, run_stage


def lineage(
    ref: Annotated[
        str,
        typer.Argument(
            help="A request id from the prediction log, models:/NAME@ALIAS, models:/NAME/VERSION or a run id."
        ),
    ],
    params: ParamsOption = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as one JSON document.")] = False,
    prediction_log: Annotated[
        Path | None, typer.Option(help="Another prediction log than serving.prediction_log (copied from the server).")
    ] = None,
) -> None:
    """Trace an answer to its model version, runs, data (and how to restore it), params, code and promotions."""
    from bonetumor.registry.lineage import render_lineage
    from bonetumor.stages import lineage_of

    def stage() -> None:
        doc = lineage_of(params, ref, prediction_log)
        typer.echo(json.dumps(doc, indent=2, sort_keys=False) if as_json else render_lineage(doc))

    run_stage(stage)
