"""Entry points of the pipeline stages for adapters (Kubeflow components, the CLI) that hold no logic themselves.

Each ``*_stage`` function takes the params dict (params.yaml content; missing sections and fields take the
defaults) and plain folder paths, does the set-up every entry point shares, runs the package's stage function and
returns the headline values an adapter shows (a Kubeflow component copies them into its artifact's metadata):

* :func:`bonetumor.runtime.configure_process` (telemetry off, readable logs);
* :meth:`bonetumor.config.Config.from_dict` with the source ``"pipeline params"``, so a typo in the params fails
  with a :class:`bonetumor.errors.ConfigError` naming the field;
* for the stages that log to MLflow, a tracking URI override (``MLFLOW_TRACKING_URI`` while the stage runs);
* the well-known file names inside upstream output folders (``manifest.csv``, ``folds.json``, ``policy.json``,
  ``tiles.csv``), so callers pass only the folders.

Beside them are the manual steps the CLI offers outside the pipeline (:func:`fetch_weights`,
:func:`promote_model`, :func:`predict_tiles`), which read params.yaml itself.

The stage modules are imported inside the functions, so importing this module pulls in neither torch, MLflow nor
Great Expectations, and each Kubeflow task pays only for its own stage. This module imports no kfp, dvc or bentoml.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bonetumor.config import Config, load_config
from bonetumor.errors import InvalidImageError
from bonetumor.runtime import configure_process

#: The ``source`` that config errors of params dicts name.
PARAMS_SOURCE = "pipeline params"
#: The environment variable MLflow (and :func:`bonetumor.registry.tracking.resolve_tracking_uri`) reads first.
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
#: Keys of the registration result that the register stage reports.
CHAMPION_KEYS = ("model_name", "version", "alias", "model_uri", "arch", "run_id", "cv_run_id")


def config_from_params(params: dict[str, Any]) -> Config:
    """Set up the process and build the validated config from a params dict.

    Args:
        params: params.yaml content (sections and fields may be missing).

    Returns:
        The validated config.

    Raises:
        ConfigError: A section or field is unknown or invalid; the message names it and says ``pipeline params``.
    """
    configure_process()
    return Config.from_dict(params, source=PARAMS_SOURCE)


@contextmanager
def tracking_override(uri: str | None) -> Iterator[None]:
    """Make ``uri`` the MLflow tracking URI while the block runs (nothing changes when ``uri`` is empty).

    The override is ``MLFLOW_TRACKING_URI``, which beats params' ``tracking.uri``; the earlier value is restored
    afterwards. A relative ``sqlite:///`` path is resolved against the project folder, as params' URI is.

    Args:
        uri: The tracking URI, or ``None``/``""`` for no override.
    """
    if not uri:
        yield
        return
    previous = os.environ.get(TRACKING_URI_ENV)
    os.environ[TRACKING_URI_ENV] = uri
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = previous


@contextmanager
def tracked_stage(config: Config, uri: str | None, project_dir: str | Path | None, stage: str) -> Iterator[None]:
    """Run a stage that writes to MLflow: ``uri`` as the tracking URI, holding the store's lock.

    Raises:
        StoreLockedError: Another run holds the lock (:func:`bonetumor.locks.store_lock`).
    """
    from bonetumor.locks import store_lock
    from bonetumor.registry.tracking import resolve_tracking_uri

    with tracking_override(uri), store_lock(resolve_tracking_uri(config.tracking, _project(project_dir)), stage):
        yield


def _project(project_dir: str | Path | None) -> Path:
    return Path(project_dir) if project_dir is not None else Path.cwd()


def _manifest(dataset_dir: str | Path) -> Path:
    from bonetumor.data.manifest import MANIFEST_FILE

    return Path(dataset_dir) / MANIFEST_FILE


def _folds(folds_dir: str | Path) -> Path:
    from bonetumor.data.split import FOLDS_FILE

    return Path(folds_dir) / FOLDS_FILE


def _policy(policy_dir: str | Path) -> Path:
    from bonetumor.transforms.augment import POLICY_FILE

    return Path(policy_dir) / POLICY_FILE


# --------------------------------------------------------------------------------------------------------------
# The pipeline stages.


def ingest_stage(
    params: dict[str, Any], *, source_dir: str | Path, out_dir: str | Path, project_dir: str | Path | None = None
) -> dict[str, Any]:
    """Scan ``source_dir`` and write the manifest plus a copy of every tile (``images/``) into ``out_dir``.

    Args:
        params: params.yaml content; ``source_dir`` replaces its ``data.source``.
        source_dir: Folder with one sub-folder per class (relative to ``project_dir`` unless absolute).
        out_dir: Output folder: ``manifest.csv``, ``images/`` and ``config.resolved.yaml``.
        project_dir: The project folder (default: the current working folder).

    Returns:
        ``n_tiles``, ``n_slides`` and ``n_cases`` of the manifest.

    Raises:
        ConfigError: The params are invalid.
        DatasetError: The source folder does not hold a valid data set.
    """
    from bonetumor.data.ingest import run_ingest

    raw = dict(params)
    data = raw.get("data") or {}
    # A malformed ``data`` section is left for Config.from_dict to report.
    raw["data"] = {**data, "source": str(source_dir)} if isinstance(data, Mapping) else data
    config = config_from_params(raw)
    frame = run_ingest(config, _project(project_dir), out_dir, copy_images=True)
    return {"n_tiles": len(frame), "n_slides": int(frame["slide"].nunique()), "n_cases": int(frame["case"].nunique())}


def validate_stage(params: dict[str, Any], *, dataset_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Run the data validation suites on the ingest output.

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        out_dir: Output folder: ``report.json``, ``tiles.csv``, Data Docs and ``config.resolved.yaml``.

    Returns:
        ``success`` and ``n_tiles`` of the report.

    Raises:
        ConfigError: The params are invalid.
        DataValidationError: An expectation failed (the report is written all the same).
    """
    from bonetumor.data.validate import run_validation

    result = run_validation(config_from_params(params), _manifest(dataset_dir), out_dir)
    return {"success": result["success"], "n_tiles": result["n_tiles"]}


def split_stage(
    params: dict[str, Any], *, dataset_dir: str | Path, validation_dir: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """Make grouped, stratified cross-validation folds, keeping near-duplicate clusters on one side.

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        validation_dir: The validate output folder (``tiles.csv``, the near-duplicate clusters).
        out_dir: Output folder: ``folds.json``, ``folds_report.json`` and ``config.resolved.yaml``.

    Returns:
        ``n_folds`` and ``group_by`` of the folds.

    Raises:
        ConfigError: The params are invalid.
        SplitError: The folds cannot be made as asked.
    """
    from bonetumor.data.split import run_split
    from bonetumor.data.validate import TILES_FILE

    result = run_split(config_from_params(params), _manifest(dataset_dir), out_dir, Path(validation_dir) / TILES_FILE)
    return {"n_folds": result["n_folds"], "group_by": result["group_by"]}


def augment_stage(params: dict[str, Any], *, dataset_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the augmentation policy and its preview grid.

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        out_dir: Output folder: ``policy.json``, ``preview.png`` and ``config.resolved.yaml``.

    Returns:
        ``digest``: the policy's content hash.

    Raises:
        ConfigError: The params are invalid.
    """
    from bonetumor.transforms.augment import run_augment

    policy = run_augment(config_from_params(params), _manifest(dataset_dir), out_dir)
    return {"digest": policy.digest()}


def balance_stage(
    params: dict[str, Any],
    *,
    dataset_dir: str | Path,
    folds_dir: str | Path,
    out_dir: str | Path,
    sets: Sequence[str] | None = None,
    decision: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Balance each fold's training set (and the full set) with conditional-GAN tiles, and report on them.

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        folds_dir: The split output folder (``folds.json``).
        out_dir: Output folder: one ``<set>/`` per training set, ``summary.json`` and, with every fold's set,
            the gate's ``decision.json`` and the ablation.
        sets: Only these training sets (``fold-<k>``, ``full``); default all (a Kubeflow task balances one).
        decision: The gate's decision to record with these sets (a Kubeflow task balancing ``full`` alone).
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI (default: the working folder).

    Returns:
        ``generated_<set>``: the number of synthetic tiles added to each training set; ``quality_<set>``: 1 when
        its GAN's quality report passed, 0 when it failed (sets without a GAN have none); ``use_synthetic`` (1/0)
        when the gate decided here or was given its decision.

    Raises:
        ConfigError: The params are invalid.
    """
    from bonetumor.balance.gan import run_balance

    config = config_from_params(params)
    with tracked_stage(config, tracking_uri, project_dir, "bonetumor balance"):
        summary = run_balance(
            config,
            _manifest(dataset_dir),
            _folds(folds_dir),
            out_dir,
            sets,
            project_dir=_project(project_dir),
            decision=decision,
        )
    return _balance_result(summary, out_dir)


def _balance_result(summary: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    from bonetumor.data.datasets import DECISION_FILE, read_decision

    result: dict[str, Any] = {
        f"generated_{name}": sum(info["generated"].values()) for name, info in summary["sets"].items()
    }
    for name, info in summary["sets"].items():
        if info.get("quality") is not None:
            result[f"quality_{name}"] = int(bool(info["quality"]["passed"]))
    if (Path(out_dir) / DECISION_FILE).is_file():
        result["use_synthetic"] = int(bool(read_decision(out_dir)["use_synthetic"]))
    return result


def merge_balance_stage(
    params: dict[str, Any],
    *,
    balance_dirs: Sequence[str | Path],
    dataset_dir: str | Path,
    folds_dir: str | Path,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Merge the folds' balance outputs into one, run the ablation and let the gate decide, as the DVC stage does.

    Args:
        params: params.yaml content.
        balance_dirs: Balance outputs, each of some training sets (a Kubeflow run balances one per task).
        dataset_dir: The ingest output folder (``manifest.csv``).
        folds_dir: The split output folder (``folds.json``).
        out_dir: Output folder: every set's folder, ``summary.json``, ``decision.json``, the ablation, and
            ``gan_samples/``.
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI (default: the working folder).

    Returns:
        What :func:`balance_stage` returns, and ``decision``: the gate's whole decision (for the task balancing
        ``full``).

    Raises:
        ArtifactError: An output lacks its summary, or two outputs hold the same training set.
    """
    from bonetumor.balance.gan import merge_balance_outputs

    config = config_from_params(params)
    with tracked_stage(config, tracking_uri, project_dir, "bonetumor balance"):
        summary = merge_balance_outputs(
            config,
            balance_dirs,
            out_dir,
            manifest_path=_manifest(dataset_dir),
            folds_path=_folds(folds_dir),
            project_dir=_project(project_dir),
        )
    return {**_balance_result(summary, out_dir), "decision": summary["decision"]}


def train_stage(
    params: dict[str, Any],
    *,
    dataset_dir: str | Path,
    folds_dir: str | Path,
    policy_dir: str | Path,
    balance_dir: str | Path,
    validation_dir: str | Path,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Cross-validate every candidate (MLflow: a parent run per candidate, a nested run per fold).

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        folds_dir: The split output folder (``folds.json``).
        policy_dir: The augment output folder (``policy.json``).
        balance_dir: The balance output folder.
        validation_dir: The validate output folder (report and Data Docs, logged with the runs).
        out_dir: Output folder: ``runs.json``, ``<candidate>/oof.csv``, Grad-CAM galleries.
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI and the git commit (default: the working folder).

    Returns:
        ``experiment_id`` and ``run_id_<arch>`` for every architecture.

    Raises:
        ConfigError: The params are invalid.
    """
    from bonetumor.training.cross_validation import run_cross_validation

    config = config_from_params(params)
    with tracked_stage(config, tracking_uri, project_dir, "bonetumor train"):
        runs = run_cross_validation(
            config,
            manifest_path=_manifest(dataset_dir),
            folds_path=_folds(folds_dir),
            policy_path=_policy(policy_dir),
            balance_dir=balance_dir,
            out_dir=out_dir,
            project_dir=_project(project_dir),
            validation_dir=validation_dir,
        )
    return {
        "experiment_id": runs["experiment_id"],
        **{f"run_id_{arch}": info["run_id"] for arch, info in runs["architectures"].items()},
    }


def cv_plan_stage(
    params: dict[str, Any],
    *,
    dataset_dir: str | Path,
    folds_dir: str | Path,
    policy_dir: str | Path,
    validation_dir: str | Path,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Open the cross-validation's parent runs and plan its fold tasks (the first of train's three steps).

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        folds_dir: The split output folder (``folds.json``).
        policy_dir: The augment output folder (``policy.json``).
        validation_dir: The validate output folder (report and Data Docs, logged with the parent runs).
        out_dir: Output folder: ``cv_plan.json`` and ``config.resolved.yaml``.
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI and the git commit (default: the working folder).

    Returns:
        ``experiment_id``, ``folds`` (fold indices: one GAN balance each), ``groups`` (what one fold task
        trains) and ``unit_list`` (the fold tasks, ``{"fold", "group"}`` each).

    Raises:
        ConfigError: The params are invalid.
    """
    from bonetumor.training.cross_validation import start_cross_validation

    config = config_from_params(params)
    with tracked_stage(config, tracking_uri, project_dir, "bonetumor train (plan)"):
        plan = start_cross_validation(
            config,
            _manifest(dataset_dir),
            _folds(folds_dir),
            _policy(policy_dir),
            out_dir,
            _project(project_dir),
            validation_dir,
            owned=False,  # the task ends now; the gather closes the parent runs
        )
    return {
        "experiment_id": plan["experiment_id"],
        "folds": plan["folds"],
        "groups": plan["groups"],
        "unit_list": plan["units"],
    }


def cv_fold_stage(
    params: dict[str, Any],
    *,
    dataset_dir: str | Path,
    folds_dir: str | Path,
    policy_dir: str | Path,
    balance_dir: str | Path | Sequence[str | Path],
    plan_dir: str | Path,
    fold: int,
    group: str,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train one group of candidates (an architecture and the models built on it) on one fold.

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        folds_dir: The split output folder (``folds.json``).
        policy_dir: The augment output folder (``policy.json``).
        balance_dir: A balance output holding the fold's training set (``fold-<fold>/``), or several balance
            outputs (a Kubeflow run's, one per fold), of which the one holding it is used.
        plan_dir: The plan step's output folder (``cv_plan.json``).
        fold: The fold.
        group: One of the plan's groups.
        out_dir: Output folder: ``unit.json``, the fold's out-of-fold predictions and artifacts per candidate.
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI and the git commit (default: the working folder).

    Returns:
        ``fold``, ``group`` and ``macro_f1_<candidate>`` for every candidate the fold scored.

    Raises:
        ConfigError: The params are invalid, or the fold or group is not in the plan.
    """
    from bonetumor.training.cross_validation import read_plan, run_fold_unit

    config = config_from_params(params)
    out_dir = Path(out_dir)
    balance_dir = _training_set_dir(balance_dir, int(fold))
    with tracked_stage(config, tracking_uri, project_dir, f"bonetumor train (fold {fold}, {group})"):
        record = run_fold_unit(
            config,
            read_plan(plan_dir),
            _manifest(dataset_dir),
            _folds(folds_dir),
            _policy(policy_dir),
            balance_dir,
            int(fold),
            group,
            out_dir,
            # Beside the output, in the task's own storage: a retried task resumes its fits from them.
            checkpoints=out_dir.parent / f".{out_dir.name}.checkpoints",
            project_dir=_project(project_dir),
        )
    scores = {f"macro_f1_{name}": entry["score"] for name, entry in record["candidates"].items() if entry["score"]}
    return {"fold": record["fold"], "group": record["group"], **scores}


def _training_set_dir(balance_dirs: str | Path | Sequence[str | Path], fold: int) -> Path:
    """The balance output that holds ``fold-<fold>`` (one folder, or the one of several that holds it)."""
    from bonetumor.errors import ArtifactError

    candidates = [Path(balance_dirs)] if isinstance(balance_dirs, str | Path) else [Path(d) for d in balance_dirs]
    for folder in candidates:
        if (folder / f"fold-{fold}").is_dir():
            return folder
    raise ArtifactError(
        f"no balance output holds the training set fold-{fold}; expected a fold-{fold}/ folder in one of "
        f"{[str(c) for c in candidates]}"
    )


def cv_gather_stage(
    params: dict[str, Any],
    *,
    dataset_dir: str | Path,
    plan_dir: str | Path,
    unit_dirs: Sequence[str | Path],
    out_dir: str | Path,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Gather the fold tasks into the train output (``runs.json``, ``<candidate>/oof.csv``) and close the runs.

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        plan_dir: The plan step's output folder (``cv_plan.json``).
        unit_dirs: Every fold task's output folder.
        out_dir: Output folder: what the train stage writes.
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI and the git commit (default: the working folder).

    Returns:
        ``experiment_id`` and ``run_id_<arch>`` for every architecture, as :func:`train_stage`.

    Raises:
        ConfigError: The params are invalid.
        ArtifactError: A fold task's output is missing.
    """
    from bonetumor.training.cross_validation import PLAN_FILE, gather_cross_validation, read_plan

    config = config_from_params(params)
    plan = read_plan(plan_dir)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(plan_dir) / PLAN_FILE, Path(out_dir) / PLAN_FILE)
    with tracked_stage(config, tracking_uri, project_dir, "bonetumor train (gather)"):
        runs = gather_cross_validation(config, plan, unit_dirs, out_dir, _manifest(dataset_dir), _project(project_dir))
    return {
        "experiment_id": runs["experiment_id"],
        **{f"run_id_{arch}": info["run_id"] for arch, info in runs["architectures"].items()},
    }


def evaluate_stage(
    params: dict[str, Any],
    *,
    train_dir: str | Path,
    out_dir: str | Path,
    balance_dir: str | Path | None = None,
    comparison_path: str | Path | None = None,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Score the out-of-fold predictions, rank the architectures and pick the winner.

    Args:
        params: params.yaml content.
        train_dir: The train output folder.
        balance_dir: The balance output folder (the gate's decision and report go into the comparison), or None.
        out_dir: Output folder: ``comparison.json``, ``comparison.md``, ``metrics/`` (headline figures),
            ``plots/``, ``reports/``.
        comparison_path: When given, a copy of ``comparison.md`` (the architecture comparison table) goes here.
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI (default: the working folder).

    Returns:
        One entry per output: ``evaluation`` (``winner``, ``ranking``, ``selection``), ``registration``
        (``allowed``, ``reason``: whether the refit and registration may run, ``register.min_macro_f1``),
        ``metrics`` (the winner's scalar out-of-fold metrics as floats) and ``confusion_matrix`` (``classes``,
        ``matrix``, ``arch``).

    Raises:
        ConfigError: The params are invalid.
    """
    from bonetumor.evaluation.evaluate import COMPARISON_MD_FILE, run_evaluation
    from bonetumor.registry.gate import registration_allowed

    config = config_from_params(params)
    with tracked_stage(config, tracking_uri, project_dir, "bonetumor evaluate"):
        result = run_evaluation(
            config, train_dir=train_dir, out_dir=out_dir, project_dir=_project(project_dir), balance_dir=balance_dir
        )
    if comparison_path is not None:
        Path(comparison_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(out_dir) / COMPARISON_MD_FILE, comparison_path)
    winner = result["winner"]
    scores = result["scores"][winner]
    allowed, reason = registration_allowed(result, config.register.min_macro_f1)
    return {
        "evaluation": {"winner": winner, "ranking": result["ranking"], "selection": result["selection"]},
        "registration": {"allowed": allowed, "reason": reason},
        "metrics": {
            name: float(value)
            for name, value in scores.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        },
        "confusion_matrix": {
            "classes": list(config.data.classes),
            "matrix": scores["confusion_matrix"],
            "arch": winner,
        },
    }


def register_stage(
    params: dict[str, Any],
    *,
    dataset_dir: str | Path,
    policy_dir: str | Path,
    balance_dir: str | Path,
    train_dir: str | Path,
    evaluate_dir: str | Path,
    folds_dir: str | Path,
    out_dir: str | Path,
    tracking_uri: str | None = None,
    project_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Refit the winner, register it in MLflow, and set the alias the champion gate decides.

    Args:
        params: params.yaml content.
        dataset_dir: The ingest output folder (``manifest.csv``).
        policy_dir: The augment output folder (``policy.json``).
        balance_dir: The balance output folder.
        train_dir: The train output folder.
        evaluate_dir: The evaluate output folder.
        folds_dir: The split output folder (``folds.json``; the gate compares models on the same folds).
        out_dir: Output folder: ``bundle/`` (weights and metadata) and ``champion.json``.
        tracking_uri: MLflow tracking URI; overrides params' ``tracking.uri`` when not empty.
        project_dir: Base folder of a relative tracking URI and the git commit (default: the working folder).

    Returns:
        ``model_name``, ``version``, ``alias``, ``model_uri``, ``arch``, ``run_id`` and ``cv_run_id`` of the
        registered version.

    Raises:
        ConfigError: The params are invalid.
    """
    from bonetumor.registry.register import run_registration

    config = config_from_params(params)
    with tracked_stage(config, tracking_uri, project_dir, "bonetumor register"):
        champion = run_registration(
            config,
            manifest_path=_manifest(dataset_dir),
            policy_path=_policy(policy_dir),
            balance_dir=balance_dir,
            train_dir=train_dir,
            evaluate_dir=evaluate_dir,
            out_dir=out_dir,
            project_dir=_project(project_dir),
            folds_path=_folds(folds_dir),
        )
    return {key: champion[key] for key in CHAMPION_KEYS}


# --------------------------------------------------------------------------------------------------------------
# Manual steps beside the pipeline (CLI commands); they read params.yaml, whose folder is the project folder.


def fetch_weights(archs: Sequence[str], params_path: str | Path) -> list[tuple[str, Path]]:
    """Download (or find, hash-checked) the ImageNet weights of ``archs`` in TORCH_HOME.

    Args:
        archs: Architectures; when empty, every one ``train.architectures`` of params.yaml names.
        params_path: params.yaml; read only when ``archs`` is empty.

    Returns:
        ``(architecture, weights file)`` pairs, in the order of the architectures.

    Raises:
        ConfigError: params.yaml is invalid, or an architecture is unknown.
        WeightsUnavailableError: A download failed or a file is corrupt.
    """
    from bonetumor.training.models import fetch_imagenet_weights

    chosen = list(archs) or list(load_config(params_path).train.architectures)
    return list(zip(chosen, fetch_imagenet_weights(chosen), strict=True))


def promote_model(params_path: str | Path, version: str, reason: str, force: bool = False) -> dict[str, str]:
    """Point params' ``register.alias`` at a version of ``register.model_name`` by hand, after review.

    The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else params' ``tracking.uri`` resolved against the
    params file's folder. The move joins the alias history (:mod:`bonetumor.registry.promotions`).

    Args:
        params_path: The project's params.yaml.
        version: The registered model version.
        reason: Why (recorded for the audit trail).
        force: Promote even when it lowers the gate's figures (the record says so).

    Returns:
        ``model_name``, ``version`` and ``alias``.

    Raises:
        ConfigError: params.yaml is invalid, or no reason.
        ModelNotFoundError: The version does not exist.
        ArtifactError: The version's registration never finished.
        PromotionRefusedError: It would lower the gate's figures and ``force`` is not set.
    """
    from bonetumor.registry.model_registry import promote

    config, project = _registry(params_path)
    register = config.register
    promote(
        register.model_name,
        version,
        register.alias,
        reason,
        force=force,
        mirror=_mirror(config, project),
        challenger_alias=register.challenger_alias,
    )
    return {"model_name": register.model_name, "version": version, "alias": register.alias}


def _mirror(config: Config, project: Path) -> Path | None:
    return project / config.register.promotion_log if config.register.promotion_log else None


def rollback_model(params_path: str | Path, reason: str) -> dict[str, Any]:
    """Return ``register.alias`` to the version that held it before the current one (``bonetumor rollback``)."""
    from bonetumor.registry.promotions import rollback

    config, project = _registry(params_path)
    event = rollback(
        config.register.model_name,
        config.register.alias,
        reason,
        mirror=_mirror(config, project),
        challenger_alias=config.register.challenger_alias,
    )
    return event.to_dict()


def promotion_events(params_path: str | Path) -> list[dict[str, Any]]:
    """The alias history of ``register.model_name``, oldest first (``bonetumor promotions``)."""
    from bonetumor.registry.promotions import promotion_history

    config, _ = _registry(params_path)
    return [event.to_dict() for event in promotion_history(config.register.model_name)]


def predict_tiles(
    params_path: str | Path, tiles: Sequence[str | Path], alias_or_version: str | None = None
) -> Iterator[dict[str, Any]]:
    """Classify tile files with the registered model that params.yaml names, one answer per tile, as they come.

    The model is loaded before the first answer, and answers exactly as the service's ``/predict`` does (the
    runtime the bundle names, the input checks, the tissue referral, the audit fields). A tile that cannot be
    read, decoded or accepted gets the answer ``{"file": ..., "error": ...}``; the others ``{"file": ...,
    **the answer}`` (which has no ``error`` key).

    Args:
        params_path: The project's params.yaml (``register.model_name``, ``register.alias``, ``tracking``).
        tiles: Tile image files (JPEG, PNG, TIFF).
        alias_or_version: Overrides ``register.alias`` (an alias or a version number).

    Yields:
        One answer per tile, in order.

    Raises:
        ConfigError: params.yaml is invalid.
        ModelNotFoundError: No such registered model, alias or version.
    """
    from bonetumor.registry.model_registry import open_served_model

    # The service's own object: the same engine, input checks, tissue referral and audit fields as /predict.
    holder, _ = open_served_model(params_path, alias_or_version)
    model = holder.current
    for tile in tiles:
        try:
            answer = model.answer(Path(tile).read_bytes(), source=str(tile))
        except OSError as exc:
            yield {"file": str(tile), "error": f"{tile}: cannot read file ({exc.strerror or exc})"}
            continue
        except InvalidImageError as exc:
            yield {"file": str(tile), "error": str(exc)}
            continue
        yield {"file": str(tile), **answer}


def assess_input(
    params_path: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    alias_or_version: str | None = None,
    mpp: float | None = None,
    progress: bool = True,
) -> Any:
    """Assess a whole slide with the registered model that params.yaml names (``bonetumor assess``).

    The model answers exactly as the service does (the runtime the bundle names, the preprocessing, the test-time
    views, the referral rule); the ``assess`` section sets the tiling and the interval. The resolved ``assess``
    and ``serving`` sections are written beside the outputs.

    Args:
        params_path: The project's params.yaml.
        input_path: A slide, a large image, or a folder/zip of one slide's TCIA tiles.
        out_dir: Folder for ``assessment.json``, ``tiles.csv``, ``tiles.geojson`` and ``overlay.png``.
        alias_or_version: Overrides ``register.alias``.
        mpp: Overrides ``assess.mpp`` (microns per pixel of the input).
        progress: Show a progress bar.

    Returns:
        The :class:`bonetumor.slide.assess.Assessment`.

    Raises:
        ConfigError: params.yaml is invalid, or ``mpp`` is not positive.
        ModelNotFoundError: No such registered model, alias or version.
        SlideError: The input cannot be assessed (the message names the file and what was expected).
    """
    import dataclasses

    from bonetumor.config import save_resolved
    from bonetumor.errors import ConfigError, SlideError
    from bonetumor.registry.model_registry import open_served_model
    from bonetumor.slide.assess import assess_slide
    from bonetumor.slide.sources import EXPECTED_INPUT

    if mpp is not None and mpp <= 0:
        raise ConfigError(f"--mpp {mpp}: expected microns per pixel above 0 (e.g. 0.25 for a 40x scan)")
    if not Path(input_path).exists():  # before the model loads: a typo should not cost seconds
        raise SlideError(f"{input_path}: no such file or folder; expected {EXPECTED_INPUT}")
    holder, config = open_served_model(params_path, alias_or_version)
    if mpp is not None:
        config = dataclasses.replace(config, assess=dataclasses.replace(config.assess, mpp=mpp))
    assessment = assess_slide(input_path, holder.current, config.assess, out_dir, progress=progress)
    save_resolved(config, out_dir, sections=("assess", "serving"))
    return assessment


def write_demo_slide_file(params_path: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the demo slide (``bonetumor demo-slide``): the sample's real tiles on a known layout, a pyramidal TIFF.

    Returns:
        ``path``, ``tiles_per_class`` of the layout, its ``necrosis_percent``, ``mpp`` and ``tile_px``.
    """
    from bonetumor.slide.demo import (
        DEMO_LAYOUT,
        DEMO_MPP,
        DEMO_TILE_PX,
        layout_counts,
        layout_necrosis_percent,
        sample_tile_source,
        write_demo_slide,
    )

    params_path = Path(params_path)
    config = load_config(params_path)
    source = params_path.resolve().parent / config.data.source
    path = write_demo_slide(out, sample_tile_source(source, config.data.classes))
    return {
        "path": str(path),
        "layout": list(DEMO_LAYOUT),
        "tiles_per_class": layout_counts(DEMO_LAYOUT),
        "necrosis_percent": round(layout_necrosis_percent(DEMO_LAYOUT), 2),
        "mpp": DEMO_MPP,
        "tile_px": DEMO_TILE_PX,
    }


def preflight(params_path: str | Path) -> list[str]:
    """Check params.yaml, the data source, the weights and the tracking store before a run (``bonetumor check``).

    ``make pipeline`` runs it before ``dvc repro``, because DVC deletes a stage's outputs before running it: a
    mistake found here costs nothing, the same mistake found by the stage costs that stage's last good outputs.

    Args:
        params_path: The project's params.yaml.

    Returns:
        One line per check that passed.

    Raises:
        ConfigError: Every problem found, one per line (params.yaml itself, the data source, the weights, the
            tracking store); the first problem of params.yaml alone when it does not load.
    """
    from bonetumor.data.ingest import list_class_folders
    from bonetumor.errors import BoneTumorError, ConfigError
    from bonetumor.locks import check_locks
    from bonetumor.registry.tracking import resolve_tracking_uri
    from bonetumor.runtime import check_tracking_store, check_weights_setting

    params_path = Path(params_path)
    config = load_config(params_path)
    project = params_path.resolve().parent
    passed = [f"{params_path}: valid ({len(config.to_dict())} sections)"]
    problems: list[str] = []
    source = project / config.data.source
    try:
        folders = list_class_folders(source, config.data.classes)
        empty = [name for name, files in folders.items() if not files]
        if empty:
            problems.append(f"data source {source}: no tiles in {empty}; expected image files in each class folder")
        else:
            passed.append(f"data source {source}: " + ", ".join(f"{k} {len(v)}" for k, v in folders.items()))
    except BoneTumorError as exc:
        problems.append(str(exc))
    for arch in config.train.architectures:
        try:
            passed.append(check_weights_setting(arch, config.train.weights))
        except BoneTumorError as exc:
            problems.append(str(exc))
    from bonetumor.registry.restore import restore_record

    restore = restore_record(config.data.source, project)
    passed.append(
        f"data source {config.data.source}: tracked by {restore.tracked_by}, "
        + ("restorable from the commit" if restore.restorable else f"WARNING: not restorable: {restore.reason}")
    )
    uri = resolve_tracking_uri(config.tracking, project)
    for check in (lambda: check_locks(project, uri), lambda: check_tracking_store(uri)):
        try:
            passed.append(check())
        except BoneTumorError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(
            f"{params_path}: {len(problems)} problem(s) found before the pipeline touched any output:\n  - "
            + "\n  - ".join(problems)
        )
    return passed


def _registry(params_path: str | Path) -> tuple[Config, Path]:
    """Load params.yaml and point MLflow at its tracking store; the config and the project folder."""
    from bonetumor.registry.tracking import configure_tracking

    params_path = Path(params_path)
    config = load_config(params_path)
    project = params_path.resolve().parent
    configure_tracking(config.tracking, project)
    return config, project


def lineage_of(params_path: str | Path, ref: str, prediction_log: str | Path | None = None) -> dict[str, Any]:
    """Trace a request id, model URI or run id to its model, runs, data, params and code (``bonetumor lineage``).

    Args:
        params_path: The project's params.yaml (tracking store, model name, the prediction log).
        ref: What to trace (see :func:`bonetumor.registry.lineage.build_lineage`).
        prediction_log: Another prediction log than ``serving.prediction_log`` (a copy from the serving host).

    Returns:
        The lineage document.
    """
    from bonetumor.registry.lineage import build_lineage
    from bonetumor.registry.promotions import promotion_history

    config, project = _registry(params_path)
    log_path = (
        Path(prediction_log)
        if prediction_log
        else (project / config.serving.prediction_log if config.serving.prediction_log else None)
    )
    return build_lineage(
        ref,
        config.register.model_name,
        log_path,
        history=lambda name: [event.to_dict() for event in promotion_history(name)],
    )


def model_card_of(
    params_path: str | Path,
    ref: str,
    rebuild: bool = False,
    log_card: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """The model card of a registered version: the one logged with it, or one rebuilt from the registry.

    Args:
        params_path: The project's params.yaml (tracking URI, model name, referral targets).
        ref: A version number or an alias.
        rebuild: Render the card again from its sources (the logged ``card_sources.json``, or, for versions
            registered before model cards, the evaluation report, lineage and tags in MLflow).
        log_card: Also log the rebuilt card with the version's refit run and tag the version with it (implies
            ``rebuild``): the service then serves it at ``/model_card``.
        out: Also write the Markdown to this file.

    Returns:
        ``version``, ``source`` (``logged`` or ``rebuilt``), ``markdown`` and ``metadata``.

    Raises:
        ArtifactError: The version's files or its evaluation report cannot be downloaded.
    """
    import json
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    from bonetumor.errors import ArtifactError
    from bonetumor.registry.model_card import (
        CARD_DIR,
        CARD_MD,
        CARD_TAG,
        build_model_card,
        sources_from_registry,
        stored_card,
        write_model_card,
    )
    from bonetumor.registry.model_registry import resolve_version
    from bonetumor.serving.predictor import METADATA_FILE

    config, _ = _registry(params_path)
    name = config.register.model_name
    version = resolve_version(name, ref)
    stored = None if rebuild or log_card else stored_card(version)
    if stored is not None:
        markdown, metadata, source = stored[0], stored[1], "logged"
    else:
        with tempfile.TemporaryDirectory(prefix="bonetumor-card-") as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=tmp))
            except mlflow.exceptions.MlflowException as exc:
                raise ArtifactError(f"version {version.version} does not download from the registry ({exc})") from exc
            found = sorted(local.rglob(METADATA_FILE))
            if not found:
                raise ArtifactError(f"version {version.version}: no {METADATA_FILE} in its logged model")
            sources = sources_from_registry(config, version, json.loads(found[0].read_text(encoding="utf-8")))
            card = build_model_card(sources)
            if log_card:
                if not version.run_id:
                    raise ArtifactError(f"version {version.version} has no run to log its card with")
                folder = write_model_card(card, sources, Path(tmp) / CARD_DIR)
                MlflowClient().log_artifacts(version.run_id, str(folder), CARD_DIR)
                MlflowClient().set_model_version_tag(
                    name, version.version, CARD_TAG, f"runs:/{version.run_id}/{CARD_DIR}/{CARD_MD}"
                )
        markdown, metadata, source = card.to_markdown(), card.to_metadata(), "rebuilt"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(markdown, encoding="utf-8")
    return {"version": str(version.version), "source": source, "markdown": markdown, "metadata": metadata}


def drift_check(
    params_path: str | Path,
    model: str | None = None,
    since: str | None = None,
    prediction_log: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Compare the tiles a model version served with its training reference (``bonetumor drift``).

    Args:
        params_path: The project's params.yaml (``monitoring`` thresholds, the prediction log, the model).
        model: Alias or version whose answers are checked (default ``register.alias``).
        since: Only answers at or after this ISO 8601 time (UTC when no zone is given).
        prediction_log: Another log than ``serving.prediction_log``.
        out_dir: Report folder (default ``monitoring.report_dir``).

    Returns:
        The report (``status``, ``exit_code``, ``reasons``...) and ``report`` (the Markdown file).

    Raises:
        ArtifactError: The version has no drift reference (registered before it existed).
        FileNotFoundError: No prediction log.
    """
    from datetime import UTC, datetime

    import mlflow

    from bonetumor.errors import ArtifactError, ConfigError
    from bonetumor.monitoring.drift import DriftThresholds, detect_drift, write_drift_report
    from bonetumor.monitoring.reference import DriftReference
    from bonetumor.registry.model_registry import resolve_version
    from bonetumor.serving.audit import read_prediction_log
    from bonetumor.serving.served import DRIFT_REFERENCE

    config, project = _registry(params_path)
    found = resolve_version(config.register.model_name, model or config.register.alias)
    number = str(found.version)
    try:
        local = mlflow.artifacts.download_artifacts(f"models:/{config.register.model_name}/{number}")
    except mlflow.exceptions.MlflowException as exc:
        raise ArtifactError(f"version {number} does not download from the registry ({exc})") from exc
    references = sorted(Path(local).rglob(DRIFT_REFERENCE))
    if not references:
        raise ArtifactError(
            f"{config.register.model_name} version {number} has no {DRIFT_REFERENCE} in its bundle (registered "
            "before drift monitoring); re-register it (dvc repro -f register) to monitor it"
        )
    reference = DriftReference.load(references[0])
    records = read_prediction_log(prediction_log or project / config.serving.prediction_log)
    records = [r for r in records if str((r.get("model") or {}).get("version", "")) == number]
    if since:
        try:
            start = datetime.fromisoformat(since)
        except ValueError as exc:
            raise ConfigError(f"--since {since!r} is not a time; expected ISO 8601, e.g. 2026-12-01T00:00") from exc
        start = start if start.tzinfo else start.replace(tzinfo=UTC)
        records = [r for r in records if datetime.fromisoformat(r["timestamp"]) >= start]
    m = config.monitoring
    thresholds = DriftThresholds(m.ks_alpha, m.psi_threshold, m.mmd_alpha, m.permutations, m.rate_alpha, m.min_records)
    report = detect_drift(reference, records, thresholds)
    path = write_drift_report(report, reference, records, Path(out_dir) if out_dir else project / m.report_dir)
    return {**report.to_dict(), "exit_code": report.exit_code, "report": str(path), "version": number}


def retrain(params_path: str | Path, reason: str, kubeflow: bool = False, dry_run: bool = False) -> list[str]:
    """Start the pipeline again, recording why on the new runs (``bonetumor retrain --reason drift``).

    Locally it runs ``bonetumor check`` then ``dvc repro`` in the project; ``--kubeflow`` submits the compiled
    pipeline with ``bonetumor pipeline submit``. Either way ``BONETUMOR_RETRAIN_TRIGGER`` carries the reason into
    the refit run's tags and the model's lineage; the champion gate then decides whether the new model serves.

    Returns:
        The commands run (or, with ``dry_run``, that would run).

    Raises:
        ConfigError: A command failed (its exit status and the end of its output).
    """
    import subprocess
    import uuid

    from bonetumor.errors import ConfigError

    params_path = Path(params_path)
    project = params_path.resolve().parent
    commands = (
        [["bonetumor", "pipeline", "submit", "--params", str(params_path)]]
        if kubeflow
        else [["bonetumor", "check", "--params", str(params_path)], ["dvc", "repro"]]
    )
    if dry_run:
        return [" ".join(c) for c in commands]
    env = {
        **os.environ,
        "BONETUMOR_RETRAIN_TRIGGER": reason,
        "BONETUMOR_PIPELINE_RUN_ID": os.environ.get("BONETUMOR_PIPELINE_RUN_ID") or f"retrain-{uuid.uuid4().hex[:12]}",
    }
    for command in commands:
        result = subprocess.run(command, cwd=project, env=env, check=False)
        if result.returncode != 0:
            raise ConfigError(f"retraining stopped: `{' '.join(command)}` exited with status {result.returncode}")
    return [" ".join(c) for c in commands]
