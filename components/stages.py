"""One kfp v2 lightweight Python component per pipeline step, built for an image chosen at compile time.

Each component is a thin adapter: it calls the matching ``*_stage`` function of :mod:`bonetumor.stages` with
the pipeline's ``params`` dict (params.yaml content; missing sections and fields take the defaults) and the paths
of its typed artifacts, and copies the headline values the stage function returns into artifact metadata for the
KFP UI. The set-up every stage shares (:func:`bonetumor.runtime.configure_process`, the config built from
``params``, the MLflow tracking URI override, the file names inside upstream artifact folders) lives in that
module, not here. The stage functions write folders, so every folder-shaped output uses ``artifact.path`` as the
stage's output folder.

The train stage of dvc.yaml is three steps here, so that a cluster trains the folds in parallel: ``cv_plan``
(the parent runs), one ``train_fold`` per fold and group, and ``gather``. ``bonetumor train`` runs the same three
functions in one process (:func:`bonetumor.training.cross_validation.run_cross_validation`).

The functions below are plain Python; :func:`build_components` turns them into components for one image (the
``--image`` of ``bonetumor pipeline compile``). KFP serialises each function's source into the pipeline spec and
runs it in that image, so every import is inside the function body and nothing is pip-installed at run time
(``install_kfp_package=False``): the image already holds the package and kfp, which keeps the components
working offline and under ``kfp.local``.

The project folder handed to the stages is the task's working folder: it resolves a relative sqlite tracking
URI, and holds ``mlartifacts/`` when MLflow uses a local sqlite store (kfp.local); on a cluster the tracking
server stores the artifacts.

Errors are not caught: a stage that raises (for example :class:`bonetumor.errors.DataValidationError`) fails
its task, and KFP stops everything downstream of it.
"""

from types import SimpleNamespace
from typing import List, NamedTuple  # noqa: UP035  (KFP reads these annotations; it needs the typing names)

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

#: The project image (infra/Dockerfile) when ``--image`` is not given: the bonetumor package, kfp, the sample tiles.
DEFAULT_IMAGE = "ghcr.io/bonetumor/bonetumor:0.1.0"
#: The components, in pipeline order.
STEPS = (
    "fetch_data",
    "ingest",
    "validate",
    "split",
    "augment",
    "cv_plan",
    "balance",
    "merge_balanced",
    "train_fold",
    "gather",
    "evaluate",
    "register",
)


def build_components(image: str = DEFAULT_IMAGE) -> SimpleNamespace:
    """Return every step as a kfp component that runs in ``image``.

    Args:
        image: Container image (``registry/name:tag``) holding the bonetumor package and kfp.

    Returns:
        A namespace with one component per name of :data:`STEPS`.
    """
    functions = {name: globals()[name] for name in STEPS}
    return SimpleNamespace(
        **{name: dsl.component(func, base_image=image, install_kfp_package=False) for name, func in functions.items()}
    )


def fetch_data(data_version: str, dvc_remote: str, source_dir: str, tiles: Output[Dataset]) -> str:
    """Bring the tiles of one data version into the pipeline: from the DVC remote, or the image's own copy.

    Args:
        data_version: DVC md5 of the tiles folder (``<md5>.dir``, from its ``.dvc`` file or ``dvc.lock``).
        dvc_remote: The DVC remote (``s3://bucket/path``; MinIO through ``AWS_ENDPOINT_URL``); empty: copy
            ``source_dir`` from the image.
        source_dir: The tiles baked into the image (used when ``dvc_remote`` is empty).
        tiles: Output folder: one sub-folder per class.

    Returns:
        The data version of the tiles written.
    """
    from bonetumor.data.remote import fetch_data_version

    tiles.metadata.update(fetch_data_version(data_version, dvc_remote, source_dir, tiles.path))
    return data_version


def ingest(params: dict, tiles: Input[Dataset], dataset: Output[Dataset]) -> None:
    """Scan the fetched tiles (one sub-folder per class) and write the manifest plus a copy of every tile.

    The tiles are copied into the artifact (``images/``) so the data set travels as one artifact; the manifest's
    paths are relative to the manifest's folder.

    Args:
        params: params.yaml content (sections may be missing).
        tiles: The fetch_data output.
        dataset: Output folder: ``manifest.csv``, ``images/`` and ``config.resolved.yaml``.
    """
    from bonetumor.stages import ingest_stage

    dataset.metadata.update(ingest_stage(params, source_dir=tiles.path, out_dir=dataset.path))


def validate(params: dict, dataset: Input[Dataset], report: Output[Artifact]) -> None:
    """Run the data validation suite; raise (and so stop the pipeline) when an expectation fails.

    Args:
        params: params.yaml content (sections may be missing).
        dataset: The ingest output.
        report: Output folder: ``report.json`` and ``config.resolved.yaml``.
    """
    from bonetumor.stages import validate_stage

    report.metadata.update(validate_stage(params, dataset_dir=dataset.path, out_dir=report.path))


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


def cv_plan(
    params: dict,
    mlflow_tracking_uri: str,
    dataset: Input[Dataset],
    folds: Input[Artifact],
    policy: Input[Artifact],
    validation_report: Input[Artifact],
    plan: Output[Artifact],
) -> NamedTuple("PlanOutputs", [("folds", list), ("units", list), ("groups", list)]):  # type: ignore[valid-type]
    """Open the cross-validation's MLflow parent runs and plan the fold tasks.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        dataset: The ingest output.
        folds: The split output.
        policy: The augment output.
        validation_report: The validate output (report and Data Docs, logged with the parent runs).
        plan: Output folder: ``cv_plan.json``.

    Returns:
        The fold indices (one balance task each), the fold tasks (``{"fold", "group"}`` each) and the groups.
    """
    from collections import namedtuple

    from bonetumor.stages import cv_plan_stage

    result = cv_plan_stage(
        params,
        dataset_dir=dataset.path,
        folds_dir=folds.path,
        policy_dir=policy.path,
        validation_dir=validation_report.path,
        out_dir=plan.path,
        tracking_uri=mlflow_tracking_uri,
    )
    plan.metadata.update({"experiment_id": result["experiment_id"], "units": len(result["unit_list"])})
    outputs = namedtuple("PlanOutputs", ["folds", "units", "groups"])  # type: ignore[name-match]
    return outputs(result["folds"], result["unit_list"], result["groups"])


def balance(
    params: dict,
    mlflow_tracking_uri: str,
    fold: int,
    dataset: Input[Dataset],
    folds: Input[Artifact],
    balanced: Output[Dataset],
    decision: dict = {},  # noqa: B006  (KFP reads the default from the signature; the function never mutates it)
) -> None:
    """Balance one training set (a fold's, or with ``fold=-1`` the ``full`` set of the refit) with GAN tiles.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI (the GAN's run); overrides ``tracking.uri`` when not empty.
        fold: The fold whose training set to balance; -1 for ``full``.
        dataset: The ingest output.
        folds: The split output.
        balanced: Output folder: ``<set>/`` (training manifest, synthetic tiles, quality report) and ``summary.json``.
        decision: The gate's decision (``merge_balanced``), recorded with the ``full`` set; empty for a fold.
    """
    from bonetumor.stages import balance_stage

    training_set = "full" if int(fold) < 0 else f"fold-{int(fold)}"
    result = balance_stage(
        params,
        dataset_dir=dataset.path,
        folds_dir=folds.path,
        out_dir=balanced.path,
        sets=[training_set],
        decision=dict(decision) or None,
        tracking_uri=mlflow_tracking_uri,
    )
    balanced.metadata.update(result)


def merge_balanced(
    params: dict,
    mlflow_tracking_uri: str,
    sets: Input[List[Dataset]],  # noqa: UP006  (KFP reads the annotation; it needs typing.List)
    dataset: Input[Dataset],
    folds: Input[Artifact],
    balanced: Output[Dataset],
) -> NamedTuple("BalanceOutputs", [("decision", dict)]):  # type: ignore[valid-type]
    """Merge the folds' balance outputs, run the ablation and let the gate decide, as dvc.yaml's balance stage.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI (the ablation's run); overrides ``tracking.uri`` when not empty.
        sets: Every fold's balance output (``dsl.Collected``).
        dataset: The ingest output.
        folds: The split output.
        balanced: Output folder: ``fold-<k>/`` of every fold, ``summary.json``, ``decision.json``, the ablation
            and ``gan_samples/``.

    Returns:
        The gate's decision, for the task that balances the ``full`` set.
    """
    from collections import namedtuple

    from bonetumor.stages import merge_balance_stage

    result = merge_balance_stage(
        params,
        balance_dirs=[s.path for s in sets],
        dataset_dir=dataset.path,
        folds_dir=folds.path,
        out_dir=balanced.path,
        tracking_uri=mlflow_tracking_uri,
    )
    decision = result.pop("decision")
    balanced.metadata.update(result)
    outputs = namedtuple("BalanceOutputs", ["decision"])  # type: ignore[name-match]
    return outputs(decision)


def train_fold(
    params: dict,
    mlflow_tracking_uri: str,
    unit: dict,
    dataset: Input[Dataset],
    folds: Input[Artifact],
    policy: Input[Artifact],
    balanced: Input[Dataset],
    plan: Input[Artifact],
    trained: Output[Artifact],
) -> None:
    """Train one group (an architecture and the models built on it) on one fold, in nested MLflow runs.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        unit: The fold task, ``{"fold": k, "group": name}`` (a group: ``baseline``, an architecture).
        dataset: The ingest output.
        folds: The split output.
        policy: The augment output.
        balanced: The merge_balanced output (every fold's training set); the task reads its own fold's.
        plan: The cv_plan output.
        trained: Output folder: ``unit.json`` and per candidate the fold's out-of-fold predictions and artifacts.
    """
    from bonetumor.stages import cv_fold_stage

    result = cv_fold_stage(
        params,
        dataset_dir=dataset.path,
        folds_dir=folds.path,
        policy_dir=policy.path,
        balance_dir=balanced.path,
        plan_dir=plan.path,
        fold=int(unit["fold"]),
        group=str(unit["group"]),
        out_dir=trained.path,
        tracking_uri=mlflow_tracking_uri,
    )
    trained.metadata.update(result)


def gather(
    params: dict,
    mlflow_tracking_uri: str,
    dataset: Input[Dataset],
    plan: Input[Artifact],
    units: Input[List[Artifact]],  # noqa: UP006  (KFP reads the annotation; it needs typing.List)
    training: Output[Artifact],
) -> None:
    """Gather every fold task into the train output and close the cross-validation's parent runs.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        dataset: The ingest output.
        plan: The cv_plan output.
        units: Every train_fold output (``dsl.Collected``).
        training: Output folder: ``runs.json``, ``<candidate>/oof.csv`` (out-of-fold predictions), Grad-CAM galleries.
    """
    from bonetumor.stages import cv_gather_stage

    result = cv_gather_stage(
        params,
        dataset_dir=dataset.path,
        plan_dir=plan.path,
        unit_dirs=[unit.path for unit in units],
        out_dir=training.path,
        tracking_uri=mlflow_tracking_uri,
    )
    training.metadata.update(result)


def evaluate(
    params: dict,
    mlflow_tracking_uri: str,
    training: Input[Artifact],
    balanced: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    comparison: Output[Markdown],
) -> NamedTuple("EvaluateOutputs", [("register", bool), ("reason", str)]):  # type: ignore[valid-type]
    """Score the out-of-fold predictions, rank the architectures, pick the winner, and say whether to register it.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        training: The gather output.
        balanced: The merge_balanced output (the GAN gate's decision and report, for ``comparison.md``).
        evaluation: Output folder: ``comparison.json``, ``comparison.md``, ``metrics/`` (headline figures),
            ``plots/``, ``reports/``.
        metrics: The winner's scalar out-of-fold metrics.
        confusion_matrix: The winner's out-of-fold confusion matrix.
        comparison: The architecture comparison table (Markdown).

    Returns:
        Whether the refit and registration may run (``register.min_macro_f1``), and why.
    """
    from collections import namedtuple

    from bonetumor.stages import evaluate_stage

    result = evaluate_stage(
        params,
        train_dir=training.path,
        balance_dir=balanced.path,
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
    registration = result["registration"]
    evaluation.metadata.update({"register": registration["allowed"], "register_reason": registration["reason"]})
    outputs = namedtuple("EvaluateOutputs", ["register", "reason"])  # type: ignore[name-match]
    return outputs(registration["allowed"], registration["reason"])


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
    pipeline_run_id: str = "",
) -> None:
    """Refit the winner, register it in MLflow, and set the alias the champion gate decides.

    Args:
        params: params.yaml content (sections may be missing).
        mlflow_tracking_uri: MLflow tracking URI; overrides ``tracking.uri`` when not empty.
        dataset: The ingest output.
        policy: The augment output.
        balanced: The balance output of the ``full`` training set (the refit's).
        training: The gather output.
        evaluation: The evaluate output.
        folds: The split output (the gate compares models on the same folds; test tiles are scored).
        model: Output folder: ``bundle/`` (weights and metadata) and ``champion.json``.
        pipeline_run_id: The Kubeflow run's id (the pipeline passes ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``), recorded
            on the refit run and in the model's lineage.
    """
    import os

    from bonetumor.stages import register_stage

    if pipeline_run_id:
        os.environ["BONETUMOR_PIPELINE_RUNNER"] = "kubeflow"
        os.environ["BONETUMOR_PIPELINE_RUN_ID"] = pipeline_run_id
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
