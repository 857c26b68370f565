"""The history of a registered model's aliases: every move appended, never rewritten (MLflow keeps none, mlflow#2169).

Each alias change -- the gate's at registration, ``bonetumor promote``, ``bonetumor rollback`` -- appends one
event as a registered-model tag ``bonetumor.promotion.<sequence:06d>`` (JSON: alias, from and to version, who, when
in UTC, why, whether it was forced, both sides' gate figures), and the same line to a local JSONL mirror. An
earlier event tag is never edited or deleted.

A move is clean: the promoted version loses the challenger alias; the gate's original record on both versions
(``bonetumor.gate.decision`` / ``bonetumor.gate.reason``) stays as the gate wrote it, and role tags say what happened
since: ``bonetumor.role`` (``<alias>`` or ``former-<alias>``), ``bonetumor.promoted_at|by`` and
``bonetumor.promotion_reason`` on the promoted version, ``bonetumor.demoted_at|by`` and ``bonetumor.demoted_reason``
on the version it replaced.

Concurrency: MLflow has no compare-and-set on tags. An event is read back after it is written and appended again
under the next sequence number when another writer took its number in between, which covers most races; two
promotions of the same model at the same instant can still lose one event in MLflow (the mirrors keep both).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bonetumor.errors import (
    ArtifactError,
    ConfigError,
    ModelNotFoundError,
    PromotionRefusedError,
    RegistryUnavailableError,
)
from bonetumor.registry.gate import GateMetrics

log = logging.getLogger(__name__)

#: Registered-model tag prefix of the events; the suffix is the zero-padded sequence number.
EVENT_PREFIX: Final = "bonetumor.promotion."
#: What moved the alias.
ACTIONS: Final = ("register", "promote", "rollback")
#: Model-version tag: ``pending`` while a registration runs, ``ready`` once it finished (the registry's own tag).
STATUS_TAG: Final = "bonetumor.status"
#: ``<alias>`` on the version an alias points at since a move, ``former-<alias>`` on the one it replaced.
ROLE_TAG: Final = "bonetumor.role"
#: Longest event JSON kept in a registered-model tag. MLflow 3.17 validates registered-model tag values up to
#: 100,000 characters (``MAX_MODEL_REGISTRY_TAG_VALUE_LENGTH``), but its SQL stores keep them in
#: ``registered_model_tags.value VARCHAR(5000)``: PostgreSQL refuses a longer one (sqlite does not check).
MAX_EVENT_CHARS: Final = 5000
#: Model-version tag values are ``TEXT`` (100,000 characters allowed); the role tags' reasons are cut well below.
MAX_VERSION_TAG_CHARS: Final = 5000
#: MLflow error code of a registered model that does not exist.
_MISSING = "RESOURCE_DOES_NOT_EXIST"
#: ``from_version`` default of :func:`record_registration`: read the former holder from the history.
FROM_HISTORY: Final = "<from history>"
_APPEND_TRIES = 5


@dataclasses.dataclass(frozen=True)
class PromotionEvent:
    """One alias change, as stored (a registered-model tag's JSON, a mirror line).

    Attributes:
        sequence: 1, 2, ... per registered model, over all its aliases.
        model: Registered model name.
        alias: The alias that moved.
        action: ``register`` (the gate, at registration), ``promote`` (by hand) or ``rollback``.
        from_version: The version the alias pointed at before (None: it pointed at none).
        to_version: The version it points at since.
        user: Who: ``MLFLOW_TRACKING_USERNAME``, else the OS user (:func:`current_user`).
        at: When, UTC ISO 8601 to the second.
        reason: Why (the gate's reason at registration); cut, and marked so, when it would not fit the tag.
        forced: The promotion lowered the gate's figures and went through only because ``force`` was given.
        gate: Both sides' gate figures, ``{"to": ..., "from": ...}``: a :class:`GateMetrics` as a dict, or None
            for a side without readable ``bonetumor.gate.candidate.*`` tags.
    """

    sequence: int
    model: str
    alias: str
    action: str
    from_version: str | None
    to_version: str
    user: str
    at: str
    reason: str
    forced: bool = False
    gate: dict[str, dict[str, Any] | None] = dataclasses.field(default_factory=lambda: {"to": None, "from": None})

    def to_dict(self) -> dict[str, Any]:
        """Return the event as plain JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromotionEvent:
        """Rebuild an event from :meth:`to_dict`'s output (unknown keys are ignored).

        Raises:
            ArtifactError: A required field is missing or has the wrong type.
        """
        if not isinstance(data, dict):
            raise ArtifactError(f"a promotion event must be a JSON object, got {type(data).__name__}")
        missing = [f for f in ("sequence", "model", "alias", "action", "to_version", "user", "at") if f not in data]
        if missing:
            raise ArtifactError(f"promotion event {data!r:.200} lacks {', '.join(missing)}")
        try:
            sequence = int(data["sequence"])
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"promotion event sequence {data['sequence']!r} is not an integer") from exc
        gate = data.get("gate") or {}
        if not isinstance(gate, dict):
            raise ArtifactError(f"promotion event {sequence}: gate must be an object, got {type(gate).__name__}")
        source = data.get("from_version")
        return cls(
            sequence=sequence,
            model=str(data["model"]),
            alias=str(data["alias"]),
            action=str(data["action"]),
            from_version=None if source in (None, "") else str(source),
            to_version=str(data["to_version"]),
            user=str(data["user"]),
            at=str(data["at"]),
            reason=str(data.get("reason", "")),
            forced=bool(data.get("forced", False)),
            gate={"to": gate.get("to"), "from": gate.get("from")},
        )

    def to_json(self) -> str:
        """One line of JSON (the tag value and the mirror line are the same)."""
        return json.dumps(self.to_dict(), sort_keys=False)


def current_user() -> str:
    """Return who is acting: the MLflow user, else the OS user, else ``unknown``.

    ``MLFLOW_TRACKING_USERNAME`` when set (the user a tracking server with basic auth knows); else
    :func:`getpass.getuser`, which reads ``LOGNAME``/``USER``/``LNAME``/``USERNAME`` and, when none is set (a
    container, cron), the password database entry of the process's uid.
    """
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "").strip()
    if user:
        return user
    try:
        return getpass.getuser() or "unknown"
    except (KeyError, OSError, ImportError):  # no passwd entry for the uid (OSError from 3.13 on); no pwd module
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _figures(version: ModelVersion | None) -> dict[str, Any] | None:
    """The gate figures a version was registered with, or None (no version, or no readable gate tags)."""
    if version is None:
        return None
    try:
        return dataclasses.asdict(GateMetrics.from_tags(dict(version.tags), str(version.version)))
    except ArtifactError:
        return None


def _f1(figures: dict[str, Any] | None) -> float | None:
    value = None if figures is None else figures.get("fold_f1_macro_mean")
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _registered_tags(client: MlflowClient, model_name: str) -> dict[str, str] | None:
    """The registered model's tags, or None when it does not exist."""
    try:
        return dict(client.get_registered_model(model_name).tags)
    except MlflowException as exc:
        if exc.error_code == _MISSING:
            return None
        raise RegistryUnavailableError(
            f"tracking store {mlflow.get_tracking_uri()} did not answer for registered model {model_name} "
            f"({exc.error_code}); check that it runs and is reachable, or set MLFLOW_TRACKING_URI to one that is"
        ) from exc


def _events(tags: dict[str, str]) -> list[PromotionEvent]:
    events = []
    for key, value in tags.items():
        if not key.startswith(EVENT_PREFIX):
            continue
        try:
            events.append(PromotionEvent.from_dict(json.loads(value)))
        except (ValueError, ArtifactError) as exc:
            log.warning("registered-model tag %s is not a readable promotion event, left out: %s", key, exc)
    return sorted(events, key=lambda e: e.sequence)


def promotion_history(model_name: str, alias: str | None = None) -> list[PromotionEvent]:
    """Return the alias changes of a registered model from its MLflow tags, oldest first.

    Args:
        model_name: Registered model name.
        alias: Only this alias's events (None: all).

    Returns:
        The events sorted by sequence; empty for a model that does not exist or has none. A tag that does not
        parse is left out with a warning.

    Raises:
        RegistryUnavailableError: The tracking store did not answer.
    """
    tags = _registered_tags(MlflowClient(), model_name)
    events = _events(tags or {})
    return [e for e in events if alias is None or e.alias == alias]


def read_mirror(path: str | Path) -> list[PromotionEvent]:
    """Return the events of a local JSONL mirror, in file order (empty when the file does not exist).

    Raises:
        ArtifactError: A line is not a promotion event (named by file and line).
    """
    path = Path(path)
    if not path.is_file():
        return []
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            events.append(PromotionEvent.from_dict(json.loads(line)))
        except (ValueError, ArtifactError) as exc:
            raise ArtifactError(
                f"{path}:{number} is not a promotion event ({exc}); expected one JSON object per line"
            ) from exc
    return events


def _fit(event: PromotionEvent) -> PromotionEvent:
    """Cut the reason until the event's JSON fits :data:`MAX_EVENT_CHARS`, and say so at the end of the reason."""
    if len(event.to_json()) <= MAX_EVENT_CHARS:
        return event
    original = event.reason
    marker = f" [cut to fit MLflow's {MAX_EVENT_CHARS}-character tag value; the reason had {len(original)} characters]"

    def cut(keep: int) -> PromotionEvent:
        return dataclasses.replace(event, reason=original[:keep] + marker)

    # JSON escapes (quotes, backslashes, non-ASCII) make a character take 1 to 12 characters: search the longest
    # prefix that fits.
    low, high = 0, len(original)
    if len(cut(0).to_json()) > MAX_EVENT_CHARS:
        raise ArtifactError(f"promotion event {event.sequence} does not fit {MAX_EVENT_CHARS} characters")
    while low < high:
        middle = (low + high + 1) // 2
        if len(cut(middle).to_json()) <= MAX_EVENT_CHARS:
            low = middle
        else:
            high = middle - 1
    return cut(low)


def _append(
    client: MlflowClient,
    model_name: str,
    *,
    alias: str,
    action: str,
    from_version: str | None,
    to_version: str,
    user: str,
    at: str,
    reason: str,
    gate: dict[str, dict[str, Any] | None],
    mirror: str | Path | None,
    forced: bool = False,
) -> PromotionEvent:
    """Write the next event tag (never over an existing one) and the mirror line."""
    if action not in ACTIONS:
        raise ConfigError(f"promotion action {action!r} is not one of {', '.join(ACTIONS)}")
    for _ in range(_APPEND_TRIES):
        tags = _registered_tags(client, model_name)
        if tags is None:
            raise ModelNotFoundError(f"no registered model {model_name} at {mlflow.get_tracking_uri()}")
        taken = [
            int(k[len(EVENT_PREFIX) :]) for k in tags if k.startswith(EVENT_PREFIX) and k[len(EVENT_PREFIX) :].isdigit()
        ]
        event = _fit(
            PromotionEvent(
                sequence=max(taken, default=0) + 1,
                model=model_name,
                alias=alias,
                action=action,
                from_version=from_version,
                to_version=to_version,
                user=user,
                at=at,
                reason=reason,
                forced=forced,
                gate=gate,
            )
        )
        key, value = f"{EVENT_PREFIX}{event.sequence:06d}", event.to_json()
        client.set_registered_model_tag(model_name, key, value)
        # Another writer may have taken the same number between the read and the write: check, else take the next.
        if (_registered_tags(client, model_name) or {}).get(key) == value:
            break
        log.warning("promotion event %s of %s was taken by another writer; appending again", key, model_name)
    else:
        raise RegistryUnavailableError(
            f"could not append a promotion event to {model_name} after {_APPEND_TRIES} tries: other writers keep "
            "taking the next sequence number"
        )
    if mirror:
        _mirror(Path(mirror), value)
    return event


def _mirror(path: Path, line: str) -> None:
    """Append one line to the JSONL mirror; MLflow holds the record, so a failure here only warns."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    except OSError as exc:
        log.warning("the promotion event is in MLflow but could not be mirrored to %s: %s", path, exc)


def alias_holder(model_name: str, alias: str) -> ModelVersion | None:
    """Return the version ``alias`` points at now, or None when it points at none (or the model does not exist).

    Raises:
        RegistryUnavailableError: The tracking store did not answer (not the same as "no such alias").
    """
    return _holder(MlflowClient(), model_name, alias)


def _holder(client: MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        # An unknown alias is INVALID_PARAMETER_VALUE, an unknown model RESOURCE_DOES_NOT_EXIST; anything else means
        # the store failed, and guessing "no holder" would skip the figure check and the demotion.
        if exc.error_code in (_MISSING, "INVALID_PARAMETER_VALUE"):
            return None
        raise RegistryUnavailableError(
            f"tracking store {mlflow.get_tracking_uri()} did not answer the lookup of {model_name}@{alias} "
            f"({exc.error_code}); check that it runs and is reachable, or set MLFLOW_TRACKING_URI to one that is"
        ) from exc


def _set_tags(client: MlflowClient, model_name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value[:MAX_VERSION_TAG_CHARS])


def _demote(
    client: MlflowClient, model_name: str, version: str, alias: str, replaced_by: str, reason: str, at: str, user: str
) -> None:
    """Tag the version ``alias`` left, unless it serves under another alias now (its role tag names that one)."""
    role = client.get_model_version(model_name, version).tags.get(ROLE_TAG, "")
    if role and role != alias and not role.startswith("former-"):
        return
    _set_tags(
        client,
        model_name,
        version,
        {
            ROLE_TAG: f"former-{alias}",
            "bonetumor.demoted_at": at,
            "bonetumor.demoted_by": user,
            "bonetumor.demoted_reason": f"replaced by version {replaced_by}: {reason}",
        },
    )


def _move(
    client: MlflowClient,
    model_name: str,
    version: ModelVersion,
    before: ModelVersion | None,
    alias: str,
    reason: str,
    challenger_alias: str,
    at: str,
    user: str,
) -> None:
    """Point ``alias`` at ``version``, take the challenger alias off it, tag both sides (never the gate's tags)."""
    number = str(version.version)
    client.set_registered_model_alias(model_name, alias, number)
    if challenger_alias and challenger_alias != alias and challenger_alias in (version.aliases or []):
        client.delete_registered_model_alias(model_name, challenger_alias)
    _set_tags(
        client,
        model_name,
        number,
        {
            ROLE_TAG: alias,
            "bonetumor.promoted_at": at,
            "bonetumor.promoted_by": user,
            "bonetumor.promotion_reason": reason,
        },
    )
    if before is not None and str(before.version) != number:
        _demote(client, model_name, str(before.version), alias, number, reason, at, user)


def _ready_version(client: MlflowClient, model_name: str, version: str) -> ModelVersion:
    try:
        found = client.get_model_version(model_name, version)
    except MlflowException as exc:
        raise ModelNotFoundError(
            f"no model version {model_name} {version} at {mlflow.get_tracking_uri()}; expected an existing version"
        ) from exc
    status = found.tags.get(STATUS_TAG, "ready")  # versions from before the status tag were complete
    if status != "ready":
        raise ArtifactError(
            f"{model_name} version {version} is {status!r}, not 'ready': its registration never finished"
        )
    return found


def _require_reason(reason: object, what: str) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError(
            f"{what} needs a reason (--reason), got {reason!r}; expected a non-empty sentence: it is recorded in "
            "the alias history for the audit trail"
        )
    return reason.strip()


def record_registration(
    model_name: str,
    version: str,
    alias: str,
    reason: str,
    mirror: str | Path | None = None,
    *,
    from_version: str | None = FROM_HISTORY,
) -> PromotionEvent:
    """Append the event of the gate pointing ``alias`` at a new version (call right after the alias moved).

    The new version gets ``bonetumor.role=<alias>``; the version the alias left (a former champion) gets
    ``bonetumor.role=former-<alias>`` and the ``demoted_*`` tags. The gate's own tags are not touched.

    Args:
        model_name: Registered model name.
        version: The new version.
        alias: The alias the gate set (``champion`` or ``challenger``).
        reason: The gate's reason (empty: ``registered``).
        mirror: Local JSONL mirror (None: MLflow only).
        from_version: The version the alias pointed at before the move, read before moving it (None: none).
            Left out, it is the latest event's ``to_version`` for the alias, as long as that version's role tag
            still names the alias.

    Returns:
        The appended event.
    """
    client = MlflowClient()
    version = str(version)
    previous = _previous_from_history(client, model_name, alias) if from_version == FROM_HISTORY else from_version
    previous = None if previous in (None, "", version) else str(previous)
    new = client.get_model_version(model_name, version)
    old = None
    at, user, reason = _now(), current_user(), (reason or "").strip() or "registered"
    if previous is not None:
        try:
            old = client.get_model_version(model_name, previous)
        except MlflowException:
            log.warning("the former @%s holder, version %s of %s, is gone", alias, previous, model_name)
        else:
            _demote(client, model_name, previous, alias, version, f"registration: {reason}", at, user)
    _set_tags(client, model_name, version, {ROLE_TAG: alias})
    return _append(
        client,
        model_name,
        alias=alias,
        action="register",
        from_version=previous,
        to_version=version,
        user=user,
        at=at,
        reason=reason,
        gate={"to": _figures(new), "from": _figures(old)},
        mirror=mirror,
    )


def _previous_from_history(client: MlflowClient, model_name: str, alias: str) -> str | None:
    events = _events(_registered_tags(client, model_name) or {})
    last = next((e for e in reversed(events) if e.alias == alias), None)
    if last is None:
        return None
    try:
        role = client.get_model_version(model_name, last.to_version).tags.get(ROLE_TAG, "")
    except MlflowException:
        return None
    return last.to_version if role == alias else None


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
    """Point ``alias`` at ``version`` by hand, after review, and append the event (action ``promote``).

    Args:
        model_name: Registered model name.
        version: The version to promote.
        alias: The alias to move (``register.alias``).
        reason: Why (required).
        force: Promote even when the version's mean per-fold macro-F1 is lower than the current holder's (the
            event says ``forced: true``).
        mirror: Local JSONL mirror (None: MLflow only).
        challenger_alias: Taken off the promoted version when it holds it.

    Returns:
        The promoted version, as the registry has it now.

    Raises:
        ConfigError: No reason was given.
        ModelNotFoundError: The version does not exist.
        ArtifactError: The version is not ``ready`` (its registration never finished).
        PromotionRefusedError: It would lower the gate's figures and ``force`` is not set.
    """
    reason = _require_reason(reason, "a promotion")
    version = str(version).strip()
    client = MlflowClient()
    found = _ready_version(client, model_name, version)
    before = _holder(client, model_name, alias)
    new_figures, old_figures = _figures(found), _figures(before)
    new_f1, old_f1 = _f1(new_figures), _f1(old_figures)
    lowers = (
        before is not None
        and str(before.version) != version
        and new_f1 is not None
        and old_f1 is not None
        and new_f1 < old_f1
    )
    if lowers and not force:
        raise PromotionRefusedError(
            f"{model_name} version {version}'s mean per-fold macro-F1 {new_f1:.4f} is lower than @{alias} version "
            f"{before.version if before else '?'}'s {old_f1:.4f}; pass --force (force=True) to promote it anyway: "
            "the alias history will say it was forced"
        )
    at, user = _now(), current_user()
    _move(client, model_name, found, before, alias, reason, challenger_alias, at, user)
    _append(
        client,
        model_name,
        alias=alias,
        action="promote",
        from_version=None if before is None else str(before.version),
        to_version=version,
        user=user,
        at=at,
        reason=reason,
        forced=lowers,
        gate={"to": new_figures, "from": old_figures},
        mirror=mirror,
    )
    log.info("promoted %s version %s to @%s%s", model_name, version, alias, " (forced)" if lowers else "")
    return client.get_model_version(model_name, version)


def rollback(
    model_name: str,
    alias: str,
    reason: str,
    *,
    mirror: str | Path | None = None,
    challenger_alias: str = "challenger",
) -> PromotionEvent:
    """Return ``alias`` to the version it pointed at before the current one, per the history.

    That is the ``from_version`` of the latest event that moved ``alias`` to its current holder, so rolling back
    twice returns to where the first rollback started. Never refused for figures: the version served before.

    Args:
        model_name: Registered model name.
        alias: The alias to roll back (``register.alias``).
        reason: Why (required).
        mirror: Local JSONL mirror (None: MLflow only).
        challenger_alias: Taken off the restored version when it holds it.

    Returns:
        The appended event (action ``rollback``).

    Raises:
        ConfigError: No reason was given.
        PromotionRefusedError: The alias points at no version, or the history names no earlier holder.
        ModelNotFoundError: The earlier holder was deleted.
        ArtifactError: The earlier holder is no longer ``ready``.
    """
    reason = _require_reason(reason, "a rollback")
    client = MlflowClient()
    current = _holder(client, model_name, alias)
    if current is None:
        raise PromotionRefusedError(
            f"@{alias} of {model_name} points at no version at {mlflow.get_tracking_uri()}: there is nothing to roll "
            "back; expected an alias set by a registration or a promotion"
        )
    number = str(current.version)
    moves = [
        e
        for e in promotion_history(model_name, alias)
        if e.to_version == number and e.from_version is not None and e.from_version != number
    ]
    if not moves:
        raise PromotionRefusedError(
            f"the alias history of {model_name} names no version that held @{alias} before version {number} "
            "(`bonetumor promotions` lists it): there is nothing to roll back to; promote a version by hand "
            "instead (`bonetumor promote VERSION --reason ...`)"
        )
    previous = moves[-1].from_version or ""
    target = _ready_version(client, model_name, previous)
    at, user = _now(), current_user()
    _move(
        client,
        model_name,
        target,
        current,
        alias,
        f"rollback from version {number}: {reason}",
        challenger_alias,
        at,
        user,
    )
    event = _append(
        client,
        model_name,
        alias=alias,
        action="rollback",
        from_version=number,
        to_version=previous,
        user=user,
        at=at,
        reason=reason,
        gate={"to": _figures(target), "from": _figures(current)},
        mirror=mirror,
    )
    log.info("rolled %s @%s back from version %s to %s", model_name, alias, number, previous)
    return event


def format_history(events: list[PromotionEvent]) -> str:
    """Return the events as a readable table, in the order given (``bonetumor promotions``).

    Columns: sequence, when (UTC), action, alias, from -> to version, user, forced, mean per-fold macro-F1 from ->
    to (``-``: not readable), reason (last, not padded).
    """
    if not events:
        return "no alias change recorded"

    def f1(figures: dict[str, Any] | None) -> str:
        value = _f1(figures)
        return "-" if value is None else f"{value:.4f}"

    rows = [("#", "at (UTC)", "action", "alias", "from -> to", "user", "forced", "macro-F1 from -> to", "reason")]
    for e in events:
        gate = e.gate or {}
        rows.append(
            (
                str(e.sequence),
                e.at,
                e.action,
                e.alias,
                f"{e.from_version or '-'} -> {e.to_version}",
                e.user,
                "yes" if e.forced else "no",
                f"{f1(gate.get('from'))} -> {f1(gate.get('to'))}",
                e.reason,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    )
