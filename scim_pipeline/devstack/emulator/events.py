"""Scalekit's directory webhook events: the envelope and the ``data`` of each type, as documented in Scalekit's
developer docs (``_directory-events.mdx``), plus the SCIM user resource that Scalekit keeps as the user's detail.

Every builder is a pure function of the store's objects at the moment of the change, so an event describes the
state it announces even if it is delivered late.
"""

from __future__ import annotations

import time

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



def rfc3339(us: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. ``2025-01-06T18:44:25.153954Z``."""
    seconds, micros = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


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


def user_data(store: DirectoryStore, user: User) -> dict:
    """``data`` of user_created/user_updated: everything a consumer needs to apply the event without an API call
    (status, groups with names, roles from the directory's group-to-role assignments)."""
    p = store.profile(user)
    return {
        "id": user.id,
        "organization_id": user.organization_id,
        "directory_id": user.directory_id,
        "dp_id": p["dp_id"],
        "preferred_username": user.preferred_username,
        "email": user.email,
        "emails": [v for v, _ in user.emails],
        "active": user.active,
        "name": user.display_name,
        "given_name": user.given_name,
        "family_name": user.family_name,
        "title": p["title"],
        "department": user.department,
        "division": p["division"],
        "cost_center": p["cost_center"],
        "employee_id": p["employee_number"],
        "organization": p["organization"],
        "phone_number": p["phone_number"],
        "locale": p["locale"],
        "zoneinfo": p["zoneinfo"],
        "groups": [{"id": gid, "name": store.groups[gid].display_name} for gid in user.groups],
        "roles": [{"role_name": r} for r in store.roles_of(user)],
        "custom_attributes": ({"manager_id": p["manager_id"], "manager_name": p["manager_name"]}
                              if p["manager_id"] else {}),
        "raw_attributes": scim_user(store, user),
        "updated_at": rfc3339(user.updated_at),
    }


def user_deleted_data(store: DirectoryStore, user: User) -> dict:
    return {
        "id": user.id,
        "organization_id": user.organization_id,
        "directory_id": user.directory_id,
        "dp_id": store.profile(user)["dp_id"],
        "email": user.email,
    }


def group_data(group: Group) -> dict:
    return {
        "id": group.id,
        "organization_id": group.organization_id,
        "directory_id": group.directory_id,
        "display_name": group.display_name,
        "external_id": group.external_id or None,
        "dp_id": group.dp_id,
        "raw_attributes": scim_group(group),
        "updated_at": rfc3339(group.updated_at),
    }


def directory_data(directory: Directory) -> dict:
    return {
        "id": directory.id,
        "organization_id": directory.organization_id,
        "directory_type": directory.directory_type,
        "provider": directory.provider,
        "enabled": directory.enabled,
        "status": "COMPLETED",
        "last_sync_at": rfc3339(directory.last_synced_at),
        "updated_at": rfc3339(directory.updated_at),
    }


OBJECT_OF = {
    USER_CREATED: "DirectoryUser", USER_UPDATED: "DirectoryUser", USER_DELETED: "DirectoryUser",
    GROUP_CREATED: "DirectoryGroup", GROUP_UPDATED: "DirectoryGroup", GROUP_DELETED: "DirectoryGroup",
    DIRECTORY_ENABLED: "Directory", DIRECTORY_DISABLED: "Directory",
}


def envelope(store: DirectoryStore, event_type: str, organization_id: str, data: dict, occurred_at: int) -> dict:
    event_id, _ = store.new_id("evt")
    return {
        "spec_version": "1",
        "id": event_id,
        "type": event_type,
        "occurred_at": rfc3339(occurred_at),
        "environment_id": store.environment_id,
        "organization_id": organization_id,
        "object": OBJECT_OF[event_type],
        "data": data,
    }
