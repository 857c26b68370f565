"""The training pipeline as a Kubeflow pipeline: the same DAG as dvc.yaml.

::

    ingest -> validate -+-> split ---> balance -+-> train -> evaluate -> register
                        +-> augment ------------+

Train also reads the data set and the folds; register reads the data set, the augmentation policy, the
balanced sets, the training runs and the evaluation (as in dvc.yaml's deps).

Every component reads its sections of ``params`` (params.yaml content, see ``pipelines/submit.py``); sections
that are missing take the defaults of :mod:`bonetumor.config`, which mirror params.yaml. The stages that log to
MLflow (train, evaluate, register) never come from KFP's cache, for the same reason dvc.yaml keeps them out of
DVC's run cache: a cached task would skip its MLflow runs and the model registration. Ingest is not cached
either: KFP keys its cache on the ``source_dir`` string, not on the tiles in it.
"""

from kfp import dsl

from components.stages import augment, balance, evaluate, ingest, register, split, train, validate

PIPELINE_NAME = "bonetumor-training"
#: Where the project image holds the sample tiles.
DEFAULT_SOURCE_DIR = "/app/data/sample/images"
#: The in-cluster MLflow tracking server.
DEFAULT_MLFLOW_TRACKING_URI = "http://mlflow.mlflow.svc.cluster.local:5000"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Osteosarcoma H&E tile classification: ingest, validate, split, augment, GAN-balance, "
    "cross-validate, evaluate and register the champion in MLflow.",
)
def training_pipeline(
    source_dir: str = DEFAULT_SOURCE_DIR,
    params: dict = {},  # noqa: B006  (a pipeline parameter default, compiled into the spec; never mutated)
    mlflow_tracking_uri: str = DEFAULT_MLFLOW_TRACKING_URI,
) -> None:
    """Train, compare and register the tile classifier.

    Args:
        source_dir: Folder with one sub-folder per class (overrides ``data.source``).
        params: params.yaml content as a dict; missing sections and fields take the package defaults.
        mlflow_tracking_uri: MLflow tracking URI shared by train, evaluate and register.
    """
    ingest_task = ingest(source_dir=source_dir, params=params)
    # KFP's cache key sees the folder's path, not its content (DVC hashes the content): never reuse a cached scan.
    ingest_task.set_caching_options(enable_caching=False)
    dataset = ingest_task.outputs["dataset"]

    # Validation raises on failure, which fails the task and stops everything downstream. Split and augment
    # take its report as an input, so nothing downstream can run on unvalidated data.
    validate_task = validate(params=params, dataset=dataset)
    report = validate_task.outputs["report"]

    split_task = split(params=params, dataset=dataset, validation_report=report)
    augment_task = augment(params=params, dataset=dataset, validation_report=report)

    balance_task = balance(params=params, dataset=dataset, folds=split_task.outputs["folds"])
    # One GAN per training set: CPU-bound.
    balance_task.set_cpu_request("2").set_cpu_limit("4").set_memory_request("4Gi").set_memory_limit("8Gi")

    train_task = train(
        params=params,
        mlflow_tracking_uri=mlflow_tracking_uri,
        dataset=dataset,
        folds=split_task.outputs["folds"],
        policy=augment_task.outputs["policy"],
        balanced=balance_task.outputs["balanced"],
        validation_report=report,
    )
    train_task.set_cpu_request("4").set_cpu_limit("8").set_memory_request("8Gi").set_memory_limit("16Gi")
    train_task.set_caching_options(enable_caching=False)
    # To train on a GPU (train.device: auto picks CUDA when present), request one on this task, e.g.:
    #   train_task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    # (plus a node selector/toleration for your GPU nodes via kfp-kubernetes), and do the same on register_task.

    evaluate_task = evaluate(
        params=params,
        mlflow_tracking_uri=mlflow_tracking_uri,
        training=train_task.outputs["training"],
    )
    evaluate_task.set_caching_options(enable_caching=False)

    register_task = register(
        params=params,
        mlflow_tracking_uri=mlflow_tracking_uri,
        dataset=dataset,
        policy=augment_task.outputs["policy"],
        balanced=balance_task.outputs["balanced"],
        training=train_task.outputs["training"],
        evaluation=evaluate_task.outputs["evaluation"],
        folds=split_task.outputs["folds"],
    )
    # Refits the winner on all tiles, like one fold of train.
    register_task.set_cpu_request("4").set_cpu_limit("8").set_memory_request("8Gi").set_memory_limit("16Gi")
    register_task.set_caching_options(enable_caching=False)
