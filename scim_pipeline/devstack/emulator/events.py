"""Scalekit's directory webhook events: the envelope and the ``data`` of each type, as documented in Scalekit's
developer docs (``_directory-events.mdx``), plus the SCIM user resource that Scalekit keeps as the user's detail.

Every builder is a pure function of the store's objects at the moment of the change, so an event describes the
state it announces even if it is delivered late.
"""

from __future__ import annotations

import time
import zlib

from scim_pipeline.devstack.emulator.directory import Directory, DirectoryStore, Group, User

# The event types are Scalekit's names, defined once where the pipeline reads them.
from scim_pipeline.warehouse.webhook_envelope import (  # noqa: F401 (re-exported: ev.USER_CREATED, ...)
    DIRECTORY_DISABLED,
    DIRECTORY_ENABLED,
    GROUP_CREATED,
    GROUP_DELETED,
    GROUP_UPDATED,
    USER_CREATED,
    USER_DELETED,
    USER_UPDATED,
)

SCIM_USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
SCIM_ENTERPRISE_SCHEMA = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
SCIM_GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"



def rfc3339(us: int, nanos: int = 0) -> str:
    """RFC 3339 UTC, e.g. ``2025-01-06T18:44:25.153954Z``; with ``nanos`` (0-999 beyond the microsecond) to the
    nanosecond, as Scalekit writes an event's ``occurred_at``: ``2024-09-25T02:26:39.036398577Z``."""
    seconds, micros = divmod(us, 1_000_000)
    fraction = f"{micros:06d}{nanos:03d}" if nanos else f"{micros:06d}"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction}Z"


def rfc3339_nanos(us: int, salt: str) -> str:
    """A nanosecond time for ``us``: the sub-microsecond digits come from ``salt`` (an id), so they are
    deterministic, never all zero, and the store's strictly increasing microseconds keep their order."""
    return rfc3339(us, 1 + zlib.crc32(salt.encode()) % 999)


def scim_user(store: DirectoryStore, user: User) -> dict:
    """The SCIM 2.0 user resource (core + enterprise extension) as the directory provider sent it."""
    p = store.profile(user)
    enterprise: dict = {
        "employeeNumber": p["employee_number"], "costCenter": p["cost_center"], "organization": p["organization"],
        "division": p["division"], "department": user.department,
    }
    if p["manager_id"]:
        enterprise["manager"] = {"value": p["manager_id"], "displayName": p["manager_name"]}
    return {
        "schemas": [SCIM_USER_SCHEMA, SCIM_ENTERPRISE_SCHEMA],
        "id": p["dp_id"],
        "externalId": p["dp_id"],
        "userName": user.preferred_username,
        "name": {"givenName": user.given_name, "familyName": user.family_name, "formatted": user.display_name},
        "displayName": user.display_name,
        "emails": [{"value": v, "type": t, "primary": i == 0} for i, (v, t) in enumerate(user.emails)],
        "phoneNumbers": [{"value": p["phone_number"], "type": "work"}] if p["phone_number"] else [],
        "active": user.active,
        "title": p["title"],
        "locale": p["locale"],
        "timezone": p["zoneinfo"],
        SCIM_ENTERPRISE_SCHEMA: enterprise,
        "meta": {"resourceType": "User", "created": rfc3339(user.created_at), "lastModified": rfc3339(user.updated_at)},
    }


def scim_group(group: Group) -> dict:
    return {
        "schemas": [SCIM_GROUP_SCHEMA],
        "id": group.dp_id,
        "externalId": group.external_id,
        "displayName": group.display_name,
        "meta": {"resourceType": "Group", "created": rfc3339(group.created_at),
                 "lastModified": rfc3339(group.updated_at)},
    }


# The ``data`` of each event type has exactly the fields of Scalekit's documented payloads (the OpenAPI schemas
# DirectoryUserEventData, DirectoryGroupEventData, DirectoryEventData and their examples; docs/emulator.md): no
# ``directory_id``, ``emails`` or ``updated_at`` on a user, ``raw_attributes`` empty as in every documented example.


def user_data(store: DirectoryStore, user: User) -> dict:
    """``data`` of user_created/user_updated: the user's profile, groups (with names) and the roles of the
    directory's group-to-role assignments."""
    p = store.profile(user)
    return {
        "id": user.id,
        "organization_id": user.organization_id,
        "dp_id": p["dp_id"],
        "preferred_username": user.preferred_username,
        "email": user.email,
        "active": user.active,
        "name": user.display_name,
        "given_name": user.given_name,
        "family_name": user.family_name,
        "nickname": user.given_name,
        "title": p["title"],
        "department": user.department,
        "division": p["division"],
        "cost_center": p["cost_center"],
        "employee_id": p["employee_number"],
        "organization": p["organization"],
        "user_type": "Employee",
        "phone_number": p["phone_number"],
        "language": p["locale"].split("-")[0],
        "locale": p["locale"],
        "zoneinfo": p["zoneinfo"],
        "profile": "",
        "groups": [{"id": gid, "name": store.groups[gid].display_name} for gid in user.groups],
        "roles": [{"role_name": r} for r in store.roles_of(user)],
        "custom_attributes": ({"manager_id": p["manager_id"], "manager_name": p["manager_name"]}
                              if p["manager_id"] else {}),
        "raw_attributes": {},
    }


def user_deleted_data(store: DirectoryStore, user: User) -> dict:
    return {
        "id": user.id,
        "organization_id": user.organization_id,
        "dp_id": store.profile(user)["dp_id"],
        "email": user.email,
    }


def group_data(group: Group, deleted: bool = False) -> dict:
    """``data`` of the group events: created and updated carry ``external_id`` (null when the provider sent none),
    deleted carries ``dp_id`` instead, as in Scalekit's documented payloads."""
    data = {
        "id": group.id,
        "organization_id": group.organization_id,
        "directory_id": group.directory_id,
        "display_name": group.display_name,
    }
    if deleted:
        data["dp_id"] = group.dp_id
    else:
        data["external_id"] = group.external_id or None
    data["raw_attributes"] = {}
    return data


def directory_data(directory: Directory) -> dict:
    return {
        "id": directory.id,
        "organization_id": directory.organization_id,
        "directory_type": directory.directory_type,
        "provider": directory.provider,
        "enabled": directory.enabled,
        "updated_at": rfc3339_nanos(directory.updated_at, directory.id),
    }


OBJECT_OF = {
    USER_CREATED: "DirectoryUser", USER_UPDATED: "DirectoryUser", USER_DELETED: "DirectoryUser",
    GROUP_CREATED: "DirectoryGroup", GROUP_UPDATED: "DirectoryGroup", GROUP_DELETED: "DirectoryGroup",
    DIRECTORY_ENABLED: "Directory", DIRECTORY_DISABLED: "Directory",
}


# The envelope's ``display_name``, as Scalekit's documented examples have it.
DISPLAY_NAME = {
    USER_CREATED: "Directory User Created", USER_UPDATED: "Directory User Updated",
    USER_DELETED: "Directory User Deleted", GROUP_CREATED: "Directory Group Created",
    GROUP_UPDATED: "Directory Group Updated", GROUP_DELETED: "Directory Group Deleted",
    DIRECTORY_ENABLED: "Directory Enabled", DIRECTORY_DISABLED: "Directory Disabled",
}


def envelope(store: DirectoryStore, event_type: str, organization_id: str, data: dict, occurred_at: int) -> dict:
    event_id, _ = store.new_id("evt")
    return {
        "spec_version": "1",
        "id": event_id,
        "type": event_type,
        "occurred_at": rfc3339_nanos(occurred_at, event_id),
        "environment_id": store.environment_id,
        "organization_id": organization_id,
        "object": OBJECT_OF[event_type],
        "data": data,
        "display_name": DISPLAY_NAME[event_type],
    }
