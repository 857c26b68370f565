"""Command-line interface: one command per pipeline stage, each a thin call into the stage's function.

DVC runs these commands (see dvc.yaml); people can too. Every command reads params.yaml (``--params``), and
its default paths match dvc.yaml's. Errors that the package raises on purpose print as one clear message and
exit with status 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bonetumor.cli.common import FOLDS, MANIFEST, OUT, POLICY, TILES, ParamsOption, run_stage, stage_config
from bonetumor.runtime import configure_process
from bonetumor.stages import tracked_stage

app = typer.Typer(
    name="bonetumor",
    help="Osteosarcoma H&E tile classification: ingest, validate, split, augment, balance, train, evaluate, register.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

weights_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


@weights_app.command("fetch")
def weights_fetch(
    archs: Annotated[
        list[str] | None, typer.Argument(help="Architectures (default: every one train.architectures names).")
    ] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Download torchvision's ImageNet weights (hash-checked) into TORCH_HOME, for air-gapped installs.

    Run it where there is internet; copy the printed files to the same place under TORCH_HOME on the offline
    machine. `train.weights: auto` and `imagenet` then find them there.
    """
    from bonetumor.stages import fetch_weights

    def stage() -> None:
        for arch, path in fetch_weights(archs or [], params):
            typer.echo(f"{arch}: {path} ({path.stat().st_size / 1e6:.0f} MB, hash checked)")
        typer.echo(
            "offline machines: copy these files to $TORCH_HOME/hub/checkpoints/ (default "
            "~/.cache/torch/hub/checkpoints/); train.weights: auto or imagenet then use them"
        )

    run_stage(stage)


def _add_subcommands() -> None:
    # Imported here: the data commands pull in their own dependencies only when the app is built.
    from bonetumor.cli import audit
    from bonetumor.cli.data import data_app
    from bonetumor.cli.pipeline import pipeline_app

    app.command()(audit.lineage)
    app.command()(audit.promotions)
    app.command()(audit.rollback)
    app.command("model-card")(audit.model_card)
    app.command()(audit.drift)
    app.command()(audit.retrain)

    app.add_typer(data_app, name="data", help="Import and version data sets (Kaggle/TCIA downloads, folders, CSVs).")
    app.add_typer(weights_app, name="weights", help="Pretrained weights: fetch ImageNet files ahead of time.")
    app.add_typer(pipeline_app, name="pipeline", help="Kubeflow: compile, run locally, submit or schedule.")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    """Configure logging and switch telemetry off before any command runs."""
    configure_process(verbose)


@app.command()
def ingest(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Output folder (manifest.csv).")] = OUT / "ingest",
    copy_images: Annotated[bool, typer.Option(help="Copy tiles into the output folder.")] = False,
) -> None:
    """Scan data.source (one sub-folder per class) and write the tile manifest."""
    from bonetumor.data.ingest import run_ingest

    def stage() -> None:
        config, project = stage_config(params)
        frame = run_ingest(config, project, out, copy_images)
        typer.echo(f"{len(frame)} tiles, {frame['slide'].nunique()} slides, {frame['case'].nunique()} cases -> {out}")

    run_stage(stage)


@app.command()
def validate(
    params: ParamsOption = Path("params.yaml"),
    manifest: Annotated[Path, typer.Option(help="Manifest from `ingest`.")] = MANIFEST,
    out: Annotated[Path, typer.Option(help="Output folder (report.json).")] = OUT / "validate",
) -> None:
    """Run the Great Expectations suite on the manifest and the images; exit 1 naming failing files."""
    from bonetumor.data.validate import DOCS_DIR, REPORT_FILE, run_validation, summarise

    def stage() -> None:
        config, _ = stage_config(params)
        report = run_validation(config, manifest, out)
        typer.echo(summarise(report))
        typer.echo(f"report: {out / REPORT_FILE}, Data Docs: {out / DOCS_DIR / 'index.html'}")

    run_stage(stage)


@app.command()
def split(
    params: ParamsOption = Path("params.yaml"),
    manifest: Annotated[Path, typer.Option(help="Manifest from `ingest`.")] = MANIFEST,
    tiles: Annotated[Path, typer.Option(help="tiles.csv from `validate` (near-duplicate clusters).")] = TILES,
    out: Annotated[Path, typer.Option(help="Output folder (folds.json, folds_report.json).")] = OUT / "split",
) -> None:
    """Make folds grouped by slide or patient (and a held-out test set); check them with the folds suite."""
    from bonetumor.data.split import run_split

    def stage() -> None:
        config, _ = stage_config(params)
        folds = run_split(config, manifest, out, tiles)
        typer.echo(
            f"{folds['n_folds']} folds ({folds['method']}) grouped by {folds['group_by']} (seed {folds['seed']}), "
            f"{len(folds['test_paths'])} test tiles -> {out}"
        )
        for warning in folds["warnings"]:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)

    run_stage(stage)


@app.command()
def augment(
    params: ParamsOption = Path("params.yaml"),
    manifest: Annotated[Path, typer.Option(help="Manifest from `ingest`.")] = MANIFEST,
    out: Annotated[Path, typer.Option(help="Output folder (policy.json, preview.png).")] = OUT / "augment",
) -> None:
    """Write the augmentation policy and a preview grid of augmented tiles."""
    from bonetumor.transforms.augment import run_augment

    def stage() -> None:
        config, _ = stage_config(params)
        policy = run_augment(config, manifest, out)
        typer.echo(f"augmentation policy {policy.digest()} -> {out}")

    run_stage(stage)


@app.command()
def balance(
    params: ParamsOption = Path("params.yaml"),
    manifest: Annotated[Path, typer.Option(help="Manifest from `ingest`.")] = MANIFEST,
    folds: Annotated[Path, typer.Option(help="Folds from `split`.")] = FOLDS,
    out: Annotated[Path, typer.Option(help="Output folder (one training manifest per fold).")] = OUT / "balance",
) -> None:
    """Train a conditional GAN per training set, report on its tiles, and decide (ablation) whether to use them."""
    from bonetumor.balance.gan import run_balance
    from bonetumor.data.datasets import read_decision

    def stage() -> None:
        config, project = stage_config(params)
        with tracked_stage(config, None, project, "bonetumor balance"):
            summary = run_balance(config, manifest, folds, out, project_dir=project)
        for name, info in summary["sets"].items():
            quality = info.get("quality")
            verdict = "" if quality is None else f", quality {'passed' if quality['passed'] else 'failed'}"
            typer.echo(f"{name}: generated {info['generated']}{verdict}")
        typer.echo(f"gate: {read_decision(out)['reason']}")

    run_stage(stage)


@app.command()
def train(
    params: ParamsOption = Path("params.yaml"),
    manifest: Annotated[Path, typer.Option(help="Manifest from `ingest`.")] = MANIFEST,
    folds: Annotated[Path, typer.Option(help="Folds from `split`.")] = FOLDS,
    policy: Annotated[Path, typer.Option(help="Policy from `augment`.")] = POLICY,
    balanced: Annotated[Path, typer.Option("--balance", help="Output of `balance`.")] = OUT / "balance",
    validation: Annotated[Path, typer.Option(help="Output of `validate` (logged with the runs).")] = OUT / "validate",
    out: Annotated[Path, typer.Option(help="Output folder (runs.json, <candidate>/oof.csv).")] = OUT / "train",
) -> None:
    """Cross-validate every candidate on every fold (MLflow: a parent run per candidate, a nested run per fold)."""
    from bonetumor.training.cross_validation import run_cross_validation

    def stage() -> None:
        config, project = stage_config(params)
        with tracked_stage(config, None, project, "bonetumor train"):
            runs = run_cross_validation(config, manifest, folds, policy, balanced, out, project, validation)
        for arch, info in runs["architectures"].items():
            typer.echo(
                f"{arch}: MLflow run {info['run_id']}, best steps {[f['best_step'] for f in info['folds']]}, "
                f"init {info['init']}"
            )

    run_stage(stage)


@app.command()
def evaluate(
    params: ParamsOption = Path("params.yaml"),
    trained: Annotated[Path, typer.Option("--train", help="Output of `train`.")] = OUT / "train",
    balanced: Annotated[
        Path, typer.Option("--balance", help="Output of `balance` (its gate decision and report).")
    ] = OUT / "balance",
    out: Annotated[Path, typer.Option(help="Output folder (metrics/, reports/, plots/).")] = OUT / "evaluate",
) -> None:
    """Score out-of-fold predictions, plot confusion matrices, rank the architectures."""
    from bonetumor.evaluation.evaluate import run_evaluation

    def stage() -> None:
        config, project = stage_config(params)
        with tracked_stage(config, None, project, "bonetumor evaluate"):
            comparison = run_evaluation(config, trained, out, project, balanced)
        for arch in comparison["ranking"]:
            s = comparison["scores"][arch]
            typer.echo(
                f"{arch}: accuracy {s['accuracy']:.3f}, macro-F1 {s['f1_macro']:.3f}, "
                f"per-fold macro-F1 {s['fold_f1_macro_mean']:.3f}"
            )
        typer.echo(f"winner: {comparison['winner']}")

    run_stage(stage)


@app.command()
def register(
    params: ParamsOption = Path("params.yaml"),
    manifest: Annotated[Path, typer.Option(help="Manifest from `ingest`.")] = MANIFEST,
    policy: Annotated[Path, typer.Option(help="Policy from `augment`.")] = POLICY,
    balanced: Annotated[Path, typer.Option("--balance", help="Output of `balance`.")] = OUT / "balance",
    trained: Annotated[Path, typer.Option("--train", help="Output of `train`.")] = OUT / "train",
    evaluated: Annotated[Path, typer.Option("--evaluate", help="Output of `evaluate`.")] = OUT / "evaluate",
    folds: Annotated[Path, typer.Option(help="Folds from `split`.")] = FOLDS,
    out: Annotated[Path, typer.Option(help="Output folder (bundle/, champion.json).")] = OUT / "register",
) -> None:
    """Refit the winner on all training tiles, register it; the champion gate decides champion or challenger."""
    from bonetumor.registry.register import run_registration

    def stage() -> None:
        config, project = stage_config(params)
        with tracked_stage(config, None, project, "bonetumor register"):
            champion = run_registration(config, manifest, policy, balanced, trained, evaluated, out, project, folds)
        typer.echo(
            f"registered {champion['model_name']} version {champion['version']} "
            f"as @{champion['alias']} ({champion['arch']}): {champion['gate']['reason']}"
        )
        if champion["test"]:
            typer.echo(f"held-out test set: accuracy {champion['test']['accuracy']:.3f} (n={champion['test']['n']})")

    run_stage(stage)


@app.command()
def report(
    outputs: Annotated[Path, typer.Option(help="The pipeline's output folder.")] = OUT,
    readme: Annotated[
        Path | None, typer.Option(help="Write the figures into this README's measured block instead of printing.")
    ] = None,
    demo_time: Annotated[
        str | None, typer.Option(help="Measured `time make pipeline` to quote, e.g. '12 min'.")
    ] = None,
) -> None:
    """Print the run's measured figures as Markdown (or write them into the README), from the outputs only."""
    from bonetumor.evaluation.report import measured_markdown, update_readme

    def stage() -> None:
        block = measured_markdown(outputs, demo_time)
        if readme is None:
            typer.echo(block, nl=False)
        else:
            typer.echo(f"figures of {outputs} -> {update_readme(readme, block)}")

    run_stage(stage)


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered model version to serve.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the alias history for the audit trail).")],
    params: ParamsOption = Path("params.yaml"),
    force: Annotated[bool, typer.Option(help="Promote even when it lowers the gate's figures (recorded).")] = False,
) -> None:
    """Point the champion alias at a version by hand, after review (the gate kept it as challenger)."""
    from bonetumor.stages import promote_model

    def stage() -> None:
        promoted = promote_model(params, version, reason, force)
        typer.echo(f"{promoted['model_name']} version {version} is now @{promoted['alias']}")

    run_stage(stage)


@app.command()
def predict(
    tiles: Annotated[list[Path], typer.Argument(help="Tile image files (JPEG, PNG, TIFF).")],
    params: ParamsOption = Path("params.yaml"),
    model: Annotated[str, typer.Option(help="Alias or version number of the registered model.")] = "",
) -> None:
    """Classify tiles with the registered model and print one JSON answer per tile.

    A tile that cannot be read or decoded gets an ``error`` answer; the others are still classified, and the
    exit status is 1 when any tile failed.
    """
    from bonetumor.stages import predict_tiles

    failed = 0

    def stage() -> None:
        nonlocal failed
        for answer in predict_tiles(params, tiles, model or None):
            failed += "error" in answer
            typer.echo(json.dumps(answer))

    run_stage(stage)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def assess(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            help="A whole-slide image (SVS, NDPI, MRXS, tiled TIFF, DICOM), a large JPEG/PNG/TIFF, or a folder or "
            "zip of one slide's TCIA tiles named like Case-48-P5-C20-15162-19423.jpg.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the answer, the map and the exports.")],
    params: ParamsOption = Path("params.yaml"),
    model: Annotated[str, typer.Option(help="Alias or version number of the registered model.")] = "",
    mpp: Annotated[
        float | None, typer.Option(help="Microns per pixel of the input, when it records none (assess.mpp).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole answer as JSON on stdout.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bar on stderr.")] = True,
) -> None:
    """Estimate percent necrosis over a whole slide: classify every tissue tile at the training scale.

    Writes assessment.json, tiles.csv, tiles.geojson (QuPath: File > Import objects from file) and overlay.png
    into --out. The figure is an estimate for a pathologist to confirm.
    """
    from bonetumor.stages import assess_input

    def stage() -> None:
        result = assess_input(params, input_path, out, model or None, mpp, progress)
        summary = result.summary
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        interval = summary["necrosis_interval"]
        necrosis = summary["necrosis_percent"]
        typer.echo(f"{summary['name']}: {summary['tiles']} tissue tiles {summary['tiles_per_class']}")
        if necrosis is not None:
            span = f" (interval {interval[0]:.1f}-{interval[1]:.1f} %" if interval else " ("
            sampling = summary["interval"]["bootstrap"]
            if sampling:
                span += f"; sampling alone {sampling[0]:.1f}-{sampling[1]:.1f} %"
            typer.echo(f"necrosis: {necrosis:.1f} %{span}); tumour area {summary['tumour_area_mm2']:.1f} mm2")
        typer.echo(
            f"referred to a pathologist: {summary['referred']['tiles']} tiles ({summary['referred']['share']:.0%})"
        )
        typer.echo(summary["response"]["text"])
        for kind, path in result.files.items():
            typer.echo(f"{kind}: {path}")

    run_stage(stage)


@app.command()
def check(params: ParamsOption = Path("params.yaml")) -> None:
    """Check params.yaml, the data source, the weights setting and the tracking store, in seconds.

    ``make pipeline`` runs it before ``dvc repro``: DVC deletes a stage's outputs before it runs the stage, so a
    typo found here costs nothing.
    """
    from bonetumor.stages import preflight

    def stage() -> None:
        for line in preflight(params):
            typer.echo(f"ok: {line}")

    run_stage(stage)


@app.command("demo-slide")
def demo_slide(
    out: Annotated[Path, typer.Argument(help="The pyramidal TIFF to write, e.g. outputs/demo/slide.tif.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Write a demo slide: the sample's real tiles on a known layout (glass, normal tissue, necrosis, tumour).

    The tiles are the sample's own, so a model trained on the sample has seen them: the demo shows the tool
    working, not how well it does on new slides.
    """
    from bonetumor.stages import write_demo_slide_file

    def stage() -> None:
        result = write_demo_slide_file(params, out)
        typer.echo(
            f"wrote {result['path']}: {result['tiles_per_class']} tiles of {result['tile_px']} px at "
            f"{result['mpp']} um/px; the layout's necrosis is {result['necrosis_percent']} %"
        )

    run_stage(stage)


_add_subcommands()

if __name__ == "__main__":  # pragma: no cover
    app()
