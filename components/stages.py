"""One kfp v2 lightweight Python component per pipeline stage.

Each component is a thin adapter: it builds the :class:`bonetumor.config.Config` from the pipeline's ``params``
dict (params.yaml content; missing sections and fields take the defaults), calls the stage function of the
``bonetumor`` package with paths taken from its typed artifacts, and copies a few headline values into artifact
metadata for the KFP UI. The stage functions write folders, so every folder-shaped output uses ``artifact.path``
as the stage's output folder.

KFP serialises each function's source into the pipeline spec and runs it in :data:`BASE_IMAGE`, so every import
is inside the function body and nothing is pip-installed at run time (``install_kfp_package=False``): the image
already holds the package and kfp, which keeps the components working offline and under ``kfp.local``.

Each component first calls :func:`bonetumor.runtime.configure_process`, as the CLI does: it switches telemetry off
and quietens chatty loggers. The project folder handed to the stages is the task's working folder:
it resolves a relative ``source_dir`` or sqlite tracking URI, and holds ``mlartifacts/`` when MLflow uses a local
sqlite store (kfp.local); on a cluster the tracking server stores the artifacts.

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
    import os

    from bonetumor.config import Config
    from bonetumor.data.ingest import run_ingest
    from bonetumor.runtime import configure_process

    configure_process()
    raw = dict(params)
    raw["data"] = {**(raw.get("data") or {}), "source": source_dir}
    config = Config.from_dict(raw, source="pipeline params")
    frame = run_ingest(config, os.getcwd(), dataset.path, copy_images=True)
    dataset.metadata.update(
        {"n_tiles": len(frame), "n_slides": int(frame["slide"].nunique()), "n_cases": int(frame["case"].nunique())}
    )


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def validate(params: dict, dataset: Input[Dataset], report: Output[Artifact]) -> None:
    """Run the data validation suite; raise (and so stop the pipeline) when an expectation fails.

    Args:
        params: params.yaml content (sections may be missing).
        dataset: The ingest output.
        report: Output folder: ``report.json`` and ``config.resolved.yaml``.
    """
    from pathlib import Path

    from bonetumor.config import Config
    from bonetumor.data.manifest import MANIFEST_FILE
    from bonetumor.data.validate import run_validation
    from bonetumor.runtime import configure_process

    configure_process()
    config = Config.from_dict(params, source="pipeline params")
    result = run_validation(config, Path(dataset.path) / MANIFEST_FILE, report.path)
    report.metadata.update({"success": result["success"], "n_tiles": result["n_tiles"]})


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
    from pathlib import Path

    from bonetumor.config import Config
    from bonetumor.data.manifest import MANIFEST_FILE
    from bonetumor.data.split import run_split
    from bonetumor.data.validate import TILES_FILE
    from bonetumor.runtime import configure_process

    configure_process()
    config = Config.from_dict(params, source="pipeline params")
    result = run_split(
        config, Path(dataset.path) / MANIFEST_FILE, folds.path, Path(validation_report.path) / TILES_FILE
    )
    folds.metadata.update(
        {"n_folds": result["n_folds"], "group_by": result["group_by"], "validated_by": validation_report.uri}
    )


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
    from pathlib import Path

    from bonetumor.config import Config
    from bonetumor.data.manifest import MANIFEST_FILE
    from bonetumor.runtime import configure_process
    from bonetumor.transforms.augment import run_augment

    configure_process()
    config = Config.from_dict(params, source="pipeline params")
    result = run_augment(config, Path(dataset.path) / MANIFEST_FILE, policy.path)
    policy.metadata.update({"digest": result.digest(), "validated_by": validation_report.uri})


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def balance(params: dict, dataset: Input[Dataset], folds: Input[Artifact], balanced: Output[Dataset]) -> None:
    """Balance each fold's training set (and the full set) with conditional-GAN tiles.

    Args:
        params: params.yaml content (sections may be missing).
        dataset: The ingest output.
        folds: The split output.
        balanced: Output folder: one ``<set>/train_manifest.csv`` per training set and ``summary.json``.
    """
    from pathlib import Path

    from bonetumor.balance.gan import run_balance
    from bonetumor.config import Config
    from bonetumor.data.manifest import MANIFEST_FILE
    from bonetumor.data.split import FOLDS_FILE
    from bonetumor.runtime import configure_process

    configure_process()
    config = Config.from_dict(params, source="pipeline params")
    summary = run_balance(
        config,
        manifest_path=Path(dataset.path) / MANIFEST_FILE,
        folds_path=Path(folds.path) / FOLDS_FILE,
        out_dir=balanced.path,
    )
    balanced.metadata.update(
        {f"generated_{name}": sum(info["generated"].values()) for name, info in summary["sets"].items()}
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
    """Cross-validate every architecture (MLflow: a parent run per architecture, a nested run per fold).

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        dataset: The ingest output.
        folds: The split output.
        policy: The augment output.
        balanced: The balance output.
        validation_report: The validate output (report and Data Docs, logged with the runs).
        training: Output folder: ``runs.json``, ``<arch>/oof.csv`` (out-of-fold predictions), Grad-CAM galleries.
    """
    import os
    from pathlib import Path

    from bonetumor.config import Config
    from bonetumor.data.manifest import MANIFEST_FILE
    from bonetumor.data.split import FOLDS_FILE
    from bonetumor.runtime import configure_process
    from bonetumor.training.cross_validation import run_cross_validation
    from bonetumor.transforms.augment import POLICY_FILE

    configure_process()
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    config = Config.from_dict(params, source="pipeline params")
    runs = run_cross_validation(
        config,
        manifest_path=Path(dataset.path) / MANIFEST_FILE,
        folds_path=Path(folds.path) / FOLDS_FILE,
        policy_path=Path(policy.path) / POLICY_FILE,
        balance_dir=balanced.path,
        out_dir=training.path,
        project_dir=os.getcwd(),
        validation_dir=validation_report.path,
    )
    training.metadata.update(
        {
            "experiment_id": runs["experiment_id"],
            **{f"run_id_{arch}": info["run_id"] for arch, info in runs["architectures"].items()},
        }
    )


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
        evaluation: Output folder: ``comparison.json``, ``comparison.md``, ``metrics.json``, ``plots/``, ``reports/``.
        metrics: The winner's scalar out-of-fold metrics.
        confusion_matrix: The winner's out-of-fold confusion matrix.
        comparison: The architecture comparison table (Markdown).
    """
    import os
    from pathlib import Path

    from bonetumor.config import Config
    from bonetumor.evaluation.evaluate import COMPARISON_MD_FILE, run_evaluation
    from bonetumor.runtime import configure_process

    configure_process()
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    config = Config.from_dict(params, source="pipeline params")
    result = run_evaluation(config, train_dir=training.path, out_dir=evaluation.path, project_dir=os.getcwd())
    winner = result["winner"]
    scores = result["scores"][winner]
    evaluation.metadata.update({"winner": winner, "ranking": result["ranking"], "selection": result["selection"]})
    for name, value in scores.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))
    confusion_matrix.log_confusion_matrix(list(config.data.classes), scores["confusion_matrix"])
    confusion_matrix.metadata["arch"] = winner
    Path(comparison.path).parent.mkdir(parents=True, exist_ok=True)
    Path(comparison.path).write_text(
        (Path(evaluation.path) / COMPARISON_MD_FILE).read_text(encoding="utf-8"), encoding="utf-8"
    )


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
    import os
    from pathlib import Path

    from bonetumor.config import Config
    from bonetumor.data.manifest import MANIFEST_FILE
    from bonetumor.data.split import FOLDS_FILE
    from bonetumor.registry.register import run_registration
    from bonetumor.runtime import configure_process
    from bonetumor.transforms.augment import POLICY_FILE

    configure_process()
    if mlflow_tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    config = Config.from_dict(params, source="pipeline params")
    champion = run_registration(
        config,
        manifest_path=Path(dataset.path) / MANIFEST_FILE,
        policy_path=Path(policy.path) / POLICY_FILE,
        balance_dir=balanced.path,
        train_dir=training.path,
        evaluate_dir=evaluation.path,
        out_dir=model.path,
        project_dir=os.getcwd(),
        folds_path=Path(folds.path) / FOLDS_FILE,
    )
    model.metadata.update(
        {key: champion[key] for key in ("model_name", "version", "alias", "model_uri", "arch", "run_id", "cv_run_id")}
    )
