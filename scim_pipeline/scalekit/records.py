"""Scalekit's directory messages as the warehouse's records: pages of users and groups as NDJSON lines.

A full sync converts every user of every directory, and that conversion was most of a full sync's CPU: parsing
a page into Python protobuf objects and walking each user's SCIM detail (a ``Struct`` of about 40 values) builds a
wrapper for every value. The C extension ``_records`` reads a page of users as it came off the wire instead and
writes its lines directly, about ten times faster. ``users_page_py`` is the same conversion in Python (protobuf's
parser, ``user_record``, orjson): the fallback where the extension was not built, and the reference the tests hold
the extension to, byte for byte. Groups are a page or two a directory and always take the Python path.

A detail's keys are sorted so that its text is canonical: a server may serialize a map in any order, and the
warehouse compares the text to count changed users.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable

import orjson
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

try:
    from scim_pipeline.scalekit import _records
except ImportError:  # installed without a C compiler: the same lines, several times slower
    _records = None

COMPILED = _records is not None


@dataclass(frozen=True)
class Page:
    """One page of a listing as warehouse records: NDJSON lines (each ending in a newline), how many there are, and
    the token of the next page ("" after the last)."""

    lines: bytes
    count: int
    next_page_token: str = ""

    @classmethod
    def of(cls, records: Iterable[dict], next_page_token: str = "") -> "Page":
        lines = [orjson.dumps(r) for r in records]
        return cls(b"".join(line + b"\n" for line in lines), len(lines), next_page_token)

    def records(self) -> list[dict]:
        return [orjson.loads(line) for line in self.lines.splitlines()]


def users_page(data: bytes, organization_id: str, directory_id: str) -> Page:
    """A serialized ``ListDirectoryUsersResponse`` as warehouse records; ValueError if it is not one."""
    if _records is not None:
        return Page(*_records.users_page(data, organization_id, directory_id))
    return users_page_py(data, organization_id, directory_id)


def users_page_py(data: bytes, organization_id: str, directory_id: str) -> Page:
    from scalekit.v1.directories.directories_pb2 import ListDirectoryUsersResponse

    try:
        page = ListDirectoryUsersResponse.FromString(data)
        return Page.of((user_record(organization_id, directory_id, u) for u in page.users), page.next_page_token)
    except (DecodeError, OverflowError) as exc:  # OverflowError: a timestamp outside the years 1 to 9999
        raise ValueError(f"not a ListDirectoryUsersResponse: {exc}") from exc


def groups_page(data: bytes, organization_id: str, directory_id: str) -> Page:
    """A serialized ``ListDirectoryGroupsResponse`` as warehouse records; ValueError if it is not one."""
    from scalekit.v1.directories.directories_pb2 import ListDirectoryGroupsResponse

    try:
        page = ListDirectoryGroupsResponse.FromString(data)
        return Page.of((group_record(organization_id, directory_id, g) for g in page.groups), page.next_page_token)
    except (DecodeError, OverflowError) as exc:
        raise ValueError(f"not a ListDirectoryGroupsResponse: {exc}") from exc


def user_record(organization_id: str, directory_id: str, user) -> dict:
    """A ``DirectoryUser`` as a warehouse record; its SCIM detail is JSON text (written into the record as is).

    Only ``users_page_py`` calls this, so the detail goes through ``struct_json_py``: the reference must not lean on
    the extension it checks (and without the extension the two are the same)."""
    detail = user.user_detail
    active = detail.fields.get("active")
    return {
        "user_id": user.id,
        "organization_id": organization_id,
        "directory_id": directory_id,
        "email": user.email,
        "given_name": user.given_name,
        "family_name": user.family_name,
        "preferred_username": user.preferred_username,
        "active": True if active is None else bool(plain(active)),
        "emails": sorted(user.emails),
        "groups": [{"id": g.id, "name": g.display_name} for g in user.groups],
        "updated_at": _time(user.updated_at),
        "detail": orjson.Fragment(struct_json_py(detail)),
    }


def group_record(organization_id: str, directory_id: str, group) -> dict:
    return {
        "group_id": group.id,
        "organization_id": organization_id,
        "directory_id": directory_id,
        "display_name": group.display_name,
        "total_users": group.total_users,
        "updated_at": _time(group.updated_at),
        "detail": orjson.Fragment(struct_json(group.group_detail)),
    }


_EPOCH = datetime(1970, 1, 1)


def _time(ts) -> datetime | None:
    """A protobuf Timestamp as a naive UTC datetime, nanoseconds truncated (as ``Timestamp.ToDatetime``); None when
    unset."""
    if not ts.seconds and not ts.nanos:
        return None
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def struct_json(struct: struct_pb2.Struct) -> str:
    """A protobuf Struct as compact JSON text, keys sorted."""
    if _records is not None:
        return _records.struct_json(struct.SerializeToString())
    return struct_json_py(struct)


def struct_json_py(struct: struct_pb2.Struct) -> str:
    return json.dumps(plain(struct), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def plain(value: Any) -> Any:
    """A protobuf Struct, ListValue or Value as plain Python."""
    if isinstance(value, struct_pb2.Value):
        return _value(value)
    if isinstance(value, struct_pb2.Struct):
        return _struct(value)
    if isinstance(value, struct_pb2.ListValue):
        return _list(value)
    return value


# Reading the map and the oneof directly costs about half of the Struct's dict-like helpers (items(), __getitem__),
# which wrap each value once more.
def _struct(struct: struct_pb2.Struct) -> dict:
    return {k: _value(v) for k, v in struct.fields.items()}


def _list(values: struct_pb2.ListValue) -> list:
    return [_value(v) for v in values.values]


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return _list(value.list_value)
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        number = value.number_value
        return number if math.isfinite(number) else None  # JSON has no NaN or infinity: the warehouse would refuse it
    return None  # null_value, or no kind set
