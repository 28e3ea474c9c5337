"""One Scalekit webhook event read from the inbox, every field checked before anything is applied.

The receiver stores whatever was signed; what is stored can still be malformed. Reading an event never raises: an
event that cannot be applied comes back with the reason, and is recorded ``invalid`` beside its well-formed
neighbours instead of failing the run that applies them. Checks follow Scalekit's envelope
(``id``, ``type``, ``occurred_at``, ``organization_id``, ``object``, ``data``) and, for the event types the
pipeline applies, the ``data`` fields that reach the warehouse's columns; other fields of ``data`` are kept as the
entity's detail (JSON) only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from scim_pipeline.scalekit import ids

USER_CREATED = "organization.directory.user_created"
USER_UPDATED = "organization.directory.user_updated"
USER_DELETED = "organization.directory.user_deleted"
GROUP_CREATED = "organization.directory.group_created"
GROUP_UPDATED = "organization.directory.group_updated"
GROUP_DELETED = "organization.directory.group_deleted"
DIRECTORY_ENABLED = "organization.directory_enabled"
DIRECTORY_DISABLED = "organization.directory_disabled"

USER_EVENTS = {USER_CREATED, USER_UPDATED, USER_DELETED}
GROUP_EVENTS = {GROUP_CREATED, GROUP_UPDATED, GROUP_DELETED}
DIRECTORY_EVENTS = {DIRECTORY_ENABLED, DIRECTORY_DISABLED}
KNOWN_EVENTS = USER_EVENTS | GROUP_EVENTS | DIRECTORY_EVENTS
DELETE_EVENTS = {USER_DELETED, GROUP_DELETED}

# The entity each known type is about: its ``object`` name and the kind of its ``data.id``.
ENTITY = {
    **{t: ("DirectoryUser", ids.USER) for t in USER_EVENTS},
    **{t: ("DirectoryGroup", ids.GROUP) for t in GROUP_EVENTS},
    **{t: ("Directory", ids.DIRECTORY) for t in DIRECTORY_EVENTS},
}
USER_TEXT_FIELDS = ("email", "given_name", "family_name", "preferred_username")

_TOKEN = re.compile(r"[\x21-\x7e]{1,100}")  # an event id or type: printable ASCII, no spaces
_RFC3339 = re.compile(r"(?P<seconds>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d{1,9}))?"
                      r"(?P<offset>Z|[+-]\d{2}:\d{2})", re.ASCII)
REASON_MAX = 300


class Invalid(ValueError):
    """Why an event cannot be applied."""


@dataclass
class Event:
    """One inbox entry as the applier needs it. ``reason`` is set when the event is invalid; the other fields then
    hold only what could be read safely (for the record)."""

    webhook_id: str
    event_id: str | None
    type: str | None
    organization_id: str | None
    occurred_at: datetime | None
    received_at: datetime | None
    data: dict
    seq: int
    reason: str | None = None
    # occurred_at's nanoseconds beyond its microsecond (a TIMESTAMP holds microseconds; Scalekit sends nanoseconds)
    nanos: int = 0

    @property
    def is_delete(self) -> bool:
        return self.type in DELETE_EVENTS

    @property
    def entity_id(self) -> str | None:
        return self.data.get("id") if self.reason is None else None


def parse_time(value: Any) -> datetime | None:
    """RFC 3339 text (Scalekit sends up to nanoseconds and a Z) as a naive UTC datetime, to the microsecond;
    None for anything else. ``parse_nanos`` keeps the rest."""
    parsed = _parse(value)
    return parsed[0] if parsed else None


def parse_nanos(value: Any) -> int:
    """The nanoseconds of an RFC 3339 time beyond its microsecond (0-999): with ``parse_time``, its full precision."""
    parsed = _parse(value)
    return parsed[1] if parsed else 0


def _parse(value: Any) -> tuple[datetime, int] | None:
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    fraction = (match["fraction"] or "").ljust(9, "0")
    offset = "+00:00" if match["offset"] == "Z" else match["offset"]
    try:
        when = datetime.fromisoformat(f"{match['seconds']}.{fraction[:6]}{offset}")
        return when.astimezone(timezone.utc).replace(tzinfo=None), int(fraction[6:])
    except (ValueError, OverflowError):  # the right shape, an impossible date or time
        return None


def event_from_inbox(item) -> Event:
    """An inbox entry (its ``webhook_id``, ``body``, ``seq`` and ``received_at``) as an event to apply."""
    return event_from_body(item.webhook_id, item.body, item.seq, parse_time(item.received_at))


def event_from_body(webhook_id: str, body: str | dict, seq: int, received_at: datetime | None) -> Event:
    """The event, or (never raising) an invalid event with the reason."""
    try:
        payload = _loads(body) if isinstance(body, str) else body
        if not isinstance(payload, dict):
            raise Invalid("body: not a JSON object")
    except Invalid as exc:
        return Event(webhook_id, None, None, None, None, received_at, {}, seq, _reason(exc))
    event = Event(
        webhook_id=webhook_id,
        event_id=_token(payload.get("id")),
        type=_token(payload.get("type")),
        organization_id=_recordable(payload.get("organization_id")),
        occurred_at=parse_time(payload.get("occurred_at")),
        received_at=received_at,
        data={},
        seq=seq,
        nanos=parse_nanos(payload.get("occurred_at")),
    )
    try:
        event.data = _checked(payload)
    except Invalid as exc:
        event.reason = _reason(exc)
    except Exception as exc:  # a shape no check foresaw: still this event's problem alone
        event.reason = _reason(Invalid(f"unreadable: {type(exc).__name__}"))
    return event


def _checked(payload: dict) -> dict:
    """The event's ``data`` once every field the pipeline uses has its type; raises Invalid naming the first one
    that has not."""
    org = _id("organization_id", ids.ORGANIZATION, payload.get("organization_id"))
    if _token(payload.get("id")) is None:
        raise Invalid(f"id: {ids.shown(payload.get('id'))} is not an event id")
    type_ = payload.get("type")
    if _token(type_) is None:
        raise Invalid(f"type: {ids.shown(type_)} is not an event type")
    if parse_time(payload.get("occurred_at")) is None:
        raise Invalid(f"occurred_at: {ids.shown(payload.get('occurred_at'))} is not an RFC 3339 time")
    for name in ("spec_version", "environment_id", "display_name"):
        if name in payload and not isinstance(payload[name], str):
            raise Invalid(f"{name}: {ids.shown(payload[name])} is not text")
    if type_ not in KNOWN_EVENTS:
        return {}  # recorded as ignored: nothing of it is used
    object_name, kind = ENTITY[type_]
    if "object" in payload and payload["object"] != object_name:
        raise Invalid(f"object: {ids.shown(payload['object'])} is not {object_name!r}, as {type_} requires")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise Invalid(f"data: {ids.shown(data)} is not an object")
    _id("data.id", kind, data.get("id"))
    if "organization_id" in data and data["organization_id"] != org:
        raise Invalid(f"data.organization_id: {ids.shown(data['organization_id'])} is not the event's organization")
    if data.get("directory_id") is not None:
        _id("data.directory_id", ids.DIRECTORY, data["directory_id"])
    if type_ in USER_EVENTS:
        _user_fields(data)
    elif type_ in GROUP_EVENTS:
        _optional("data.display_name", data.get("display_name"), str)
    try:  # what DuckDB's JSON takes: no NaN or Infinity, no unpaired surrogate
        json.dumps(data, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise Invalid(f"data: not storable as JSON ({type(exc).__name__})") from None
    return data


def _user_fields(data: dict) -> None:
    for name in USER_TEXT_FIELDS:
        _optional(f"data.{name}", data.get(name), str)
    _optional("data.active", data.get("active"), bool)
    emails = data.get("emails")
    _optional("data.emails", emails, list)
    for email in emails or []:
        if not isinstance(email, str):
            raise Invalid(f"data.emails: {ids.shown(email)} is not text")
    groups = data.get("groups")
    _optional("data.groups", groups, list)
    for group in groups or []:
        if not isinstance(group, dict):
            raise Invalid(f"data.groups: {ids.shown(group)} is not an object")
        _id("data.groups[].id", ids.GROUP, group.get("id"))
        _optional("data.groups[].name", group.get("name"), str)


def _optional(name: str, value: Any, type_: type) -> None:
    if value is not None and not isinstance(value, type_):
        raise Invalid(f"{name}: {ids.shown(value)} is not {_TYPE_NAMES[type_]}")


_TYPE_NAMES = {str: "text", bool: "true or false", list: "a list", dict: "an object"}


def _id(name: str, kind: ids.IdKind, value: Any) -> str:
    try:
        return kind.check(value)
    except ids.InvalidId as exc:
        raise Invalid(f"{name}: {exc}") from None


def _loads(body: str) -> Any:
    def refuse(constant: str):
        raise Invalid(f"body: {constant} is not JSON")

    try:
        return json.loads(body, parse_constant=refuse)
    except Invalid:
        raise
    except RecursionError:
        raise Invalid("body: nested too deeply") from None
    except ValueError as exc:
        raise Invalid(f"body: not JSON ({type(exc).__name__})") from None


def _token(value: Any) -> str | None:
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else None


def _recordable(value: Any) -> str | None:
    """A text field of an event kept on its record even when the event is invalid: as sent, if it can be stored."""
    if not isinstance(value, str) or len(value) > 200:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value


def _reason(exc: Exception) -> str:
    text = str(exc).encode("utf-8", "backslashreplace").decode("utf-8").replace("\n", "\\n")
    return text if len(text) <= REASON_MAX else text[:REASON_MAX - 3] + "..."

