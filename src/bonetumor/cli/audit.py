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


def promotions(
    params: ParamsOption = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the events as one JSON list.")] = False,
) -> None:
    """List every alias change: who moved which alias from which version to which, when, why, with what figures."""
    from bonetumor.registry.promotions import PromotionEvent, format_history
    from bonetumor.stages import promotion_events

    def stage() -> None:
        events = promotion_events(params)
        typer.echo(
            json.dumps(events, indent=2) if as_json else format_history([PromotionEvent.from_dict(e) for e in events])
        )

    run_stage(stage)


def rollback(
    reason: Annotated[str, typer.Option(help="Why (recorded in the alias history).")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Return the champion alias to the version that held it before the current one."""
    from bonetumor.stages import rollback_model

    def stage() -> None:
        event = rollback_model(params, reason)
        typer.echo(
            f"{event['model']} @{event['alias']}: version {event['from_version']} -> {event['to_version']} "
            f"(rollback #{event['sequence']} by {event['user']})"
        )

    run_stage(stage)


def model_card(
    version: Annotated[str, typer.Argument(help="A version number or an alias (champion, challenger).")],
    params: ParamsOption = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the machine-readable card (MONAI keys).")] = False,
    rebuild: Annotated[
        bool, typer.Option(help="Render it again from its sources (for versions registered before model cards).")
    ] = False,
    log: Annotated[
        bool, typer.Option("--log", help="Rebuild it and log it with the version, so the service serves it.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the Markdown to this file.")] = None,
) -> None:
    """Print a version's model card: intended use, data, metrics beside the baseline, referral, limitations."""
    from bonetumor.stages import model_card_of

    def stage() -> None:
        card = model_card_of(params, version, rebuild=rebuild, log_card=log, out=out)
        typer.echo(json.dumps(card["metadata"], indent=2) if as_json else card["markdown"])
        if log:
            typer.echo(f"logged with version {card['version']}: the service serves it at /model_card", err=True)

    run_stage(stage)


def drift(
    params: ParamsOption = Path("params.yaml"),
    model: Annotated[str, typer.Option(help="Alias or version whose answers are checked.")] = "",
    since: Annotated[str, typer.Option(help="Only answers from this ISO 8601 time on (UTC if no zone).")] = "",
    prediction_log: Annotated[Path | None, typer.Option(help="Another log than serving.prediction_log.")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default monitoring.report_dir).")] = None,
    retrain_on_drift: Annotated[
        bool, typer.Option("--retrain", help="On drift, start the pipeline (bonetumor retrain --reason drift).")
    ] = False,
) -> None:
    """Compare served tiles with the model's training reference; exit 0 (no drift), 1 (drift) or 2 (too few tiles)."""
    from bonetumor.stages import drift_check, retrain

    outcome: dict[str, object] = {}

    def stage() -> None:
        report = drift_check(params, model or None, since or None, prediction_log, out)
        outcome.update(report)
        typer.echo(f"version {report['version']}: {report['status']} ({report['n_served']} served tiles)")
        for reason in report["reasons"]:
            typer.echo(f"  - {reason}")
        typer.echo(f"report: {report['report']}")
        if report["status"] == "drift" and retrain_on_drift:
            why = "drift: " + "; ".join(report["reasons"])[:500]
            typer.echo(f"retraining ({why})")
            retrain(params, why)

    run_stage(stage)
    raise typer.Exit(code=int(str(outcome.get("exit_code", 0))))


def retrain(
    reason: Annotated[str, typer.Option(help="Why: recorded on the new runs (e.g. drift, new data).")],
    params: ParamsOption = Path("params.yaml"),
    kubeflow: Annotated[bool, typer.Option(help="Submit to Kubeflow (bonetumor pipeline submit) instead.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the commands only.")] = False,
) -> None:
    """Start the pipeline again (dvc repro, or a Kubeflow run); the champion gate judges the new model."""
    from bonetumor.stages import retrain as start

    def stage() -> None:
        for command in start(params, reason, kubeflow=kubeflow, dry_run=dry_run):
            typer.echo(("would run: " if dry_run else "ran: ") + command)

    run_stage(stage)
