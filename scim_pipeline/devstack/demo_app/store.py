"""The demo application's state: users, memberships and roles in SQLite, and how a batch of changes applies to it.

The semantics are chosen so that a sender that loses acknowledgements still converges: creates upsert, removals of
what is already gone are applied no-ops, and every ``change_id`` is applied at most once (a repeat answers
``applied`` without touching the state). A batch applies in one transaction together with the record of its answer,
so an answer that never reached the sender can be replayed from its ``Idempotency-Key``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    organization_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    email TEXT,
    given_name TEXT,
    family_name TEXT,
    preferred_username TEXT,
    active INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (organization_id, user_id)
);
CREATE TABLE IF NOT EXISTS memberships (
    organization_id TEXT NOT NULL,
    group_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    group_name TEXT,
    PRIMARY KEY (organization_id, group_id, user_id)
);
CREATE INDEX IF NOT EXISTS memberships_by_user ON memberships (organization_id, user_id);
CREATE TABLE IF NOT EXISTS roles (
    organization_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    role_name TEXT NOT NULL,
    PRIMARY KEY (organization_id, user_id, role_name)
);
-- One row per change_id ever applied; ``applications`` counts how often its effect was written (the proof that
-- nothing is applied twice: it must never exceed 1).
CREATE TABLE IF NOT EXISTS applied_changes (
    change_id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    applications INTEGER NOT NULL,
    applied_at REAL NOT NULL
);
-- The answer given to each Idempotency-Key, replayed verbatim when the same key comes again.
CREATE TABLE IF NOT EXISTS idempotency (
    idempotency_key TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

USER_ATTRIBUTES = ("email", "given_name", "family_name", "preferred_username")
USER_OPS = ("create", "update", "deactivate", "reactivate", "delete")
MEMBERSHIP_OPS = ("add", "remove")
ROLE_OPS = ("grant", "revoke")


class Rejected(Exception):
    """A change that cannot apply; its message becomes the change's ``error``."""


class IdempotencyConflict(Exception):
    """An Idempotency-Key reused for a different batch."""


@dataclass(frozen=True)
class Batch:
    batch_id: str
    organization_id: str
    changes: list[dict[str, Any]]

    def fingerprint(self) -> str:
        """What makes two requests "the same batch": organization and changes, in any order."""
        canonical = json.dumps(
            [self.organization_id, sorted(self.changes, key=lambda c: str(c.get("change_id")))],
            sort_keys=True, separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_batch(payload: Any) -> Batch:
    """Check the request's shape; raises ValueError naming what is wrong. Per-change content (entity, op, data) is
    checked later, change by change, so that one bad change does not block the others."""
    if not isinstance(payload, dict):
        raise ValueError("body must be a JSON object")
    batch_id, org, changes = payload.get("batch_id"), payload.get("organization_id"), payload.get("changes")
    if not isinstance(batch_id, str) or not batch_id:
        raise ValueError("batch_id must be a non-empty string")
    if not isinstance(org, str) or not org:
        raise ValueError("organization_id must be a non-empty string")
    if not isinstance(changes, list):
        raise ValueError("changes must be a list")
    for i, change in enumerate(changes):
        if not isinstance(change, dict):
            raise ValueError(f"changes[{i}] must be an object")
        if not isinstance(change.get("change_id"), str) or not change["change_id"]:
            raise ValueError(f"changes[{i}].change_id must be a non-empty string")
    return Batch(batch_id, org, changes)


class Store:
    """The application's database. One connection, serialized by a lock: batches apply one at a time.

    A stored answer is replayed for ``idempotency_ttl_s`` (a day, as payment APIs do); after that the same key is a
    new request, so a batch whose changes were once rejected can be judged afresh.
    """

    def __init__(self, path: Path, idempotency_ttl_s: float = 24 * 3600):
        self.path = path
        self.idempotency_ttl_s = idempotency_ttl_s
        self._lock = threading.Lock()
        # Autocommit mode so that transactions are exactly the explicit BEGIN ... COMMIT below.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ------------------------------------------------------------------------------------------------

    def apply(self, key: str, batch: Batch) -> tuple[dict, bool]:
        """Apply a batch in one transaction and record its answer under ``key``. Returns the answer and whether it
        is a replay: the stored answer of an earlier request with the same key, nothing applied this time."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT request_hash, response FROM idempotency WHERE idempotency_key = ? AND created_at >= ?",
                    (key, time.time() - self.idempotency_ttl_s),
                ).fetchone()
                if row is not None:
                    db.execute("ROLLBACK")
                    if row["request_hash"] != batch.fingerprint():
                        raise IdempotencyConflict(f"Idempotency-Key {key!r} was already used for a different batch")
                    return json.loads(row["response"]), True
                results = [self._apply_change(batch, change) for change in batch.changes]
                response = {"batch_id": batch.batch_id, "results": results}
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?)",
                    (key, batch.fingerprint(), json.dumps(response), time.time()),
                )
                db.execute("COMMIT")
                return response, False
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _apply_change(self, batch: Batch, change: dict) -> dict:
        change_id = change["change_id"]
        seen = self._db.execute("SELECT 1 FROM applied_changes WHERE change_id = ?", (change_id,)).fetchone()
        if seen:
            # Already applied by an earlier request (whose answer may have been lost): answer, don't re-apply.
            return {"change_id": change_id, "status": "applied", "error": None}
        try:
            _APPLY[_kind(change)](self._db, batch.organization_id, change)
        except Rejected as exc:
            # Not recorded as applied: the same change may succeed when sent again later (e.g. after its user).
            return {"change_id": change_id, "status": "rejected", "error": str(exc)}
        self._db.execute(
            "INSERT INTO applied_changes VALUES (?, ?, ?, 1, ?) "
            "ON CONFLICT (change_id) DO UPDATE SET applications = applications + 1",
            (change_id, batch.organization_id, batch.batch_id, time.time()),
        )
        return {"change_id": change_id, "status": "applied", "error": None}

    # -- reading ------------------------------------------------------------------------------------------------

    def state(self, organization_id: str | None = None) -> dict:
        where, params = ("WHERE organization_id = ?", (organization_id,)) if organization_id else ("", ())
        with self._lock:
            users = self._db.execute(
                "SELECT organization_id, user_id, email, given_name, family_name, preferred_username, active "
                f"FROM users {where} ORDER BY organization_id, user_id", params,
            ).fetchall()
            memberships = self._db.execute(
                f"SELECT organization_id, group_id, user_id FROM memberships {where} "
                "ORDER BY organization_id, group_id, user_id", params,
            ).fetchall()
            roles = self._db.execute(
                f"SELECT organization_id, user_id, role_name FROM roles {where} "
                "ORDER BY organization_id, user_id, role_name", params,
            ).fetchall()
        return {
            "users": [{**dict(u), "active": bool(u["active"])} for u in users],
            "memberships": [dict(m) for m in memberships],
            "roles": [dict(r) for r in roles],
        }

    def stats(self) -> dict:
        with self._lock:
            rows = self._db.execute("SELECT change_id, applications FROM applied_changes ORDER BY change_id").fetchall()
            batches = self._db.execute("SELECT count(*) FROM idempotency").fetchone()[0]
        applications = {r["change_id"]: r["applications"] for r in rows}
        return {
            "batches": batches,
            "changes_applied": len(applications),
            "max_applications": max(applications.values(), default=0),
            "applications": applications,
        }


# -- the change vocabulary ----------------------------------------------------------------------------------------


def _kind(change: dict) -> str:
    entity, op = change.get("entity"), change.get("op")
    ops = {"user": USER_OPS, "membership": MEMBERSHIP_OPS, "role": ROLE_OPS}.get(entity) if isinstance(entity, str) else None
    if ops is None:
        return "unknown-entity"
    if op not in ops:
        return "unknown-op"
    return f"{entity}.{op}"


def _data(change: dict) -> dict:
    data = change.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise Rejected("data must be an object")
    return data


def _text(data: dict, field: str, required: bool = False) -> str | None:
    value = data.get(field)
    if value is None or value == "":
        if required:
            raise Rejected(f"data.{field} is required")
        return None
    if not isinstance(value, str):
        raise Rejected(f"data.{field} must be a string")
    return value


def _identity(change: dict, fields: tuple[str, ...]) -> tuple[str, ...]:
    """The entity's identity from ``data``, else from ``key`` (fields joined by "/"); both given must agree."""
    data = _data(change)
    key = change.get("key")
    if key is not None and not isinstance(key, str):
        raise Rejected("key must be a string")
    from_key = tuple(key.split("/", len(fields) - 1)) if key else ()
    if from_key and len(from_key) != len(fields):
        from_key = ()
    values = []
    for i, field in enumerate(fields):
        value = _text(data, field)
        if value is None:
            if not from_key:
                raise Rejected(f"data.{field} is required")
            value = from_key[i]
        values.append(value)
    expected = "/".join(values)
    if key and key != expected:
        raise Rejected(f"key {key!r} does not match data ({expected!r})")
    return tuple(values)


def _user_exists(db: sqlite3.Connection, org: str, user_id: str) -> bool:
    return db.execute("SELECT 1 FROM users WHERE organization_id = ? AND user_id = ?", (org, user_id)).fetchone() is not None


def _attributes(data: dict) -> dict[str, Any]:
    """The user attributes present in ``data`` (absent ones are left unchanged by updates)."""
    values: dict[str, Any] = {f: _text(data, f) for f in USER_ATTRIBUTES if f in data}
    if "active" in data:
        if not isinstance(data["active"], bool):
            raise Rejected("data.active must be true or false")
        values["active"] = int(data["active"])
    return values


def _set_user(db: sqlite3.Connection, org: str, user_id: str, values: dict[str, Any]) -> None:
    if values:
        assignments = ", ".join(f"{column} = ?" for column in values)
        db.execute(
            f"UPDATE users SET {assignments} WHERE organization_id = ? AND user_id = ?",
            (*values.values(), org, user_id),
        )


def _user_create(db, org, change):
    (user_id,) = _identity(change, ("user_id",))
    # Only the identity is required: a directory may well hold a user without an email, and the application
    # should mirror it rather than refuse it forever.
    values = {"active": 1, **_attributes(_data(change))}
    # An existing user is upserted: the create may be a resend whose first answer was lost.
    db.execute(
        "INSERT INTO users (organization_id, user_id) VALUES (?, ?) ON CONFLICT DO NOTHING", (org, user_id)
    )
    _set_user(db, org, user_id, values)


def _existing_user_op(active: bool | None):
    def apply(db, org, change):
        (user_id,) = _identity(change, ("user_id",))
        values = _attributes(_data(change))
        if active is not None:
            values["active"] = int(active)
        if not _user_exists(db, org, user_id):
            raise Rejected(f"unknown user {user_id!r} in organization {org!r}")
        _set_user(db, org, user_id, values)

    return apply


def _user_delete(db, org, change):
    (user_id,) = _identity(change, ("user_id",))
    for table in ("memberships", "roles", "users"):
        db.execute(f"DELETE FROM {table} WHERE organization_id = ? AND user_id = ?", (org, user_id))


def _membership_add(db, org, change):
    group_id, user_id = _identity(change, ("group_id", "user_id"))
    group_name = _text(_data(change), "group_name")
    if not _user_exists(db, org, user_id):
        raise Rejected(f"unknown user {user_id!r} in organization {org!r}")
    db.execute(
        "INSERT INTO memberships VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO UPDATE SET group_name = coalesce(excluded.group_name, group_name)",
        (org, group_id, user_id, group_name),
    )


def _membership_remove(db, org, change):
    group_id, user_id = _identity(change, ("group_id", "user_id"))
    db.execute(
        "DELETE FROM memberships WHERE organization_id = ? AND group_id = ? AND user_id = ?", (org, group_id, user_id)
    )


def _role_grant(db, org, change):
    user_id, role_name = _identity(change, ("user_id", "role_name"))
    if not _user_exists(db, org, user_id):
        raise Rejected(f"unknown user {user_id!r} in organization {org!r}")
    db.execute("INSERT INTO roles VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (org, user_id, role_name))


def _role_revoke(db, org, change):
    user_id, role_name = _identity(change, ("user_id", "role_name"))
    db.execute(
        "DELETE FROM roles WHERE organization_id = ? AND user_id = ? AND role_name = ?", (org, user_id, role_name)
    )


def _unknown_entity(db, org, change):
    raise Rejected(f"unknown entity {change.get('entity')!r}: expected user, membership or role")


def _unknown_op(db, org, change):
    ops = {"user": USER_OPS, "membership": MEMBERSHIP_OPS, "role": ROLE_OPS}[change["entity"]]
    raise Rejected(f"unknown op {change.get('op')!r} for {change['entity']}: expected {', '.join(ops)}")


_APPLY = {
    "user.create": _user_create,
    "user.update": _existing_user_op(active=None),
    "user.reactivate": _existing_user_op(active=True),
    "user.deactivate": _existing_user_op(active=False),
    "user.delete": _user_delete,
    "membership.add": _membership_add,
    "membership.remove": _membership_remove,
    "role.grant": _role_grant,
    "role.revoke": _role_revoke,
    "unknown-entity": _unknown_entity,
    "unknown-op": _unknown_op,
}
