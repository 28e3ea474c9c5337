"""The emulator's directory data: organizations, directories, users, groups and memberships, and the queries the
gRPC services and the control API answer from it.

One ``DirectoryStore`` holds everything behind one lock: gRPC worker threads read, the control API and churn
mutate (see ``mutations.py``). Objects use ``__slots__`` and integer microsecond timestamps so that 100,000 users
cost little memory and time to create. Serialized protobufs are cached on each user and group by the gRPC layer
(``_pb*`` slots) and dropped here whenever the object changes (``touch``).

Ids carry Scalekit's prefixes (``org_``, ``dir_``, ``diruser_``, ``dirgroup_``) followed by one global,
increasing number, so creation order is id order: that number is the paging cursor.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Callable, Iterable, Iterator

# Scalekit's directory provider enum names (scalekit.v1.directories.DirectoryProvider).
PROVIDERS = ["OKTA", "MICROSOFT_AD", "GOOGLE", "JUMPCLOUD", "ONELOGIN", "PING_IDENTITY"]
PROVIDER_LABELS = {
    "OKTA": "Okta", "MICROSOFT_AD": "Entra ID", "GOOGLE": "Google Workspace", "JUMPCLOUD": "JumpCloud",
    "ONELOGIN": "OneLogin", "PING_IDENTITY": "PingIdentity", "AUTH0": "Auth0",
}


def now_us() -> int:
    return time.time_ns() // 1000


class Organization:
    __slots__ = ("id", "seq", "display_name", "external_id", "domain", "created_at", "updated_at", "directories",
                 "metadata", "slug", "logo_url", "features", "max_allowed_users")

    def __init__(self, id: str, seq: int, display_name: str, external_id: str, domain: str, created_at: int):
        self.id, self.seq, self.display_name, self.external_id = id, seq, display_name, external_id
        self.domain = domain
        self.created_at = self.updated_at = created_at
        self.directories: list[Directory] = []
        self.metadata: dict[str, str] = {}
        self.slug = self.logo_url = ""
        self.features: dict[str, bool] = {}  # organization settings: feature name -> enabled, in the order first set
        self.max_allowed_users: int | None = None  # user management settings; None: not set


class Directory:
    __slots__ = ("id", "seq", "organization_id", "name", "provider", "directory_type", "enabled",
                 "role_assignments", "created_at", "updated_at", "last_synced_at", "user_ids", "user_seqs",
                 "group_ids", "group_seqs", "user_updated_at", "group_updated_at")

    def __init__(self, id: str, seq: int, organization_id: str, provider: str, created_at: int):
        self.id, self.seq, self.organization_id, self.provider = id, seq, organization_id, provider
        self.name = f"{PROVIDER_LABELS.get(provider, provider)} SCIM"
        self.directory_type = "SCIM"
        self.enabled = True
        self.role_assignments: list[tuple[str, str]] = []  # (group_id, role_name)
        self.created_at = self.updated_at = self.last_synced_at = created_at
        # Live users and groups in creation (= cursor) order; the seq lists run parallel for bisect.
        self.user_ids: list[str] = []
        self.user_seqs: list[int] = []
        self.group_ids: list[str] = []
        self.group_seqs: list[int] = []
        self.user_updated_at = self.group_updated_at = created_at

    def roles_of_groups(self, group_ids: Iterable[str]) -> list[str]:
        wanted = set(group_ids)
        roles: list[str] = []
        for group_id, role in self.role_assignments:
            if group_id in wanted and role not in roles:
                roles.append(role)
        return roles


class User:
    """A directory user. Identity, name, emails, status and groups are set at creation; the rest of the SCIM
    profile (``PROFILE_FIELDS``) is derived on first use through the store's ``profile_maker``: most users of a
    large directory are never looked at in detail, and start-up should not pay for them."""

    __slots__ = ("id", "seq", "organization_id", "directory_id", "preferred_username", "given_name",
                 "family_name", "emails", "active", "department", "created_at", "updated_at", "groups", "profile",
                 "_pb", "_pb_detail")

    def __init__(self, id: str, seq: int, organization_id: str, directory_id: str):
        self.id, self.seq, self.organization_id, self.directory_id = id, seq, organization_id, directory_id
        self.groups: list[str] = []  # group ids, in the order the user joined them
        self.profile: dict[str, str] | None = None
        self._pb = self._pb_detail = None

    @property
    def email(self) -> str:
        return self.emails[0][0] if self.emails else ""

    @property
    def display_name(self) -> str:
        return f"{self.given_name} {self.family_name}".strip()

    def touch(self, at: int) -> None:
        """Record a change: newer ``updated_at`` (never going back), cached protobufs dropped."""
        self.updated_at = max(at, self.updated_at + 1)
        self._pb = self._pb_detail = None


PROFILE_FIELDS = ("dp_id", "title", "employee_number", "cost_center", "division", "organization", "phone_number",
                  "locale", "zoneinfo", "manager_id", "manager_name")


class Group:
    __slots__ = ("id", "seq", "organization_id", "directory_id", "display_name", "dp_id", "external_id",
                 "created_at", "updated_at", "members", "_pb", "_pb_detail")

    def __init__(self, id: str, seq: int, organization_id: str, directory_id: str, display_name: str):
        self.id, self.seq, self.organization_id, self.directory_id = id, seq, organization_id, directory_id
        self.display_name = display_name
        self.dp_id = self.external_id = ""
        self.created_at = self.updated_at = 0
        self.members: dict[str, None] = {}  # user ids, an insertion-ordered set
        self._pb = self._pb_detail = None

    def touch(self, at: int) -> None:
        self.updated_at = max(at, self.updated_at + 1)
        self._pb = self._pb_detail = None


class DirectoryStore:
    """Everything the emulator knows; hold ``lock`` to read consistently across several calls, always to write."""

    def __init__(self, environment_id: str, id_base: int):
        self.lock = threading.RLock()
        self.environment_id = environment_id
        self.organizations: dict[str, Organization] = {}
        self.directories: dict[str, Directory] = {}
        self.users: dict[str, User] = {}
        self.groups: dict[str, Group] = {}
        self.version = 0  # bumped on every committed change: keys the caches of filtered listings
        self._next_seq = id_base
        self._clock = 0
        self._filter_cache: dict[tuple, tuple[int, list[int], list[str]]] = {}
        self.profile_maker: Callable[[User], dict[str, str]] = lambda user: {f: "" for f in PROFILE_FIELDS}

    def profile(self, user: User) -> dict[str, str]:
        if user.profile is None:
            user.profile = self.profile_maker(user)
        return user.profile

    # --- ids and time -------------------------------------------------------------------------------------------

    def next_seq(self) -> int:
        self._next_seq += 1
        return self._next_seq

    def new_id(self, prefix: str) -> tuple[str, int]:
        seq = self.next_seq()
        return f"{prefix}_{seq}", seq

    def now(self) -> int:
        """Microseconds, strictly increasing within this store: two changes never share an ``occurred_at``."""
        self._clock = max(now_us(), self._clock + 1)
        return self._clock

    # --- building -----------------------------------------------------------------------------------------------

    def add_organization(self, org: Organization) -> None:
        self.organizations[org.id] = org

    def add_directory(self, directory: Directory) -> None:
        self.directories[directory.id] = directory
        self.organizations[directory.organization_id].directories.append(directory)

    def add_group(self, group: Group) -> None:
        self.groups[group.id] = group
        d = self.directories[group.directory_id]
        _insert_ordered(d.group_ids, d.group_seqs, group.id, group.seq)

    def add_user(self, user: User) -> None:
        self.users[user.id] = user
        d = self.directories[user.directory_id]
        _insert_ordered(d.user_ids, d.user_seqs, user.id, user.seq)
        for gid in user.groups:
            self.groups[gid].members[user.id] = None

    def remove_user(self, user: User) -> None:
        for gid in user.groups:
            self.groups[gid].members.pop(user.id, None)
        d = self.directories[user.directory_id]
        _remove_ordered(d.user_ids, d.user_seqs, user.seq)
        del self.users[user.id]

    def remove_group(self, group: Group) -> None:
        d = self.directories[group.directory_id]
        _remove_ordered(d.group_ids, d.group_seqs, group.seq)
        del self.groups[group.id]

    def remove_directory(self, directory: Directory) -> None:
        """Remove a directory with its users and groups (they go with it: nothing else refers to them)."""
        for uid in directory.user_ids:
            del self.users[uid]
        for gid in directory.group_ids:
            del self.groups[gid]
        self.organizations[directory.organization_id].directories.remove(directory)
        del self.directories[directory.id]

    def restore_directory(self, directory: Directory, users: list[User], groups: list[Group], position: int) -> None:
        """Undo ``remove_directory`` (the directory keeps its id lists; ``users`` and ``groups`` are its objects)."""
        self.directories[directory.id] = directory
        self.organizations[directory.organization_id].directories.insert(position, directory)
        self.users.update((u.id, u) for u in users)
        self.groups.update((g.id, g) for g in groups)

    def remove_organization(self, org: Organization) -> None:
        """Remove an organization with its directories, users and groups."""
        for d in list(org.directories):
            self.remove_directory(d)
        del self.organizations[org.id]

    def restore_organization(self, org: Organization) -> None:
        """Undo ``remove_organization``'s own step (restore its directories after it); the listing stays in creation
        order."""
        self.organizations[org.id] = org
        ordered = sorted(self.organizations.values(), key=lambda o: o.seq)
        self.organizations.clear()
        self.organizations.update((o.id, o) for o in ordered)

    def changed(self) -> None:
        self.version += 1
        self._filter_cache.clear()

    # --- queries ------------------------------------------------------------------------------------------------

    def roles_of(self, user: User) -> list[str]:
        return self.directories[user.directory_id].roles_of_groups(user.groups)

    def user_page(self, directory: Directory, after_seq: int, limit: int, group_id: str = "",
                  updated_after_us: int = 0) -> tuple[list[User], int, int]:
        """Up to ``limit`` live users of ``directory`` after the cursor, the total matching the filters, and the
        cursor of the next page (0 when this is the last)."""
        if group_id or updated_after_us:
            seqs, ids = self._filtered_users(directory, group_id, updated_after_us)
        else:
            seqs, ids = directory.user_seqs, directory.user_ids
        start = bisect.bisect_right(seqs, after_seq)
        chunk = ids[start:start + limit]
        users = [self.users[i] for i in chunk]
        more = start + limit < len(ids)
        return users, len(ids), (seqs[start + limit - 1] if more else 0)

    def group_page(self, directory: Directory, after_seq: int, limit: int,
                   updated_after_us: int = 0) -> tuple[list[Group], int, int]:
        seqs, ids = directory.group_seqs, directory.group_ids
        if updated_after_us:
            pairs = [(s, i) for s, i in zip(seqs, ids) if self.groups[i].updated_at > updated_after_us]
            seqs, ids = [p[0] for p in pairs], [p[1] for p in pairs]
        start = bisect.bisect_right(seqs, after_seq)
        chunk = ids[start:start + limit]
        more = start + limit < len(ids)
        return [self.groups[i] for i in chunk], len(ids), (seqs[start + limit - 1] if more else 0)

    def _filtered_users(self, directory: Directory, group_id: str,
                        updated_after_us: int) -> tuple[list[int], list[str]]:
        # A filtered listing is paged many times over; compute the matching cursor list once per data version.
        key = (directory.id, group_id, updated_after_us)
        cached = self._filter_cache.get(key)
        if cached and cached[0] == self.version:
            return cached[1], cached[2]
        if group_id:
            group = self.groups[group_id]
            candidates: Iterator[User] = iter(sorted((self.users[u] for u in group.members), key=lambda u: u.seq))
        else:
            candidates = (self.users[u] for u in directory.user_ids)
        seqs: list[int] = []
        ids: list[str] = []
        for u in candidates:
            if u.updated_at > updated_after_us:
                seqs.append(u.seq)
                ids.append(u.id)
        self._filter_cache[key] = (self.version, seqs, ids)
        return seqs, ids

    # --- the truth (control API) --------------------------------------------------------------------------------

    def truth(self, organization_id: str | None = None) -> dict:
        """The ``GET /_emulator/state`` document (docs/emulator.md): live users and groups only."""
        with self.lock:
            orgs = [self.organizations[organization_id]] if organization_id else list(self.organizations.values())
            return {"organizations": [self._org_truth(o) for o in orgs]}

    def _org_truth(self, org: Organization) -> dict:
        users: list[dict] = []
        groups: list[dict] = []
        for d in org.directories:
            for gid in d.group_ids:
                g = self.groups[gid]
                groups.append({"id": g.id, "directory_id": g.directory_id, "display_name": g.display_name})
            for uid in d.user_ids:
                u = self.users[uid]
                users.append({
                    "id": u.id, "directory_id": u.directory_id, "email": u.email, "given_name": u.given_name,
                    "family_name": u.family_name, "preferred_username": u.preferred_username, "active": u.active,
                    "groups": [{"id": gid, "name": self.groups[gid].display_name} for gid in u.groups],
                    "roles": [{"role_name": r} for r in d.roles_of_groups(u.groups)],
                })
        return {
            "id": org.id, "display_name": org.display_name, "external_id": org.external_id,
            "metadata": dict(org.metadata),
            "settings": {"features": [{"name": n, "enabled": e} for n, e in org.features.items()],
                         "max_allowed_users": org.max_allowed_users},
            "directories": [{
                "id": d.id, "name": d.name, "provider": d.provider, "directory_type": d.directory_type,
                "enabled": d.enabled,
                "role_assignments": [{"group_id": g, "role_name": r} for g, r in d.role_assignments],
            } for d in org.directories],
            "users": users,
            "groups": groups,
        }


def _insert_ordered(ids: list[str], seqs: list[int], id: str, seq: int) -> None:
    if not seqs or seq > seqs[-1]:
        ids.append(id)
        seqs.append(seq)
    else:
        i = bisect.bisect_left(seqs, seq)
        ids.insert(i, id)
        seqs.insert(i, seq)


def _remove_ordered(ids: list[str], seqs: list[int], seq: int) -> None:
    i = bisect.bisect_left(seqs, seq)
    if i < len(seqs) and seqs[i] == seq:
        del ids[i]
        del seqs[i]
