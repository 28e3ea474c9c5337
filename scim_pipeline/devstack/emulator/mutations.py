"""Directory changes (``POST /_emulator/mutations``, docs/emulator.md), applied to the store all-or-nothing, each producing the
webhook events Scalekit would send for it.

A batch runs under the store's lock with an undo log: every operation records how to restore what it touched
before touching it, so an invalid operation anywhere in the batch rolls back the ones before it and the caller
sees no change and no event at all. Events are built while applying, so each one describes the state right
after its own change.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from scim_pipeline.devstack.emulator import events as ev
from scim_pipeline.devstack.emulator.directory import (
    PROFILE_FIELDS,
    PROVIDER_LABELS,
    Directory,
    DirectoryStore,
    Group,
    Organization,
    User,
)

USER_FIELDS = ("email", "emails", "given_name", "family_name", "preferred_username", "active", "department",
               *PROFILE_FIELDS)
_USER_STATE = ("preferred_username", "given_name", "family_name", "emails", "active", "department", "created_at",
               "updated_at", "groups", "profile")
_GROUP_STATE = ("display_name", "updated_at", "members")

OPS = ("create_user", "update_user", "deactivate_user", "reactivate_user", "delete_user", "create_group",
       "rename_group", "delete_group", "add_member", "remove_member", "enable_directory", "disable_directory",
       "create_organization", "update_organization", "delete_organization", "create_directory", "delete_directory")

# Why an operation is refused, as the gRPC status the management API answers with (the control API answers 400).
INVALID, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS = (
    "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "ALREADY_EXISTS")

# Scalekit's limits on an organization (the SDK's CreateOrganization/UpdateOrganization validation rules).
DISPLAY_NAME_MAX = 200
METADATA_MAX_PAIRS, METADATA_KEY_LEN, METADATA_VALUE_LEN = 10, (3, 25), (1, 256)
SLUG_MAX, LOGO_URL_MAX = 253, 1024
SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")
ORGANIZATION_FIELDS = ("display_name", "external_id", "metadata", "slug", "logo_url")
DIRECTORY_TYPES = ("SCIM", "LDAP", "POLL")
DIRECTORY_PROVIDERS = tuple(PROVIDER_LABELS)


class MutationError(ValueError):
    """One invalid operation of a batch; its message names the operation (position and op). ``code`` says why, as a
    gRPC status name (``INVALID_ARGUMENT``, ``NOT_FOUND``, ...); ``reason`` is the message without the position."""

    def __init__(self, index: int, op: str, message: str, code: str = INVALID):
        super().__init__(f"mutation {index} ({op}): {message}")
        self.index, self.op, self.reason, self.code = index, op, message, code


@dataclass
class Applied:
    op: str
    id: str
    events: list[dict] = field(default_factory=list)

    def result(self) -> dict:
        return {"op": self.op, "id": self.id, "event_ids": [e["id"] for e in self.events]}


class _Invalid(Exception):
    def __init__(self, message: str, code: str = INVALID):
        super().__init__(message)
        self.code = code


class Mutator:
    """Applies batches to one store. ``new_user`` fills a user created without attributes (a realistic hire)."""

    def __init__(self, store: DirectoryStore, new_user: Callable[[User, int], None] | None = None):
        self.store = store
        self.new_user = new_user
        self._undo: list[Callable[[], None]] = []

    def apply(self, ops: Any) -> list[Applied]:
        if not isinstance(ops, list):
            raise MutationError(0, "?", "the body must be a JSON list of mutations")
        with self.store.lock:
            self._undo = []
            applied: list[Applied] = []
            try:
                for index, op in enumerate(ops):
                    name = op.get("op") if isinstance(op, dict) else None
                    if name not in OPS:
                        raise MutationError(index, str(name), f"unknown op; expected one of {', '.join(OPS)}")
                    try:
                        applied.append(getattr(self, "_" + name)(op))
                    except _Invalid as exc:
                        raise MutationError(index, name, str(exc), exc.code) from None
            except BaseException:
                for restore in reversed(self._undo):
                    restore()
                self.store.changed()
                raise
            finally:
                self._undo = []
            self.store.changed()
            return applied

    # --- lookups and undo -------------------------------------------------------------------------------------------

    def _user(self, op: dict) -> User:
        return _lookup(op, "user_id", "diruser_", self.store.users)

    def _group(self, op: dict) -> Group:
        return _lookup(op, "group_id", "dirgroup_", self.store.groups)

    def _directory_for(self, op: dict, attrs: dict | None = None) -> Directory:
        org_id = _str(op, "organization_id")
        org = self.store.organizations.get(org_id)
        if org is None:
            raise _Invalid(f"unknown organization_id {org_id!r}", NOT_FOUND)
        dir_id = op.get("directory_id") or (attrs or {}).get("directory_id")
        if dir_id is None:
            if not org.directories:
                raise _Invalid("the organization has no directory")
            return org.directories[0]
        d = self.store.directories.get(dir_id)
        if d is None or d.organization_id != org_id:
            raise _Invalid(f"unknown directory_id {dir_id!r} in this organization", NOT_FOUND)
        return d

    def _save_user(self, user: User) -> None:
        state = {s: copy.copy(getattr(user, s)) for s in _USER_STATE}

        def restore():
            for k, v in state.items():
                setattr(user, k, v)
            user._pb = user._pb_detail = None
        self._undo.append(restore)

    def _save_group(self, group: Group) -> None:
        state = {s: copy.copy(getattr(group, s)) for s in _GROUP_STATE}

        def restore():
            for k, v in state.items():
                setattr(group, k, v)
            group._pb = group._pb_detail = None
        self._undo.append(restore)

    def _save_directory(self, d: Directory) -> None:
        state = (d.enabled, d.updated_at, list(d.role_assignments), d.user_updated_at, d.group_updated_at)

        def restore():
            d.enabled, d.updated_at, d.role_assignments, d.user_updated_at, d.group_updated_at = (
                state[0], state[1], state[2], state[3], state[4])
        self._undo.append(restore)

    def _user_event(self, kind: str, user: User, at: int) -> dict:
        data = ev.user_deleted_data(self.store, user) if kind == ev.USER_DELETED else ev.user_data(self.store, user)
        return ev.envelope(self.store, kind, user.organization_id, data, at)

    def _group_event(self, kind: str, group: Group, at: int) -> dict:
        data = ev.group_data(group, deleted=kind == ev.GROUP_DELETED)
        return ev.envelope(self.store, kind, group.organization_id, data, at)

    def _set_attributes(self, user: User, attrs: dict) -> None:
        unknown = sorted(set(attrs) - set(USER_FIELDS) - {"directory_id"})
        if unknown:
            raise _Invalid(f"unknown user attribute(s) {', '.join(unknown)}; known: {', '.join(USER_FIELDS)}")
        for key, value in attrs.items():
            if key == "directory_id":
                continue
            if key == "active":
                if not isinstance(value, bool):
                    raise _Invalid("active must be true or false")
                user.active = value
            elif key == "emails":
                if not isinstance(value, list) or not value or not all(isinstance(v, str) and "@" in v for v in value):
                    raise _Invalid("emails must be a non-empty list of email addresses")
                user.emails = [(v, "work" if i == 0 else "other") for i, v in enumerate(value)]
            elif not isinstance(value, str):
                raise _Invalid(f"{key} must be a string")
            elif key == "email":
                if "@" not in value:
                    raise _Invalid(f"email {value!r} is not an email address")
                rest = [(v, t) for v, t in (user.emails or []) if v != value]
                if rest and rest[0][1] == "work":
                    rest = rest[1:]  # the old primary address is replaced, the other addresses stay
                user.emails = [(value, "work"), *rest]
            elif key in PROFILE_FIELDS:
                profile = dict(self.store.profile(user))
                profile[key] = value
                user.profile = profile
            else:
                setattr(user, key, value)

    def _touch_stats(self, d: Directory, at: int, users: bool = False, groups: bool = False) -> None:
        if users:
            d.user_updated_at = max(d.user_updated_at, at)
        if groups:
            d.group_updated_at = max(d.group_updated_at, at)

    # --- users ------------------------------------------------------------------------------------------------------

    def _create_user(self, op: dict) -> Applied:
        attrs = op.get("user", {})
        if not isinstance(attrs, dict):
            raise _Invalid("user must be an object of attributes")
        d = self._directory_for(op, attrs)
        group_ids = op.get("groups", [])
        if not isinstance(group_ids, list):
            raise _Invalid("groups must be a list of group ids")
        groups = []
        for gid in group_ids:
            g = self.store.groups.get(gid) if isinstance(gid, str) else None
            if g is None or g.directory_id != d.id:
                raise _Invalid(f"unknown group {gid!r} in directory {d.id}")
            if g not in groups:
                groups.append(g)
        store = self.store
        at = store.now()
        uid, seq = store.new_id("diruser")
        user = User(uid, seq, d.organization_id, d.id)
        if self.new_user is not None:
            self.new_user(user, at)
        else:
            user.preferred_username = user.given_name = user.family_name = user.department = ""
            user.emails, user.active = [], True
        user.created_at = user.updated_at = at
        if attrs.get("email") or attrs.get("emails"):
            user.emails = []  # the given addresses replace the generated ones, not join them
        elif not user.emails:
            raise _Invalid("user.email is required")
        self._set_attributes(user, attrs)
        if "preferred_username" not in attrs and ("email" in attrs or not user.preferred_username):
            user.preferred_username = user.email
        user.groups = [g.id for g in groups]
        if "department" not in attrs and groups:
            user.department = groups[0].display_name
        self._save_directory(d)
        for g in groups:
            self._save_group(g)
            g._pb = g._pb_detail = None
        store.add_user(user)
        self._undo.append(lambda: store.remove_user(user))
        self._touch_stats(d, at, users=True)
        return Applied("create_user", uid, [self._user_event(ev.USER_CREATED, user, at)])

    def _update_user(self, op: dict) -> Applied:
        user = self._user(op)
        changes = op.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise _Invalid("changes must be a non-empty object of attributes")
        if "directory_id" in changes:
            raise _Invalid("directory_id cannot be changed")
        self._save_user(user)
        self._set_attributes(user, changes)
        return self._user_changed("update_user", user)

    def _user_changed(self, op: str, user: User) -> Applied:
        at = self.store.now()
        user.touch(at)
        d = self.store.directories[user.directory_id]
        self._save_directory(d)
        self._touch_stats(d, at, users=True)
        return Applied(op, user.id, [self._user_event(ev.USER_UPDATED, user, at)])

    def _set_active(self, op: dict, name: str, active: bool) -> Applied:
        user = self._user(op)
        if user.active == active:
            return Applied(name, user.id)  # already so: nothing changes, nothing is sent
        self._save_user(user)
        user.active = active
        return self._user_changed(name, user)

    def _deactivate_user(self, op: dict) -> Applied:
        return self._set_active(op, "deactivate_user", False)

    def _reactivate_user(self, op: dict) -> Applied:
        return self._set_active(op, "reactivate_user", True)

    def _delete_user(self, op: dict) -> Applied:
        user = self._user(op)
        store = self.store
        at = store.now()
        event = self._user_event(ev.USER_DELETED, user, at)
        for gid in user.groups:
            self._save_group(store.groups[gid])
            store.groups[gid]._pb = store.groups[gid]._pb_detail = None
        d = store.directories[user.directory_id]
        self._save_directory(d)
        store.remove_user(user)
        self._undo.append(lambda: store.add_user(user))
        self._touch_stats(d, at, users=True)
        return Applied("delete_user", user.id, [event])

    # --- groups -----------------------------------------------------------------------------------------------------

    def _display_name(self, op: dict, d: Directory, exclude: Group | None = None) -> str:
        name = _str(op, "display_name").strip()
        if not name:
            raise _Invalid("display_name must not be empty")
        for gid in d.group_ids:
            g = self.store.groups[gid]
            if g is not exclude and g.display_name.lower() == name.lower():
                raise _Invalid(f"a group named {name!r} already exists in directory {d.id}")
        return name

    def _create_group(self, op: dict) -> Applied:
        d = self._directory_for(op)
        name = self._display_name(op, d)
        store = self.store
        at = store.now()
        gid, seq = store.new_id("dirgroup")
        g = Group(gid, seq, d.organization_id, d.id, name)
        g.dp_id = g.external_id = f"grp-{seq}"
        g.created_at = g.updated_at = at
        self._save_directory(d)
        store.add_group(g)
        self._undo.append(lambda: store.remove_group(g))
        self._touch_stats(d, at, groups=True)
        return Applied("create_group", gid, [self._group_event(ev.GROUP_CREATED, g, at)])

    def _rename_group(self, op: dict) -> Applied:
        g = self._group(op)
        d = self.store.directories[g.directory_id]
        name = self._display_name(op, d, exclude=g)
        self._save_group(g)
        self._save_directory(d)
        at = self.store.now()
        g.display_name = name
        g.touch(at)
        for uid in g.members:  # their listing entries carry the group's name
            u = self.store.users[uid]
            u._pb = u._pb_detail = None
        self._touch_stats(d, at, groups=True)
        return Applied("rename_group", g.id, [self._group_event(ev.GROUP_UPDATED, g, at)])

    def _delete_group(self, op: dict) -> Applied:
        g = self._group(op)
        store = self.store
        d = store.directories[g.directory_id]
        self._save_group(g)
        self._save_directory(d)
        at = store.now()
        events = [self._group_event(ev.GROUP_DELETED, g, at)]
        # Scalekit follows a group's deletion with user_updated for every member, whose groups (and maybe roles) change.
        for uid in list(g.members):
            u = store.users[uid]
            self._save_user(u)
            u.groups = [x for x in u.groups if x != g.id]
            u.touch(store.now())
            events.append(self._user_event(ev.USER_UPDATED, u, u.updated_at))
        g.members = {}
        d.role_assignments = [(gid, r) for gid, r in d.role_assignments if gid != g.id]
        store.remove_group(g)
        self._undo.append(lambda: store.add_group(g))
        self._touch_stats(d, store.now(), users=bool(events[1:]), groups=True)
        return Applied("delete_group", g.id, events)

    def _membership(self, op: dict, name: str, add: bool) -> Applied:
        g = self._group(op)
        u = self._user(op)
        if u.directory_id != g.directory_id:
            raise _Invalid(f"user {u.id} and group {g.id} are in different directories")
        if (g.id in u.groups) == add:
            return Applied(name, u.id)  # already so
        self._save_user(u)
        self._save_group(g)
        if add:
            u.groups = [*u.groups, g.id]
            g.members[u.id] = None
        else:
            u.groups = [x for x in u.groups if x != g.id]
            g.members.pop(u.id, None)
        g._pb = g._pb_detail = None
        return self._user_changed(name, u)

    def _add_member(self, op: dict) -> Applied:
        return self._membership(op, "add_member", True)

    def _remove_member(self, op: dict) -> Applied:
        return self._membership(op, "remove_member", False)

    # --- directories ------------------------------------------------------------------------------------------------

    def _directory_named(self, op: dict) -> Directory:
        """The directory ``directory_id`` names; with ``organization_id`` too, it must be that organization's."""
        dir_id = _str(op, "directory_id")
        d = self.store.directories.get(dir_id)
        org_id = op.get("organization_id")
        if org_id is not None:
            if _str(op, "organization_id") not in self.store.organizations:
                raise _Invalid(f"unknown organization_id {org_id!r}", NOT_FOUND)
            if d is not None and d.organization_id != org_id:
                d = None
        if d is None:
            raise _Invalid(f"unknown directory_id {dir_id!r}", NOT_FOUND)
        return d

    def _toggle(self, op: dict, name: str, enabled: bool) -> Applied:
        d = self._directory_named(op)
        if d.enabled == enabled:
            return Applied(name, d.id)
        self._save_directory(d)
        at = self.store.now()
        d.enabled, d.updated_at = enabled, at
        kind = ev.DIRECTORY_ENABLED if enabled else ev.DIRECTORY_DISABLED
        return Applied(name, d.id, [ev.envelope(self.store, kind, d.organization_id, ev.directory_data(d), at)])

    def _enable_directory(self, op: dict) -> Applied:
        return self._toggle(op, "enable_directory", True)

    def _disable_directory(self, op: dict) -> Applied:
        return self._toggle(op, "disable_directory", False)

    def _create_directory(self, op: dict) -> Applied:
        org_id = _str(op, "organization_id")
        org = self.store.organizations.get(org_id)
        if org is None:
            raise _Invalid(f"unknown organization_id {org_id!r}", NOT_FOUND)
        provider = _choice(op, "provider", DIRECTORY_PROVIDERS, "OKTA")
        directory_type = _choice(op, "directory_type", DIRECTORY_TYPES, "SCIM")
        enabled = op.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _Invalid("enabled must be true or false")
        store = self.store
        at = store.now()
        dir_id, seq = store.new_id("dir")
        d = Directory(dir_id, seq, org_id, provider, at)
        d.directory_type, d.enabled = directory_type, enabled
        d.name = f"{PROVIDER_LABELS[provider]} {directory_type}"
        store.add_directory(d)
        self._undo.append(lambda: store.remove_directory(d))
        return Applied("create_directory", dir_id)  # Scalekit documents no webhook for a new directory

    def _delete_directory(self, op: dict) -> Applied:
        d = self._directory_named(op)
        if d.enabled:
            raise _Invalid(f"directory {d.id} is enabled: disable it before deleting it", FAILED_PRECONDITION)
        self._remove_directory(d)
        return Applied("delete_directory", d.id)

    def _remove_directory(self, d: Directory) -> None:
        store = self.store
        users = [store.users[u] for u in d.user_ids]
        groups = [store.groups[g] for g in d.group_ids]
        position = store.organizations[d.organization_id].directories.index(d)
        store.remove_directory(d)
        self._undo.append(lambda: store.restore_directory(d, users, groups, position))

    # --- organizations ----------------------------------------------------------------------------------------------

    def _create_organization(self, op: dict) -> Applied:
        fields = _organization_fields(op, "organization")
        if not fields.get("display_name"):
            raise _Invalid("organization.display_name is required")
        store = self.store
        self._check_unique(fields, None)
        at = store.now()
        org_id, seq = store.new_id("org")
        org = Organization(org_id, seq, fields["display_name"], fields.get("external_id", ""),
                           _domain(fields["display_name"], seq), at)
        org.metadata = fields.get("metadata", {})
        org.slug, org.logo_url = fields.get("slug", ""), fields.get("logo_url", "")
        store.add_organization(org)
        self._undo.append(lambda: store.organizations.pop(org_id, None))
        return Applied("create_organization", org_id)  # no webhook: Scalekit's directory events have none

    def _update_organization(self, op: dict) -> Applied:
        org = self._organization(op)
        fields = _organization_fields(op, "changes")
        if not fields:
            raise _Invalid(f"changes must set at least one of {', '.join(ORGANIZATION_FIELDS)}")
        if "display_name" in fields and not fields["display_name"]:
            raise _Invalid("display_name must not be empty")
        self._check_unique(fields, org)
        state = {k: copy.copy(getattr(org, k)) for k in (*ORGANIZATION_FIELDS, "updated_at")}

        def restore():
            for k, v in state.items():
                setattr(org, k, v)
        self._undo.append(restore)
        for key, value in fields.items():
            setattr(org, key, value)
        org.updated_at = self.store.now()
        return Applied("update_organization", org.id)

    def _delete_organization(self, op: dict) -> Applied:
        """Deletes the organization with its directories, users and groups, enabled or not, and emits nothing:
        Scalekit documents no webhook for it, so a consumer learns it from the listings."""
        org = self._organization(op)
        store = self.store
        for d in reversed(list(org.directories)):
            self._remove_directory(d)
        del store.organizations[org.id]
        self._undo.append(lambda: store.restore_organization(org))
        return Applied("delete_organization", org.id)

    def _organization(self, op: dict) -> Organization:
        """The organization ``organization_id`` names, or ``external_id`` when no id is given."""
        if op.get("organization_id") is None and op.get("external_id") is not None:
            external_id = _str(op, "external_id")
            org = next((o for o in self.store.organizations.values() if o.external_id == external_id), None)
            if org is None:
                raise _Invalid(f"unknown external_id {external_id!r}", NOT_FOUND)
            return org
        return _lookup(op, "organization_id", "org_", self.store.organizations)

    def _check_unique(self, fields: dict, this: Organization | None) -> None:
        """external_id and slug name one organization of the environment at most."""
        for key in ("external_id", "slug"):
            value = fields.get(key)
            if value and any(o is not this and getattr(o, key) == value for o in self.store.organizations.values()):
                raise _Invalid(f"an organization with {key} {value!r} already exists", ALREADY_EXISTS)


def _lookup(op: dict, key: str, prefix: str, table: dict):
    """The entity an op names by ``key``: the id must carry Scalekit's prefix and exist."""
    value = _str(op, key)
    if not value.startswith(prefix):
        raise _Invalid(f"{key} must start with '{prefix}', got {value!r}")
    found = table.get(value)
    if found is None:
        raise _Invalid(f"unknown {key} {value!r}", NOT_FOUND)
    return found


def _choice(op: dict, key: str, allowed: tuple[str, ...], default: str) -> str:
    value = op.get(key, default)
    if value not in allowed:
        raise _Invalid(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _organization_fields(op: dict, key: str) -> dict:
    """The organization attributes in ``op[key]``, checked against Scalekit's rules (the SDK's validation)."""
    fields = op.get(key)
    if not isinstance(fields, dict):
        raise _Invalid(f"{key} must be an object with {', '.join(ORGANIZATION_FIELDS)}")
    unknown = sorted(set(fields) - set(ORGANIZATION_FIELDS))
    if unknown:
        raise _Invalid(f"unknown organization attribute(s) {', '.join(unknown)}; "
                       f"known: {', '.join(ORGANIZATION_FIELDS)}")
    for name in ("display_name", "external_id", "slug", "logo_url"):
        if name in fields and not isinstance(fields[name], str):
            raise _Invalid(f"{name} must be a string")
    if len(fields.get("display_name", "")) > DISPLAY_NAME_MAX:
        raise _Invalid(f"display_name must be at most {DISPLAY_NAME_MAX} characters")
    if fields.get("slug") and (len(fields["slug"]) > SLUG_MAX or not SLUG_RE.match(fields["slug"])):
        raise _Invalid("slug must be lowercase letters, digits, hyphens and dots (a DNS name), at most 253 characters")
    if len(fields.get("logo_url", "")) > LOGO_URL_MAX:
        raise _Invalid(f"logo_url must be at most {LOGO_URL_MAX} characters")
    if "metadata" in fields:
        metadata = fields["metadata"]
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise _Invalid("metadata must be an object of strings")
        if len(metadata) > METADATA_MAX_PAIRS:
            raise _Invalid(f"metadata must have at most {METADATA_MAX_PAIRS} entries")
        for k, v in metadata.items():
            if not METADATA_KEY_LEN[0] <= len(k) <= METADATA_KEY_LEN[1]:
                raise _Invalid(f"metadata key {k!r} must be {METADATA_KEY_LEN[0]} to {METADATA_KEY_LEN[1]} characters")
            if not METADATA_VALUE_LEN[0] <= len(v) <= METADATA_VALUE_LEN[1]:
                raise _Invalid(f"metadata value of {k!r} must be {METADATA_VALUE_LEN[0]} to "
                               f"{METADATA_VALUE_LEN[1]} characters")
        fields = {**fields, "metadata": dict(metadata)}
    return fields


def _domain(display_name: str, seq: int) -> str:
    """The email domain of a new organization's generated users, e.g. ``acme4182.example.com``."""
    word = re.sub(r"[^a-z0-9]+", "", display_name.split(",")[0].split(" ")[0].lower()) or "company"
    return f"{word}{seq % 10_000}.example.com"


def _str(op: dict, key: str) -> str:
    value = op.get(key)
    if not isinstance(value, str) or not value:
        raise _Invalid(f"{key} is required (a string)")
    return value
