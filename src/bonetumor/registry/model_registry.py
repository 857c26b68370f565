"""The MLflow model registry: log a bundle as a pyfunc model, register it, set its alias, load it back.

The logged model is an MLflow ``pyfunc`` whose artifacts are the bundle (weights and metadata); its Python
class only points at :class:`bonetumor.serving.predictor.Predictor`. So ``mlflow.pyfunc.load_model`` works for any
MLflow client (input: a dataframe with an ``image`` column of encoded bytes), and the BentoML service unwraps
the same object to reach the predictor directly.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
import torchvision
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema
from PIL import Image

from bonetumor import __version__
from bonetumor.config import Config, load_config
from bonetumor.errors import ArtifactError, ModelNotFoundError, RegistryUnavailableError
from bonetumor.faults import fault_point
from bonetumor.registry.gate import GATE_PREFIX, GateMetrics
from bonetumor.registry.model_card import stored_card
from bonetumor.registry.promotions import STATUS_TAG, alias_holder, record_registration
from bonetumor.registry.promotions import promote as record_promotion
from bonetumor.registry.tracking import configure_tracking
from bonetumor.runtime import check_registry_store
from bonetumor.serving.holder import ModelHolder
from bonetumor.serving.predictor import ModelMetadata, Predictor
from bonetumor.serving.served import ServedModel

log = logging.getLogger(__name__)

BUNDLE_ARTIFACT = "bundle"
# STATUS_TAG (imported from bonetumor.registry.promotions, which checks it too; callers import it from here):
# model-version tag ``pending`` while a registration runs, ``ready`` once it finished (aliases only move then).
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
#: MLflow error codes of a store that answered "no such registered model, version or alias" (an unknown alias is
#: INVALID_PARAMETER_VALUE); any other code means the store itself failed (down, locked, not an MLflow server).
NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


class BoneTumorPyfunc(PythonModel):
    """MLflow pyfunc wrapper: loads the bundle artifact into a :class:`Predictor`."""

    def __init__(self) -> None:
        self.predictor: Predictor | None = None
        self.bundle_dir: Path | None = None

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the model from the bundle artifact."""
        self.bundle_dir = Path(context.artifacts[BUNDLE_ARTIFACT])
        self.predictor = Predictor.from_bundle(self.bundle_dir)

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Classify each encoded image of the ``image`` column; returns ``label`` and ``prob_<class>`` columns."""
        if self.predictor is None:
            self.load_context(context)
        predictor = self.predictor
        if predictor is None:  # pragma: no cover - load_context either sets it or raises
            raise ModelNotFoundError("model bundle did not load")
        rows = []
        for i, data in enumerate(model_input["image"]):
            answer = predictor.predict_bytes(bytes(data), source=f"row {i}")
            rows.append({"label": answer["label"], **{f"prob_{c}": p for c, p in answer["probabilities"].items()}})
        return pd.DataFrame(rows)


def signature(classes: tuple[str, ...]) -> ModelSignature:
    """Input: an ``image`` column of encoded bytes; output: ``label`` and one probability column per class."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), *(ColSpec("double", f"prob_{c}") for c in classes)]),
    )


def _example_png(size: int) -> bytes:
    # A flat pink tile: documents the input format in the MLmodel and lets MLflow check the signature on logging.
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (220, 150, 190)).save(buffer, format="PNG")
    return buffer.getvalue()


def log_and_register(
    bundle_dir: str | Path,
    metadata: ModelMetadata,
    model_name: str,
    alias: str,
    version_tags: dict[str, str],
    description: str = "",
    mirror: str | Path | None = None,
    before_ready: Callable[[ModelVersion], dict[str, str]] | None = None,
) -> ModelVersion:
    """Log the bundle as a pyfunc model in the active run, register a new version and point ``alias`` at it.

    The version is created with ``bonetumor.status=pending``; only when the model is logged and every tag is set
    does the status become ``ready`` and, last of all, the alias move. A run that fails or is killed on the way
    leaves at most a pending version that no alias points at.

    Args:
        bundle_dir: The bundle folder.
        metadata: The bundle's metadata.
        model_name: The registered model.
        alias: The alias the new version takes.
        version_tags: Tags of the new version.
        description: The version's description.
        mirror: The local JSONL mirror of the alias history.
        before_ready: Called with the pending version, once it has its number and before it is ``ready``
            (registration logs the model card here, so no ready version lacks one); returns more version tags.

    Returns:
        The new model version.
    """
    info = mlflow.pyfunc.log_model(
        name="model",
        # A "model from code" script, not a pickled object: loading runs our code, never unpickled bytes.
        python_model=str(MODEL_CODE),
        artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
        signature=signature(metadata.classes),
        input_example=pd.DataFrame({"image": [_example_png(metadata.tile_size)]}),
        # Listing requirements skips MLflow's slow inference subprocess; the package must be installed to load.
        pip_requirements=[
            f"bonetumor=={__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
        ],
        metadata={
            "classes": list(metadata.classes),
            "tile_size": metadata.tile_size,
            "input_size": metadata.input_size,
            "arch": metadata.arch,
            "init": metadata.provenance.get("init", ""),
        },
    )
    client = MlflowClient()
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Osteosarcoma H&E tile classifier (bonetumor).")
    run = mlflow.active_run()
    version = client.create_model_version(
        model_name,
        source=info.model_uri,
        run_id=run.info.run_id if run else None,
        # A tracking server (unlike a local store) refuses a models:/m-<id> source without the model it names.
        model_id=info.model_id,
        tags={**version_tags, STATUS_TAG: "pending"},
        description=description,
    )
    fault_point("register-version")
    for key, value in (before_ready(version) if before_ready else {}).items():
        client.set_model_version_tag(model_name, version.version, key, value)
    client.set_model_version_tag(model_name, version.version, STATUS_TAG, "ready")
    former = alias_holder(model_name, alias)
    client.set_registered_model_alias(model_name, alias, version.version)
    # The alias history (MLflow keeps none): the event, the new version's role, the former holder's demotion.
    record_registration(
        model_name,
        str(version.version),
        alias,
        version_tags.get(f"{GATE_PREFIX}reason", "registered"),
        mirror,
        from_version=None if former is None else str(former.version),
    )
    log.info("registered %s version %s (alias %s) from %s", model_name, version.version, alias, info.model_uri)
    return version


def champion_metrics(model_name: str, alias: str) -> GateMetrics | None:
    """Return the gate figures of the version ``alias`` points at, or None when the alias is not set.

    A version registered without gate tags (before the gate existed) cannot be compared: its figures come back
    with an empty data version, so the gate keeps new models as challengers until someone promotes one.
    """
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    try:
        return GateMetrics.from_tags(dict(version.tags), str(version.version))
    except ArtifactError as exc:
        log.warning("%s", exc)
        return GateMetrics(str(version.version), float("nan"), None, False, "", "")


def promote(
    model_name: str,
    version: str,
    alias: str,
    reason: str,
    *,
    force: bool = False,
    mirror: str | Path | None = None,
    challenger_alias: str = "challenger",
) -> ModelVersion:
    """Point ``alias`` at ``version`` by hand (after review); the event joins the alias history.

    See :func:`bonetumor.registry.promotions.promote`: the gate's original record (``bonetumor.gate.decision`` /
    ``reason``) stays on both versions, role tags record the move, the promoted version loses the challenger
    alias, and a promotion that lowers the gate's figures needs ``force``.

    Args:
        model_name: Registered model name.
        version: The version to promote.
        alias: The alias to move.
        reason: Why (required; recorded as ``bonetumor.promotion_reason`` and in the history).
        force: Promote even when it lowers the mean per-fold macro-F1 (the event says ``forced: true``).
        mirror: Local JSONL mirror of the history (None: MLflow only).
        challenger_alias: Taken off the promoted version when it holds it.

    Returns:
        The promoted version.

    Raises:
        ConfigError: No reason was given.
        ModelNotFoundError: The version does not exist.
        ArtifactError: The version is not ``ready`` (its registration never finished).
        PromotionRefusedError: It would lower the gate's figures and ``force`` is not set.
    """
    return record_promotion(
        model_name, version, alias, reason, force=force, mirror=mirror, challenger_alias=challenger_alias
    )


def resolve_version(model_name: str, alias_or_version: str) -> ModelVersion:
    """Return the model version an alias (or a version number) names.

    Raises:
        ModelNotFoundError: The store answered: no such registered model, alias or version.
        RegistryUnavailableError: The store did not answer (a server that is down, a database that stays locked,
            a URL that is not an MLflow server).
    """
    client = MlflowClient()
    try:
        if alias_or_version.isdigit():
            return client.get_model_version(model_name, alias_or_version)
        return client.get_model_version_by_alias(model_name, alias_or_version)
    except MlflowException as exc:
        uri = mlflow.get_tracking_uri()
        if exc.error_code not in NOT_FOUND_CODES:
            reason = (str(exc.message).splitlines() or [exc.error_code])[0]
            raise RegistryUnavailableError(
                f"tracking store {uri} did not answer the lookup of {model_name}@{alias_or_version} "
                f"({exc.error_code}: {reason}); check that it runs and is reachable from here (`mlflow server "
                "...`, the network, its credentials), or set MLFLOW_TRACKING_URI to one that is"
            ) from exc
        raise ModelNotFoundError(
            f"no model version {model_name}@{alias_or_version} at {uri}; "
            + (_gate_hint(client, model_name) or "run `make pipeline` ")
            + "(or `dvc repro -f register` when the MLflow database was removed after a run), or set "
            "MLFLOW_TRACKING_URI to the server that holds it"
        ) from exc


def _gate_hint(client: MlflowClient, model_name: str) -> str:
    """Explain a missing alias when versions exist that the champion gate kept back."""
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return ""
    if not versions:
        return ""
    latest = max(versions, key=lambda v: int(v.version))
    reason = latest.tags.get(f"{GATE_PREFIX}reason", "")
    return (
        f"the latest version {latest.version} was not promoted ({reason or 'no gate decision recorded'}); "
        f"review it and run `bonetumor promote {latest.version} --reason ...`, or serve it by version "
        f"(BONETUMOR_MODEL_ALIAS={latest.version}) "
    )


def _load_version(model_name: str, version: ModelVersion) -> tuple[Predictor, Path]:
    """Load a resolved version's bundle as a :class:`Predictor`; refuse a registration that never finished."""
    status = version.tags.get(STATUS_TAG, "ready")
    if status != "ready":
        raise ArtifactError(f"{model_name} version {version.version} is {status!r}, not 'ready': it is not served")
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{model_name}/{version.version}")
    except MlflowException as exc:
        # An artifact store that is down or a damaged logged model: the caller (the alias watcher) keeps serving
        # the version it has, and says why.
        raise ArtifactError(f"{model_name} version {version.version} does not load from the registry ({exc})") from exc
    except ArtifactError as exc:
        # A bundle file that is damaged or fails its SHA-256: the path is a download folder, so say which version.
        raise ArtifactError(f"{model_name} version {version.version} is refused: {exc}") from exc
    wrapper = pyfunc.unwrap_python_model()
    if not isinstance(wrapper, BoneTumorPyfunc) or wrapper.predictor is None or wrapper.bundle_dir is None:
        raise ModelNotFoundError(
            f"{model_name} version {version.version} is not a bonetumor model (got {type(wrapper).__name__})"
        )
    predictor = wrapper.predictor
    predictor.name, predictor.version = model_name, str(version.version)
    return predictor, wrapper.bundle_dir


def load_predictor(model_name: str, alias_or_version: str) -> Predictor:
    """Load a registered model as a :class:`Predictor` named with its registered name and version.

    The alias is resolved once, so the version reported with every answer is the one actually loaded.
    """
    return _load_version(model_name, resolve_version(model_name, alias_or_version))[0]


def load_served_version(config: Config, version: ModelVersion, served_as: str = "") -> ServedModel:
    """Load a resolved model version as a :class:`ServedModel` (fast engine, Grad-CAM model, identity).

    Args:
        config: The project's config (``register.model_name``, ``serving``, ``validate``).
        version: The registered version.
        served_as: The alias or version number the service was asked for (shown by ``/model_info``).
    """
    name = config.register.model_name
    predictor, bundle_dir = _load_version(name, version)
    created = datetime.fromtimestamp((version.creation_timestamp or 0) / 1000, UTC).isoformat(timespec="seconds")
    identity = {
        "name": name,
        "version": str(version.version),
        "run_id": version.run_id or "",
        # Registered before 0.4 bundles recorded it: the version's creation time is when its refit finished.
        "trained_at": str(predictor.metadata.provenance.get("trained_at") or created),
        "served_as": served_as or str(version.version),
        "aliases": ",".join(getattr(version, "aliases", None) or []),
        "gate_decision": version.tags.get(f"{GATE_PREFIX}decision", ""),
        "gate_reason": version.tags.get(f"{GATE_PREFIX}reason", ""),
    }
    try:
        return ServedModel.create(
            bundle_dir, predictor, identity, config.serving, config.validate, card=_served_card(name, version)
        )
    except ArtifactError as exc:
        # An ONNX file that is damaged or fails its SHA-256, named by its download folder: say which version.
        raise ArtifactError(f"{name} version {version.version} is refused: {exc}") from exc


def _served_card(name: str, version: ModelVersion) -> tuple[str, dict[str, Any]] | None:
    """The card logged with the version, or None (the service answers 404 and says how to write one)."""
    try:
        return stored_card(version)
    except ArtifactError as exc:
        # The model itself is fine: serve it, and say in the log why /model_card has nothing.
        log.warning("%s version %s is served without its model card: %s", name, version.version, exc)
        return None


def open_served_model(params_path: str | Path, alias_or_version: str | None = None) -> tuple[ModelHolder, Config]:
    """Load the model params.yaml names for serving, in a holder that follows its alias.

    Args:
        params_path: The project's params.yaml (tracking URI, model name, alias, the ``serving`` section).
        alias_or_version: Overrides ``register.alias``; a version number pins it (no reloading).

    Returns:
        The holder (not started: call ``start()`` to follow the alias) and the config.

    Raises:
        RegistryUnavailableError: The tracking store is not reachable or holds no registry (checked in seconds,
            before MLflow is asked).
        ModelNotFoundError: No such version, or not a bonetumor model.
        ArtifactError: The version is not ready, or its files are damaged, fail their SHA-256 or do not load.
    """
    params_path = Path(params_path)
    config = load_config(params_path)
    uri = configure_tracking(config.tracking, params_path.resolve().parent)
    log.info("%s", check_registry_store(uri))
    name = config.register.model_name
    ref = alias_or_version or config.register.alias
    initial = load_served_version(config, resolve_version(name, ref), ref)
    return (
        ModelHolder(
            initial,
            resolve=lambda: str(resolve_version(name, ref).version),
            load=lambda version: load_served_version(config, resolve_version(name, version), ref),
            reload_seconds=0.0 if ref.isdigit() else config.serving.reload_seconds,
        ),
        config,
    )
