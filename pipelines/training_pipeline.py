"""The training pipeline as a Kubeflow pipeline: dvc.yaml's DAG, with the cross-validation fanned out.

::

    fetch_data -> ingest -> validate -+-> split ---+-> cv_plan -> for each fold: balance(fold-k) -> merge_balanced
                                      +-> augment -+             for each fold and group: train_fold
                                                   |          -> gather (dsl.Collected) -> evaluate
                                                   +-> balance(full) --------------------+  if evaluate allows:
                                                                                            register (refit)

``cv_plan`` opens the MLflow parent runs and names the folds and the groups (the baseline, and each architecture
with the models built on it). A ``dsl.ParallelFor`` runs one GAN balance per fold (``merge_balanced`` collects
them into one output, laid out as dvc.yaml's balance stage writes it), and a second one runs a ``train_fold``
task per fold and group, ``kubeflow.parallelism`` at a time. ``gather`` collects those into the train stage's
output (the ensemble is scored there, from its members' predictions). ``register`` runs only when ``evaluate``
allows it (``register.min_macro_f1``, :func:`bonetumor.registry.gate.registration_allowed`), under
``dsl.If``.

Built from params.yaml at compile time (:func:`build_pipeline`): the image of every task, the resource requests
per task (``kubeflow.resources``), retries with backoff (``kubeflow.retries``), and with ``train.accelerator: gpu``
an accelerator, node selector and tolerations on the tasks that train (``kubeflow.accelerator_*``). Credentials
reach the pods as environment variables from Kubernetes Secrets (``kubeflow.mlflow_secret``,
``kubeflow.s3_secret``; kfp-kubernetes), never as pipeline parameters; the S3 endpoint comes from the ConfigMap
``bonetumor-pipeline-env`` (infra/k8s/base/pipelines).

Caching: the steps that only compute from their inputs (fetch_data, ingest, validate, split, augment, balance,
merge_balanced)
may come from KFP's cache. Their cache key holds their inputs: ``data_version`` (the DVC md5 of the tiles: the
content, not a path) and ``params``, so a hit is the same data under the same settings. The steps that log to
MLflow (cv_plan, train_fold, gather, evaluate, register) never do: a cached task would skip its runs and the
registration, for the same reason dvc.yaml keeps them out of DVC's run cache.

Every component reads its sections of ``params`` (params.yaml content, see ``pipelines/submit.py``); sections that
are missing take the defaults of :mod:`bonetumor.config`.
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl, kubernetes

from bonetumor.config import Config
from components.stages import DEFAULT_IMAGE, build_components

PIPELINE_NAME = "bonetumor-training"
#: Where the project image holds the sample tiles.
DEFAULT_SOURCE_DIR = "/app/data/sample/images"
#: The in-cluster MLflow tracking server.
DEFAULT_MLFLOW_TRACKING_URI = "http://mlflow.bonetumor.svc.cluster.local:5000"
#: Non-secret settings of the pods (S3 endpoint), from infra/k8s/base/pipelines/pipeline-env.yaml.
CONFIG_MAP = "bonetumor-pipeline-env"
#: The tasks that train a network (they get the accelerator of ``train.accelerator: gpu``).
TRAINING_TASKS = ("train_fold", "register")
#: The tasks that may come from KFP's cache (no MLflow side effects; inputs key their content).
CACHED_TASKS = ("fetch_data", "ingest", "validate", "split", "augment", "balance", "merge_balanced")


def _configure(task: dsl.PipelineTask, name: str, config: Config) -> dsl.PipelineTask:
    """Resources, retries, caching, secrets and (for the training tasks) the accelerator of one task."""
    kf = config.kubeflow
    resources = kf.task_resources(name)
    # The limit is twice the request: a task may burst (decode, GAN) without starving its node.
    if resources.cpu.endswith("m"):
        cpu_limit = f"{2 * float(resources.cpu[:-1]):g}m"
    else:
        cpu_limit = f"{2 * float(resources.cpu):g}"
    task.set_cpu_request(resources.cpu).set_cpu_limit(cpu_limit)
    task.set_memory_request(resources.memory).set_memory_limit(resources.memory)
    if kf.retries:
        task.set_retry(num_retries=kf.retries, backoff_duration=f"{kf.retry_backoff_seconds}s", backoff_factor=2.0)
    task.set_caching_options(enable_caching=name in CACHED_TASKS)
    # optional=True: a cluster without MLflow auth or S3 keys (an in-cluster MinIO with IAM) still runs.
    kubernetes.use_secret_as_env(
        task,
        secret_name=kf.mlflow_secret,
        secret_key_to_env={key: key for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")},
        optional=True,
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=kf.s3_secret,
        secret_key_to_env={key: key for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
        optional=True,
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=CONFIG_MAP,
        config_map_key_to_env={
            key: key for key in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
        },
        optional=True,
    )
    if name in TRAINING_TASKS and config.train.accelerator == "gpu":
        task.set_accelerator_type(kf.accelerator_type).set_accelerator_limit(kf.accelerator_limit)
        for key, value in kf.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in kf.tolerations:
            kubernetes.add_toleration(task, **toleration)
    return task


def run_params(config: Config) -> dict[str, Any]:
    """Return the ``params`` run argument: the resolved config, every section with its defaults filled in.

    Leaves out ``data_import`` (how ``bonetumor import-data`` maps the full collection's labels): no pipeline
    step reads it, and its ``None`` entries (labels left out) are not a value a KFP parameter can hold.
    """
    return {name: section for name, section in config.to_dict().items() if name != "data_import"}


def static_fan_out(config: Config) -> tuple[list[int], list[dict[str, Any]]]:
    """Return the folds and fold tasks (``{"fold", "group"}``) ``config`` trains, known before the run."""
    from bonetumor.training.candidates import build_candidates
    from bonetumor.training.cross_validation import fan_out_groups

    folds = list(range(config.split.n_folds))
    groups = list(fan_out_groups(build_candidates(config))[0])
    return folds, [{"fold": fold, "group": group} for fold in folds for group in groups]


def build_pipeline(
    config: Config,
    image: str = DEFAULT_IMAGE,
    fan_out: tuple[list[int], list[dict[str, Any]]] | None = None,
    conditional: bool = True,
) -> Callable[..., Any]:
    """Return the training pipeline for ``image``, with the cluster settings of ``config`` (``kubeflow``, ``train``).

    Args:
        config: The params.yaml the pipeline is compiled from (its ``kubeflow`` section and
            ``train.accelerator``; the run's params are a run argument).
        image: Container image of every task.
        fan_out: Loop over these folds and fold tasks (:func:`static_fan_out`) instead of the ones ``cv_plan``
            returns: kfp.local cannot loop over a task's output, so the local run compiles them in. A run whose
            params plan other folds or groups fails in its first fold task, naming the plan's.
        conditional: Run register under ``dsl.If`` (the evaluation's decision). kfp.local (2.17) skips the body
            of a ``dsl.If`` whatever the condition, so the local run compiles register unconditionally; the
            register stage then refuses by itself (:class:`bonetumor.errors.RegistrationRefusedError`) when
            the evaluation does not allow it.

    Returns:
        The ``@dsl.pipeline`` function, ready for ``kfp.compiler.Compiler``.
    """
    steps = _Steps(build_components(image), config, fan_out, conditional)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description=f"Osteosarcoma H&E tile classification (image {image}): fetch, ingest, validate, split, augment, "
        "GAN-balance and cross-validate per fold in parallel, evaluate, and register the champion in MLflow.",
    )
    def training_pipeline(
        data_version: str = "",
        dvc_remote: str = "",
        source_dir: str = DEFAULT_SOURCE_DIR,
        params: dict = {},  # noqa: B006  (a pipeline parameter default, compiled into the spec; never mutated)
        mlflow_tracking_uri: str = DEFAULT_MLFLOW_TRACKING_URI,
    ) -> None:
        """Train, compare and register the tile classifier.

        Args:
            data_version: DVC md5 of the tiles folder (``<md5>.dir``): what the run trains on, and the cache key.
            dvc_remote: DVC remote to pull it from (``s3://...``); empty: the tiles of ``source_dir`` in the image.
            source_dir: Tiles folder in the image, used without a remote.
            params: params.yaml content as a dict; missing sections and fields take the package defaults.
            mlflow_tracking_uri: MLflow tracking URI of every task that logs.
        """
        data = steps.prepare(data_version, dvc_remote, source_dir, params)
        training = steps.cross_validate(data, params, mlflow_tracking_uri)
        steps.evaluate_and_register(data, training, params, mlflow_tracking_uri)

    return training_pipeline


class _Steps:
    """The pipeline's tasks in three parts, each configured from params.yaml (:func:`_configure`)."""

    def __init__(
        self,
        components: Any,
        config: Config,
        fan_out: tuple[list[int], list[dict[str, Any]]] | None,
        conditional: bool,
    ) -> None:
        self.c, self.config, self.fan_out, self.conditional = components, config, fan_out, conditional
        # Set by cross_validate: the gate's decision (for the full set's balance) and the merged balance output.
        self.decision: Any = None
        self.balanced: Any = None

    def task(self, task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        return _configure(task, name, self.config)

    def prepare(self, data_version: Any, dvc_remote: Any, source_dir: Any, params: Any) -> dict[str, Any]:
        """fetch_data, ingest, validate, split and augment: the data set, its report, folds and policy."""
        c = self.c
        fetch = self.task(
            c.fetch_data(data_version=data_version, dvc_remote=dvc_remote, source_dir=source_dir), "fetch_data"
        )
        dataset = self.task(c.ingest(params=params, tiles=fetch.outputs["tiles"]), "ingest").outputs["dataset"]
        # Validation raises on failure, which fails the task and stops everything downstream. Split and augment
        # take its report as an input, so nothing downstream can run on unvalidated data.
        report = self.task(c.validate(params=params, dataset=dataset), "validate").outputs["report"]
        split = self.task(c.split(params=params, dataset=dataset, validation_report=report), "split")
        augment = self.task(c.augment(params=params, dataset=dataset, validation_report=report), "augment")
        return {
            "dataset": dataset,
            "report": report,
            "folds": split.outputs["folds"],
            "policy": augment.outputs["policy"],
        }

    def cross_validate(self, data: dict[str, Any], params: Any, uri: Any) -> Any:
        """cv_plan; a balance per fold, a train_fold per fold and group (``dsl.ParallelFor``); gather. Its output."""
        c, parallelism = self.c, self.config.kubeflow.parallelism
        dataset, folds, policy = data["dataset"], data["folds"], data["policy"]
        plan = self.task(
            c.cv_plan(
                params=params,
                mlflow_tracking_uri=uri,
                dataset=dataset,
                folds=folds,
                policy=policy,
                validation_report=data["report"],
            ),
            "cv_plan",
        )
        fold_items = plan.outputs["folds"] if self.fan_out is None else self.fan_out[0]
        unit_items = plan.outputs["units"] if self.fan_out is None else self.fan_out[1]
        # Two single-level loops (kfp.local cannot collect from nested ones, and a collection cannot enter a
        # loop): one GAN per fold's training set, merged into one balance output as dvc.yaml's, then one task
        # per fold and group, which reads its fold's set from it.
        with dsl.ParallelFor(fold_items, parallelism=parallelism) as fold:
            balanced = self.task(
                c.balance(params=params, mlflow_tracking_uri=uri, fold=fold, dataset=dataset, folds=folds), "balance"
            )
        merged = c.merge_balanced(
            params=params,
            mlflow_tracking_uri=uri,
            sets=dsl.Collected(balanced.outputs["balanced"]),
            dataset=dataset,
            folds=folds,
        )
        merged = self.task(merged, "merge_balanced")
        # The gate decided on the folds' sets (ablation); the full set's task records the same decision.
        self.decision = merged.outputs["decision"]
        balanced_sets = self.balanced = merged.outputs["balanced"]
        with dsl.ParallelFor(unit_items, parallelism=parallelism) as unit:
            trained = self.task(
                c.train_fold(
                    params=params,
                    mlflow_tracking_uri=uri,
                    unit=unit,
                    dataset=dataset,
                    folds=folds,
                    policy=policy,
                    balanced=balanced_sets,
                    plan=plan.outputs["plan"],
                ),
                "train_fold",
            )
        units = dsl.Collected(trained.outputs["trained"])
        gathered = c.gather(
            params=params, mlflow_tracking_uri=uri, dataset=dataset, plan=plan.outputs["plan"], units=units
        )
        return self.task(gathered, "gather").outputs["training"]

    def evaluate_and_register(self, data: dict[str, Any], training: Any, params: Any, uri: Any) -> None:
        """evaluate; the full set's balance; register under ``dsl.If`` the evaluation allows it."""
        c = self.c
        evaluate = self.task(
            c.evaluate(params=params, mlflow_tracking_uri=uri, training=training, balanced=self.balanced), "evaluate"
        )
        full = self.task(
            c.balance(
                params=params,
                mlflow_tracking_uri=uri,
                fold=-1,
                dataset=data["dataset"],
                folds=data["folds"],
                decision=self.decision,
            ),
            "balance",
        )
        if not self.conditional:
            self._register(data, training, full, evaluate, params, uri)
            return
        with dsl.If(evaluate.outputs["register"] == True, "evaluation allows a registration"):  # noqa: E712
            self._register(data, training, full, evaluate, params, uri)

    def _register(
        self, data: dict[str, Any], training: Any, full: Any, evaluate: Any, params: Any, uri: Any
    ) -> dsl.PipelineTask:
        register = self.c.register(
            params=params,
            mlflow_tracking_uri=uri,
            dataset=data["dataset"],
            policy=data["policy"],
            balanced=full.outputs["balanced"],
            training=training,
            evaluation=evaluate.outputs["evaluation"],
            folds=data["folds"],
            pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        return self.task(register, "register")
