"""One kfp v2 lightweight Python component per pipeline stage.

Each component is a thin adapter: it calls the matching ``*_stage`` function of :mod:`bonetumor.stages` with
the pipeline's ``params`` dict (params.yaml content; missing sections and fields take the defaults) and the paths
of its typed artifacts, and copies the headline values the stage function returns into artifact metadata for the
KFP UI. The set-up every stage shares (:func:`bonetumor.runtime.configure_process`, the config built from
``params``, the MLflow tracking URI override, the file names inside upstream artifact folders) lives in that
module, not here. The stage functions write folders, so every folder-shaped output uses ``artifact.path`` as the
stage's output folder.

KFP serialises each function's source into the pipeline spec and runs it in :data:`BASE_IMAGE`, so every import
is inside the function body and nothing is pip-installed at run time (``install_kfp_package=False``): the image
already holds the package and kfp, which keeps the components working offline and under ``kfp.local``.

The project folder handed to the stages is the task's working folder: it resolves a relative ``source_dir`` or
sqlite tracking URI, and holds ``mlartifacts/`` when MLflow uses a local sqlite store (kfp.local); on a cluster
the tracking server stores the artifacts.

Errors are not caught: a stage that raises (for example :class:`bonetumor.errors.DataValidationError`) fails
its task, and KFP stops everything downstream of it.
"""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

#: The project image (infra/Dockerfile): the bonetumor package, kfp, and the sample tiles under /app/data/sample.
BASE_IMAGE = "ghcr.io/bonetumor/bonetumor:0.1.0"


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest(source_dir: str, params: dict, dataset: Output[Dataset]) -> None:
    """Scan ``source_dir`` (one sub-folder per class) and write the manifest plus a copy of every tile.

    The tiles are copied into the artifact (``images/``) so the data set travels as one artifact; the manifest's
    paths are relative to the manifest's folder.

    Args:
        source_dir: Folder with one sub-folder per class; overrides ``data.source`` of ``params``.
        params: params.yaml content (sections may be missing).
        dataset: Output folder: ``manifest.csv``, ``images/`` and ``config.resolved.yaml``.
    """
    from bonetumor.stages import ingest_stage

    dataset.metadata.update(ingest_stage(params, source_dir=source_dir, out_dir=dataset.path))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate(params: dict, dataset: Input[Dataset], report: Output[Artifact]) -> None:
    """Run the data validation suite; raise (and so stop the pipeline) when an expectation fails.

    Args:
        params: params.yaml content (sections may be missing).
        dataset: The ingest output.
        report: Output folder: ``report.json`` and ``config.resolved.yaml``.
    """
    from bonetumor.stages import validate_stage

    report.metadata.update(validate_stage(params, dataset_dir=dataset.path, out_dir=report.path))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def split(params: dict, dataset: Input[Dataset], validation_report: Input[Artifact], folds: Output[Artifact]) -> None:
    """Make grouped, stratified cross-validation folds.

    Args:
        params: params.yaml content (sections may be missing).
        dataset: The ingest output.
        validation_report: The validate output: it gates this stage, and its ``tiles.csv`` names the
            near-duplicate clusters that must stay on one side of every fold.
        folds: Output folder: ``folds.json``, ``folds_report.json`` and ``config.resolved.yaml``.
    """
    from bonetumor.stages import split_stage

    result = split_stage(params, dataset_dir=dataset.path, validation_dir=validation_report.path, out_dir=folds.path)
    folds.metadata.update({**result, "validated_by": validation_report.uri})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def augment(
    params: dict, dataset: Input[Dataset], validation_report: Input[Artifact], policy: Output[Artifact]
) -> None:
    """Write the augmentation policy and its preview grid.

    Args:
        params: params.yaml content (sections may be missing).
        dataset: The ingest output.
        validation_report: The validate output; taken only so that validation gates this stage.
        policy: Output folder: ``policy.json``, ``preview.png`` and ``config.resolved.yaml``.
    """
    from bonetumor.stages import augment_stage

    result = augment_stage(params, dataset_dir=dataset.path, out_dir=policy.path)
    policy.metadata.update({**result, "validated_by": validation_report.uri})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def balance(params: dict, dataset: Input[Dataset], folds: Input[Artifact], balanced: Output[Dataset]) -> None:
    """Balance each fold's training set (and the full set) with conditional-GAN tiles.

    Args:
        params: params.yaml content (sections may be missing).
        dataset: The ingest output.
        folds: The split output.
        balanced: Output folder: one ``<set>/train_manifest.csv`` per training set and ``summary.json``.
    """
    from bonetumor.stages import balance_stage

    balanced.metadata.update(
        balance_stage(params, dataset_dir=dataset.path, folds_dir=folds.path, out_dir=balanced.path)
    )


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def train(
    params: dict,
    mlflow_tracking_uri: str,
    dataset: Input[Dataset],
    folds: Input[Artifact],
    policy: Input[Artifact],
    balanced: Input[Dataset],
    validation_report: Input[Artifact],
    training: Output[Artifact],
) -> None:
    """Cross-validate every candidate (MLflow: a parent run per candidate, a nested run per fold).

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        dataset: The ingest output.
        folds: The split output.
        policy: The augment output.
        balanced: The balance output.
        validation_report: The validate output (report and Data Docs, logged with the runs).
        training: Output folder: ``runs.json``, ``<candidate>/oof.csv`` (out-of-fold predictions), Grad-CAM galleries.
    """
    from bonetumor.stages import train_stage

    result = train_stage(
        params,
        dataset_dir=dataset.path,
        folds_dir=folds.path,
        policy_dir=policy.path,
        balance_dir=balanced.path,
        validation_dir=validation_report.path,
        out_dir=training.path,
        tracking_uri=mlflow_tracking_uri,
    )
    training.metadata.update(result)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    params: dict,
    mlflow_tracking_uri: str,
    training: Input[Artifact],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    comparison: Output[Markdown],
) -> None:
    """Score the out-of-fold predictions, rank the architectures and pick the winner.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        training: The train output.
        evaluation: Output folder: ``comparison.json``, ``comparison.md``, ``metrics/`` (headline figures),
            ``plots/``, ``reports/``.
        metrics: The winner's scalar out-of-fold metrics.
        confusion_matrix: The winner's out-of-fold confusion matrix.
        comparison: The architecture comparison table (Markdown).
    """
    from bonetumor.stages import evaluate_stage

    result = evaluate_stage(
        params,
        train_dir=training.path,
        out_dir=evaluation.path,
        comparison_path=comparison.path,
        tracking_uri=mlflow_tracking_uri,
    )
    evaluation.metadata.update(result["evaluation"])
    for name, value in result["metrics"].items():
        metrics.log_metric(name, value)
    matrix = result["confusion_matrix"]
    confusion_matrix.log_confusion_matrix(matrix["classes"], matrix["matrix"])
    confusion_matrix.metadata["arch"] = matrix["arch"]


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(
    params: dict,
    mlflow_tracking_uri: str,
    dataset: Input[Dataset],
    policy: Input[Artifact],
    balanced: Input[Dataset],
    training: Input[Artifact],
    evaluation: Input[Artifact],
    folds: Input[Artifact],
    model: Output[Model],
) -> None:
    """Refit the winner, register it in MLflow, and set the alias the champion gate decides.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        dataset: The ingest output.
        policy: The augment output.
        balanced: The balance output.
        training: The train output.
        evaluation: The evaluate output.
        folds: The split output (the gate compares models on the same folds; test tiles are scored).
        model: Output folder: ``bundle/`` (weights and metadata) and ``champion.json``.
    """
    from bonetumor.stages import register_stage

    result = register_stage(
        params,
        dataset_dir=dataset.path,
        policy_dir=policy.path,
        balance_dir=balanced.path,
        train_dir=training.path,
        evaluate_dir=evaluation.path,
        folds_dir=folds.path,
        out_dir=model.path,
        tracking_uri=mlflow_tracking_uri,
    )
    model.metadata.update(result)
