"""From one served answer to the model, runs, data, params, code and people behind it (``bonetumor lineage``).

A reference is a request id from the prediction log, ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or
an MLflow run id (a refit run, or a cross-validation parent run). The chain is read from the tracking store (which
may be a sqlite file or a remote ``mlflow server``) and from ``lineage/lineage.json``, which registration logs with
the refit run: the data source's restore record, the folds' hash, the resolved params, the library versions and the
pipeline run. Versions registered before that file existed are traced from their tags, and the chain says which
links are not recorded.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bonetumor.errors import ArtifactError, ModelNotFoundError
from bonetumor.registry.gate import GATE_PREFIX
from bonetumor.registry.restore import RestoreRecord
from bonetumor.registry.tracking import TAG_PREFIX
from bonetumor.serving.audit import read_prediction_log

log = logging.getLogger(__name__)

#: Where registration logs the lineage record, in the refit run's artifacts.
LINEAGE_DIR = "lineage"
LINEAGE_FILE = "lineage.json"
#: A request id or an MLflow run id: 32 lower-case hex digits.
HEX_ID = re.compile(r"[0-9a-f]{32}")
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")
#: Fold-run metrics the chain shows (the rest are in the MLflow UI).
FOLD_METRICS = ("fold_macro_f1", "fold_accuracy", "best_step", "best_val_loss")


def build_lineage(
    ref: str,
    model_name: str,
    prediction_log: str | Path | None,
    history: Callable[[str], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Trace ``ref`` to everything that made its answer.

    Args:
        ref: A request id, ``models:/name@alias``, ``models:/name/VERSION`` or a run id.
        model_name: The registered model to look in for a run id (``register.model_name``).
        prediction_log: The service's prediction log (``serving.prediction_log``), for request ids.
        history: Returns the promotion events of a registered model as dicts (``bonetumor.registry.promotions``);
            None leaves the alias history out.

    Returns:
        One JSON-ready document: ``reference``, ``answer`` (for a request id), ``model_version`` (with its aliases
        over time), ``refit_run``, ``cv_run``, ``fold_runs``, ``data``, ``validation``, ``folds``, ``params``,
        ``code``, ``pipeline_run``, ``libraries``, and ``gaps`` (links that are not recorded, and why).

    Raises:
        ModelNotFoundError: Nothing matches the reference (named with what was looked at and what was expected).
        ArtifactError: The lineage record logged with the version is unreadable.
    """
    client = MlflowClient()
    doc: dict[str, Any] = {"reference": ref, "tracking_uri": mlflow.get_tracking_uri(), "gaps": []}
    name, version = _resolve(ref, model_name, prediction_log, client, doc)
    found = _model_version(client, name, version)
    events = history(name) if history is not None else []
    doc["model_version"] = _version_block(found, events)
    if not found.run_id:
        doc["gaps"].append(f"version {found.version} has no run id: it was registered outside a run")
        return doc
    refit = client.get_run(found.run_id)
    record = _lineage_record(client, refit.info.run_id, doc)
    doc["refit_run"] = _run_block(refit)
    cv_id = refit.data.tags.get(f"{TAG_PREFIX}cv_run_id", "")
    cv = _run_or_gap(client, cv_id, "cross-validation parent run", doc)
    doc["cv_run"] = None if cv is None else _run_block(cv)
    doc["fold_runs"] = [] if cv is None else _fold_runs(client, cv)
    doc["data"] = _data_block(found, refit, record, doc)
    doc["validation"] = None if cv is None else _validation_block(client, cv)
    doc["folds"] = {
        "sha256": found.tags.get(f"{GATE_PREFIX}candidate.folds_digest") or record.get("folds_sha256", ""),
        "file": record.get("folds_file", ""),
    }
    doc["params"] = {
        "hash": refit.data.tags.get(f"{TAG_PREFIX}params_hash", ""),
        "run_params": dict(sorted(refit.data.params.items())),
        "resolved": record.get("params"),
    }
    commit = refit.data.tags.get(f"{TAG_PREFIX}git_commit", "unknown")
    doc["code"] = {
        "git_commit": commit.removesuffix("-dirty"),
        "dirty": commit.endswith("-dirty"),
        "dirty_paths": (record.get("restore") or {}).get("dirty_paths", []),
        "package_version": refit.data.tags.get(f"{TAG_PREFIX}package_version", ""),
    }
    doc["pipeline_run"] = record.get("pipeline_run") or _pipeline_from_tags(refit)
    doc["libraries"] = record.get("libraries") or {}
    if not doc["libraries"]:
        doc["gaps"].append("library versions: not recorded with this version (registered before lineage.json)")
    return doc


def _resolve(
    ref: str, model_name: str, prediction_log: str | Path | None, client: MlflowClient, doc: dict[str, Any]
) -> tuple[str, str]:
    """The registered model name and version a reference names; fills ``doc['answer']`` for a request id."""
    match = _MODEL_URI.fullmatch(ref)
    if match:
        name = match["name"]
        if match["version"]:
            doc["kind"] = "model version"
            return name, match["version"]
        doc["kind"] = "model alias"
        try:
            return name, str(client.get_model_version_by_alias(name, match["alias"]).version)
        except MlflowException as exc:
            raise ModelNotFoundError(
                f"{ref}: no alias {match['alias']!r} on model {name!r} at {mlflow.get_tracking_uri()}"
            ) from exc
    if not HEX_ID.fullmatch(ref):
        raise ModelNotFoundError(
            f"{ref!r} is not a reference bonetumor lineage knows; expected a request id or run id (32 hex digits), "
            "models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    answer = _find_answer(ref, prediction_log)
    if answer is not None:
        doc["kind"] = "request"
        doc["answer"] = answer
        model = answer.get("model") or {}
        if not model.get("version"):
            raise ModelNotFoundError(f"request {ref} has no model version in the prediction log (refused upload?)")
        return str(model.get("name") or model_name), str(model["version"])
    try:
        run = client.get_run(ref)
    except MlflowException as exc:
        where = f"the prediction log {prediction_log}" if prediction_log else "no prediction log"
        raise ModelNotFoundError(
            f"{ref}: neither a request id in {where} nor a run at {mlflow.get_tracking_uri()}; expected the "
            "request_id of a /predict answer (on the server that answered it) or an MLflow run id"
        ) from exc
    doc["kind"] = "run"
    return model_name, _version_of_run(client, run, model_name)


def _find_answer(request_id: str, prediction_log: str | Path | None) -> dict[str, Any] | None:
    if not prediction_log:
        return None
    try:
        records = read_prediction_log(prediction_log)
    except FileNotFoundError:
        return None
    for record in records:
        if record.get("request_id") == request_id:
            return record
    return None


def _version_of_run(client: MlflowClient, run: Run, model_name: str) -> str:
    """The version registered from a refit run, or from the refit of a cross-validation run."""
    run_id = run.info.run_id
    versions = client.search_model_versions(f"name = '{model_name}'")
    for version in versions:
        if version.run_id == run_id or version.tags.get(f"{TAG_PREFIX}cv_run_id") == run_id:
            return str(version.version)
    raise ModelNotFoundError(
        f"run {run_id} ({run.info.run_name}) registered no version of {model_name!r}; expected a refit run or the "
        "cross-validation run of a registered model"
    )


def _model_version(client: MlflowClient, name: str, version: str) -> Any:
    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no model version {name}/{version} at {mlflow.get_tracking_uri()}") from exc


def _when(millis: int | None) -> str:
    return "" if not millis else datetime.fromtimestamp(millis / 1000, UTC).isoformat(timespec="seconds")


def _version_block(version: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    number = str(version.version)
    tags = dict(version.tags)
    return {
        "name": version.name,
        "version": number,
        "created": _when(version.creation_timestamp),
        "status": tags.get("bonetumor.status", "ready"),
        "aliases": sorted(getattr(version, "aliases", None) or []),
        "arch": tags.get(f"{TAG_PREFIX}arch", ""),
        "init": tags.get(f"{TAG_PREFIX}init", tags.get("bonetumor.init", "")),
        "gate": {
            "decision": tags.get(f"{GATE_PREFIX}decision", ""),
            "reason": tags.get(f"{GATE_PREFIX}reason", ""),
            "fold_f1_macro_mean": tags.get(f"{GATE_PREFIX}candidate.fold_f1_macro_mean", ""),
            "baseline_fold_f1_macro_mean": tags.get(f"{GATE_PREFIX}candidate.baseline_fold_f1_macro_mean", ""),
        },
        "role": tags.get(f"{TAG_PREFIX}role", ""),
        # Where its model card is (``bonetumor model-card VERSION`` prints it).
        "model_card": tags.get(f"{TAG_PREFIX}model_card", ""),
        "alias_history": [
            e for e in events if str(e.get("to_version")) == number or str(e.get("from_version")) == number
        ],
    }


def _run_block(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "started": _when(run.info.start_time),
        "ended": _when(run.info.end_time),
        "user": run.info.user_id,
        "stage": run.data.tags.get(f"{TAG_PREFIX}stage", ""),
        "artifact_uri": run.info.artifact_uri,
        "metrics": {k: round(v, 6) for k, v in sorted(run.data.metrics.items()) if not k.startswith("train_")},
    }


def _run_or_gap(client: MlflowClient, run_id: str, what: str, doc: dict[str, Any]) -> Run | None:
    if not run_id:
        doc["gaps"].append(f"{what}: not recorded on the refit run")
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        doc["gaps"].append(f"{what} {run_id}: not in this tracking store (deleted, or another server)")
        return None


def _fold_runs(client: MlflowClient, cv: Run) -> list[dict[str, Any]]:
    runs = client.search_runs(
        [cv.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{cv.info.run_id}'", max_results=500
    )
    folds = []
    for run in sorted(runs, key=lambda r: r.info.run_name or ""):
        folds.append(
            {
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                "fold": run.data.tags.get(f"{TAG_PREFIX}fold", run.data.params.get("fold", "")),
                "metrics": {k: round(run.data.metrics[k], 6) for k in FOLD_METRICS if k in run.data.metrics},
            }
        )
    return folds


def _lineage_record(client: MlflowClient, run_id: str, doc: dict[str, Any]) -> dict[str, Any]:
    """``lineage/lineage.json`` of the refit run; empty (with a gap) for versions registered before it existed."""
    try:
        names = {Path(a.path).name for a in client.list_artifacts(run_id, LINEAGE_DIR)}
    except MlflowException as exc:
        doc["gaps"].append(f"lineage record: the artifact store did not answer ({exc.error_code})")
        return {}
    if LINEAGE_FILE not in names:
        doc["gaps"].append("lineage record: not logged with this version (registered before lineage.json)")
        return {}
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{LINEAGE_DIR}/{LINEAGE_FILE}")
    try:
        data = json.loads(Path(local).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"run {run_id}: {LINEAGE_DIR}/{LINEAGE_FILE} is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"run {run_id}: {LINEAGE_DIR}/{LINEAGE_FILE} is not a JSON object")
    return data


def _data_block(version: Any, refit: Run, record: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    tags = refit.data.tags
    restore = record.get("restore")
    block: dict[str, Any] = {
        "data_version": tags.get(f"{TAG_PREFIX}data_version", ""),
        "source": tags.get(f"{TAG_PREFIX}data_source", ""),
        "dvc_md5": tags.get(f"{TAG_PREFIX}dvc_data_md5", ""),
        "dvc_recorded_in": tags.get(f"{TAG_PREFIX}dvc_data_recorded_in", ""),
        "manifest_sha256": record.get("manifest_sha256", ""),
        "tiles": record.get("tiles"),
        "dvc_lock": f"{LINEAGE_DIR}/dvc.lock" if record.get("dvc_lock_logged") else None,
    }
    if restore:
        parsed = RestoreRecord.from_dict(restore)
        block["restore"] = parsed.to_dict()
        if not parsed.restorable:
            doc["gaps"].append(f"data: not restorable from the commit: {parsed.reason}")
    else:
        block["restore"] = None
        doc["gaps"].append("data: no restore record (registered before lineage.json); see dvc_recorded_in")
    return block


def _validation_block(client: MlflowClient, cv: Run) -> dict[str, Any]:
    try:
        names = {a.path for a in client.list_artifacts(cv.info.run_id, "data_validation")}
    except MlflowException:
        names = set()
    base = cv.info.artifact_uri.rstrip("/")
    return {
        "report": f"{base}/data_validation/report.json" if "data_validation/report.json" in names else None,
        "data_docs": f"{base}/data_validation/data_docs/index.html" if "data_validation/data_docs" in names else None,
    }


def _pipeline_from_tags(run: Run) -> dict[str, str]:
    tags = run.data.tags
    return {
        "runner": tags.get(f"{TAG_PREFIX}pipeline.runner", "not recorded"),
        "run_id": tags.get(f"{TAG_PREFIX}pipeline.run_id", ""),
        "stage": tags.get(f"{TAG_PREFIX}pipeline.stage", ""),
    }


def render_lineage(doc: dict[str, Any]) -> str:
    """The chain as text, one link per block, in the order an auditor walks it."""
    lines: list[str] = [f"lineage of {doc['reference']} ({doc.get('kind', '?')}) at {doc['tracking_uri']}"]
    answer = doc.get("answer")
    if answer:
        referral = answer.get("referral") or {}
        lines += [
            "",
            "answer",
            f"  request {answer.get('request_id')} at {answer.get('timestamp')} on {answer.get('endpoint', '?')}",
            f"  input sha256 {answer.get('input_sha256')}",
            f"  label {answer.get('label', '-')} (confidence {answer.get('confidence', '-')}); "
            f"referred: {referral.get('refer', '-')} {('- ' + referral['reason']) if referral.get('reason') else ''}",
        ]
    mv = doc["model_version"]
    lines += [
        "",
        f"model version  {mv['name']} version {mv['version']} ({mv['arch'] or '?'}, {mv['init'] or 'init ?'})",
        f"  created {mv['created']}; status {mv['status']}; aliases now: {', '.join(mv['aliases']) or 'none'}",
        f"  gate: {mv['gate']['decision'] or '-'}: {mv['gate']['reason'] or '-'}",
        f"  model card: {mv.get('model_card') or 'none'} (bonetumor model-card {mv['version']})",
    ]
    history = mv["alias_history"]
    lines.append("  aliases over time:" if history else "  aliases over time: no recorded alias change")
    for event in history:
        lines.append(
            f"    {event.get('at')}  {event.get('action')}  @{event.get('alias')}  "
            f"{event.get('from_version') or '-'} -> {event.get('to_version')}  by {event.get('user')}"
            f"{'  (forced)' if event.get('forced') else ''}: {event.get('reason')}"
        )
    for key, title in (("refit_run", "refit run"), ("cv_run", "CV parent run")):
        run = doc.get(key)
        if run:
            figures = ", ".join(f"{k} {v:.4g}" for k, v in list(run["metrics"].items())[:8])
            lines += [
                "",
                f"{title}  {run['run_id']} ({run['name']}, {run['status']}, by {run['user']}, {run['started']})",
                f"  {figures}" if figures else "  no metrics",
            ]
    folds = doc.get("fold_runs") or []
    if folds:
        lines.append(f"  fold runs ({len(folds)}):")
        for fold in folds:
            figures = ", ".join(f"{k} {v:.4g}" for k, v in fold["metrics"].items())
            lines.append(f"    {fold['run_id']}  {fold['name']}  {fold['status']}  {figures}")
    lines += _render_data(doc)
    validation = doc.get("validation")
    if validation:
        lines += [
            "",
            f"validation  report {validation['report'] or 'not logged'}",
            f"  Data Docs {validation['data_docs'] or 'not logged'}",
        ]
    folds_block = doc.get("folds") or {}
    params = doc.get("params") or {}
    code = doc.get("code") or {}
    pipeline = doc.get("pipeline_run") or {}
    lines += [
        "",
        f"folds  sha256 {folds_block.get('sha256') or 'not recorded'} {folds_block.get('file', '')}".rstrip(),
        f"params  hash {params.get('hash') or 'not recorded'}; {len(params.get('run_params') or {})} run params"
        + ("; resolved params.yaml in lineage.json" if params.get("resolved") else ""),
        f"code  git commit {code.get('git_commit')}{' (DIRTY: uncommitted changes)' if code.get('dirty') else ''}"
        f"; bonetumor {code.get('package_version') or '?'}",
    ]
    if code.get("dirty_paths"):
        lines.append(f"  changed files at registration: {', '.join(code['dirty_paths'])}")
    lines.append(
        f"pipeline run  {pipeline.get('runner', 'not recorded')} {pipeline.get('run_id', '')} "
        f"{('stage ' + pipeline['stage']) if pipeline.get('stage') else ''}".rstrip()
    )
    libraries = doc.get("libraries") or {}
    if libraries:
        lines.append("libraries  " + ", ".join(f"{k} {v}" for k, v in sorted(libraries.items())))
    if doc["gaps"]:
        lines += ["", "not recorded / not restorable:"] + [f"  - {gap}" for gap in doc["gaps"]]
    return "\n".join(lines)


def _render_data(doc: dict[str, Any]) -> list[str]:
    """The data block of :func:`render_lineage`: versions, tiles, how to restore them."""
    lines: list[str] = []
    data = doc.get("data")
    if data:
        lines += [
            "",
            f"data  version {data['data_version']} (sha256 of every tile's content hash and label)",
            f"  source {data['source']}; DVC md5 {data['dvc_md5']} ({data['dvc_recorded_in'] or 'not recorded'})",
        ]
        if data.get("tiles"):
            lines.append(f"  tiles: {data['tiles']}")
        restore = data.get("restore")
        if restore:
            state = "restorable" if restore["restorable"] else f"NOT restorable from the commit: {restore['reason']}"
            lines.append(f"  tracked by {restore['tracked_by']}; {state}")
            lines.append("  restore, in a clone of the project:")
            lines += [f"    {command}" for command in restore["commands"]]
        if data.get("dvc_lock"):
            run_id = (doc.get("refit_run") or {}).get("run_id", "")
            lines.append(
                f"  the run's dvc.lock: mlflow artifacts download --run-id {run_id} --artifact-path "
                f"{data['dvc_lock']} --dst-path . ; then dvc checkout (stage outputs from the DVC cache)"
            )
    return lines


def pipeline_run() -> dict[str, str]:
    """Which pipeline runs this process: a Kubeflow run, ``dvc repro`` or a direct command.

    ``BONETUMOR_PIPELINE_RUNNER`` and ``BONETUMOR_PIPELINE_RUN_ID`` (set by the Kubeflow components from the run's
    placeholders, and by ``bonetumor retrain``) win; DVC sets ``DVC_STAGE`` in a stage's command.
    """
    import os

    runner = os.environ.get("BONETUMOR_PIPELINE_RUNNER", "")
    run_id = os.environ.get("BONETUMOR_PIPELINE_RUN_ID", "")
    stage = os.environ.get("DVC_STAGE", "")
    if not runner:
        runner = "dvc repro" if stage else "bonetumor command (no pipeline)"
    return {
        "runner": runner,
        "run_id": run_id,
        "stage": stage,
        "trigger": os.environ.get("BONETUMOR_RETRAIN_TRIGGER", ""),
    }


def write_lineage_record(
    out_dir: str | Path,
    *,
    restore: RestoreRecord,
    manifest_path: str | Path,
    tiles: dict[str, Any],
    folds_path: str | Path,
    params: dict[str, Any],
    libraries: dict[str, str],
    project_dir: str | Path,
) -> Path:
    """Write what registration knows about its inputs into ``out_dir`` (logged as the run's ``lineage/``).

    Besides ``lineage.json`` it copies ``dvc.lock`` as it stood (the stage outputs' md5s, which ``dvc checkout``
    restores from the DVC cache) and, for DVC-tracked data, the ``.dvc`` file that names the tiles.

    Returns:
        The folder written.
    """
    import shutil

    from bonetumor.utils import sha256_file, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    project = Path(project_dir)
    lock = project / "dvc.lock"
    if lock.is_file():
        shutil.copy2(lock, out / "dvc.lock")
    if restore.dvc_file and (project / restore.dvc_file).is_file():
        shutil.copy2(project / restore.dvc_file, out / Path(restore.dvc_file).name)
    write_json(
        out / LINEAGE_FILE,
        {
            "restore": restore.to_dict(),
            "manifest_sha256": sha256_file(manifest_path),
            "tiles": tiles,
            "folds_file": Path(folds_path).name,
            "folds_sha256": sha256_file(folds_path),
            "params": params,
            "libraries": libraries,
            "pipeline_run": pipeline_run(),
            "dvc_lock_logged": lock.is_file(),
        },
    )
    return out
