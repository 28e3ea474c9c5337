"""The ``scim2`` delivery protocol (docs/scim2.md): the ledger's changes applied to a SCIM 2.0 service provider
(RFC 7643/7644), one request per change, with the same ordering, retries, guard and idempotency as the ``changes``
protocol (``changes_protocol.send_changes`` drives both).

A directory user is a SCIM ``User`` (``externalId`` = the directory user id), a directory group a ``Group``
(``externalId`` = the group id) that reaches the application with its first member. Memberships and roles change by
``PATCH``; deactivation is ``active: false``; deletion is ``DELETE``. The ids the application gives are kept in the
warehouse (``scim_ids``): ``read_state`` loads an organization's before its send, ``write_state`` records what the
send learnt, both inside the delivery's short transactions.

Idempotency rests on ``externalId``: a create is preceded by a search for the directory id, and one answered ``409
uniqueness`` (an account made by hand, or a create whose answer was lost) finds the account by ``userName`` (a group:
``displayName``) and adopts it, never duplicating it. Every other change is a ``PATCH`` whose replay is harmless.
A resource the application deleted on its own (``404``) is repaired, not retried forever: a user or group changed is
created again and the warehouse forgets what it held of it, so that the next diff sends that again.

What the service provider supports is read from ``/ServiceProviderConfig``: without ``PATCH`` a change is a ``GET``
then a ``PUT`` (``If-Match`` with ETags); without ``filter`` a search pages through the resources. ``/Bulk`` is not
used: a change waits for the ids of the one before (a membership needs its user's id), and one request per change
over a kept-alive connection keeps every answer tied to its change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from scim2_models import Error, ServiceProviderConfig

from scim_pipeline.config import ORG_PLACEHOLDER, Scim2Settings
from scim_pipeline.provisioning.changes_protocol import (
    Attempts,
    ChangeResult,
    DeliveryRejected,
    DeliveryUnavailable,
    RetryingClient,
    TryAgain,
    parse_retry_after,
)

SCIM_JSON = "application/scim+json"
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
GROUP_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:Group"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
USER, GROUP = "User", "Group"
_ENDPOINTS = {USER: "/Users", GROUP: "/Groups"}


@dataclass
class Capabilities:
    """What a service provider says it supports (its ``/ServiceProviderConfig``); all but ETags when it says
    nothing."""

    patch: bool = True
    filter: bool = True
    etag: bool = False
    max_results: int = 100

    @classmethod
    def from_config(cls, body: Any) -> "Capabilities":
        config = ServiceProviderConfig.model_validate(body)
        filters = config.filter
        return cls(
            patch=bool(config.patch and config.patch.supported),
            filter=bool(filters and filters.supported),
            etag=bool(config.etag and config.etag.supported),
            max_results=min(100, (filters.max_results if filters and filters.max_results else 100) or 100),
        )


class ScimError(Exception):
    """A request the service provider answered with an error it will give again (a 4xx): ``status``, and the SCIM
    error body's ``scimType`` and ``detail``."""

    def __init__(self, status: int, scim_type: str | None, detail: str):
        super().__init__(f"HTTP {status}" + (f" {scim_type}" if scim_type else "") + (f": {detail}" if detail else ""))
        self.status, self.scim_type, self.detail = status, scim_type, detail


@dataclass
class _OrgState:
    """One organization's ids as the warehouse has them, and what this send learnt."""

    ids: dict[tuple[str, str], tuple[str, str | None]] = field(default_factory=dict)  # (type, ext id) -> (id, name)
    upserts: dict[tuple[str, str], tuple[str, str | None]] = field(default_factory=dict)
    removed: set[tuple[str, str]] = field(default_factory=set)
    forget_users: set[str] = field(default_factory=set)  # deleted in the application: held nothing more
    forget_user_links: set[str] = field(default_factory=set)  # created again: their memberships and roles are gone
    forget_group_links: set[str] = field(default_factory=set)  # created again: their members are gone

    def get(self, rtype: str, ext: str) -> str | None:
        entry = self.ids.get((rtype, ext))
        return entry[0] if entry else None

    def put(self, rtype: str, ext: str, scim_id: str, name: str | None = None) -> None:
        self.ids[(rtype, ext)] = self.upserts[(rtype, ext)] = (scim_id, name)
        self.removed.discard((rtype, ext))

    def drop(self, rtype: str, ext: str) -> None:
        self.ids.pop((rtype, ext), None)
        self.upserts.pop((rtype, ext), None)
        self.removed.add((rtype, ext))


def user_resource(record: dict) -> dict:
    """A directory user's desired record as a SCIM ``User`` (the mapping of docs/scim2.md). Built as plain JSON,
    not through scim2-models: its email validation refuses (and its normalization rewrites) addresses directories do
    hold, such as ``@corp.local``; the application is the judge of what it accepts."""
    email = record.get("email")
    name = {k: v for k, v in (("givenName", record.get("given_name")), ("familyName", record.get("family_name")))
            if v is not None}
    user: dict[str, Any] = {
        "schemas": [USER_SCHEMA],
        "externalId": record["user_id"],
        "userName": email or record.get("preferred_username") or record["user_id"],
        "name": name,
        "active": bool(record.get("active", True)),
    }
    if email:
        user["emails"] = [{"value": email, "primary": True}]
    return user  # roles come with their own changes (PATCH), as memberships do


def _user_replacements(record: dict) -> list[dict]:
    """The attributes a user change replaces, as PATCH operations."""
    body = user_resource(record)
    return [{"op": "replace", "path": attr, "value": body[attr]}
            for attr in ("externalId", "userName", "name", "emails", "active") if attr in body]


def _quote(value: str) -> str:
    return json.dumps(value)  # a SCIM filter's string literal is a JSON string


class Scim2Client(RetryingClient):
    """Applies change batches to a SCIM 2.0 service provider, a tenant per organization."""

    def __init__(self, settings: Scim2Settings, **options: Any):
        """``options``: those of ``RetryingClient``."""
        super().__init__(**options)
        self.settings = settings
        self._capabilities: dict[str, Capabilities] = {}
        self._state: dict[str, _OrgState] = {}
        self.requests = 0  # sent, for the benchmark

    def __repr__(self) -> str:
        return f"Scim2Client(url={self.settings.url!r})"

    # -- the warehouse side ---------------------------------------------------------------------------------------

    def read_state(self, con: Any, organization_id: str) -> None:
        rows = con.execute("SELECT resource_type, external_id, scim_id, display_name FROM scim_ids "
                           "WHERE organization_id = $org", {"org": organization_id}).fetchall()
        self._state[organization_id] = _OrgState(ids={(t, e): (s, n) for t, e, s, n in rows})

    def write_state(self, con: Any, organization_id: str) -> None:
        state = self._state.pop(organization_id, None)
        if state is None:
            return
        org = {"org": organization_id}
        for (rtype, ext) in state.removed:
            con.execute("DELETE FROM scim_ids WHERE organization_id = $org AND resource_type = $t "
                        "AND external_id = $e", org | {"t": rtype, "e": ext})
        if state.upserts:
            con.executemany(
                "INSERT INTO scim_ids VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET scim_id = excluded.scim_id, "
                "display_name = excluded.display_name",
                [(organization_id, t, e, s, n) for (t, e), (s, n) in state.upserts.items()])
        # What the application lost with a resource it deleted on its own: no longer delivered, so sent again.
        for user in state.forget_users:
            con.execute("DELETE FROM delivered_users WHERE organization_id = $org AND user_id = $u", org | {"u": user})
        for user in state.forget_users | state.forget_user_links:
            for table in ("delivered_memberships", "delivered_roles"):
                con.execute(f"DELETE FROM {table} WHERE organization_id = $org AND user_id = $u", org | {"u": user})
        for group in state.forget_group_links:
            con.execute("DELETE FROM delivered_memberships WHERE organization_id = $org AND group_id = $g",
                        org | {"g": group})

    # -- a batch --------------------------------------------------------------------------------------------------

    def base_url(self, organization_id: str) -> str:
        tenant = self.settings.tenants.get(organization_id)
        url = tenant.url if tenant and tenant.url else self.settings.url
        return url.replace(ORG_PLACEHOLDER, organization_id).rstrip("/")

    def _token(self, organization_id: str) -> str | None:
        tenant = self.settings.tenants.get(organization_id)
        return tenant.token if tenant and tenant.token else self.settings.token

    def send_batch(self, organization_id: str, changes: list[dict]) -> list[ChangeResult]:
        """Apply the changes one by one; one result per change, in the order given. A change the service provider
        refuses is ``rejected`` with its SCIM error. When it stays unavailable, DeliveryUnavailable carries the
        results so far (``answered``) and the changes not sent (``unsent``); when it refuses the client itself
        (401, 403), DeliveryRejected."""
        state = self._state.setdefault(organization_id, _OrgState())
        results: list[ChangeResult] = []
        for i, change in enumerate(changes):
            try:
                error = self._apply(organization_id, state, change)
            except (DeliveryUnavailable, DeliveryRejected) as exc:
                exc.answered = tuple(results)
                exc.unsent = frozenset(c["change_id"] for c in changes[i + 1:])
                raise
            except ScimError as exc:
                error = str(exc)
            except (ValueError, KeyError) as exc:  # a change without what its request needs: this change only
                error = f"malformed change: {_one_line(exc)}"
            results.append(ChangeResult(change["change_id"], "applied" if error is None else "rejected", error))
        return results

    def _apply(self, org: str, state: _OrgState, change: dict) -> str | None:
        """Apply one change; None when done, else why it was refused."""
        entity, op, data = change.get("entity"), change.get("op"), change.get("data") or {}
        if isinstance(data, str):
            data = json.loads(data)
        if entity == "user" and op in ("create", "update", "reactivate", "deactivate"):
            # A create sent before (its answer lost) may have been applied: searched for by externalId first.
            self._put_user(org, state, data, search=op != "create" or bool(change.get("attempts")))
        elif entity == "user" and op == "delete":
            self._delete(org, state, USER, data["user_id"])
        elif entity == "membership" and op == "add":
            user = self._find_id(org, state, USER, data["user_id"])
            if user is None:
                return f"user {data['user_id']} is not in the application"
            group = self._ensure_group(org, state, data["group_id"], data.get("group_name"))
            ops = [{"op": "add", "path": "members", "value": [{"value": user}]}]
            try:
                self._modify(org, GROUP, group, ops)
            except ScimError as exc:
                if exc.status != 404:
                    raise
                group = self._recreate_group(org, state, data["group_id"], data.get("group_name"))
                self._modify(org, GROUP, group, ops)
        elif entity == "membership" and op == "remove":
            group = self._find_id(org, state, GROUP, data["group_id"])
            user = self._find_id(org, state, USER, data["user_id"])
            if group is not None and user is not None:
                self._modify_gone_ok(org, GROUP, group, [{"op": "remove", "path": f"members[value eq {_quote(user)}]"}])
        elif entity == "role" and op == "grant":
            user = self._find_id(org, state, USER, data["user_id"])
            if user is None:
                return f"user {data['user_id']} is not in the application"
            try:
                self._modify(org, USER, user, [{"op": "add", "path": "roles", "value": [{"value": data["role_name"]}]}])
            except ScimError as exc:
                if exc.status != 404:
                    raise
                # Deleted in the application on its own: forgotten, so that the next diff creates it again.
                state.drop(USER, data["user_id"])
                state.forget_users.add(data["user_id"])
                return f"{exc}; the user was deleted in the application and is provisioned again"
        elif entity == "role" and op == "revoke":
            user = self._find_id(org, state, USER, data["user_id"])
            if user is not None:
                self._modify_gone_ok(org, USER, user,
                                     [{"op": "remove", "path": f"roles[value eq {_quote(data['role_name'])}]"}])
        elif entity == "group" and op == "update":
            group_id, name = data["group_id"], data.get("display_name")
            group = self._find_id(org, state, GROUP, group_id)
            try:
                if group is None:
                    raise ScimError(404, None, "not found")
                self._modify(org, GROUP, group, [{"op": "replace", "path": "displayName", "value": name}])
                state.put(GROUP, group_id, group, name)
            except ScimError as exc:
                if exc.status != 404:
                    raise
                self._recreate_group(org, state, group_id, name)
        elif entity == "group" and op == "delete":
            self._delete(org, state, GROUP, data["group_id"])
        else:
            return f"unknown change {entity}.{op}"
        return None

    # -- users and groups -------------------------------------------------------------------------------------------

    def _put_user(self, org: str, state: _OrgState, record: dict, search: bool = True) -> None:
        """Create the user, or bring the account that has its id (or, unmapped, its userName) to the record.
        ``search``: look for the externalId before creating (a first create relies on userName uniqueness)."""
        user_id = record["user_id"]
        scim_id = self._find_id(org, state, USER, user_id) if search else state.get(USER, user_id)
        if scim_id is not None:
            try:
                self._modify(org, USER, scim_id, _user_replacements(record))
                return
            except ScimError as exc:
                if exc.status != 404:
                    raise
                # Deleted in the application on its own: created again, with none of its memberships and roles.
                state.drop(USER, user_id)
                state.forget_user_links.add(user_id)
        body = user_resource(record)
        try:
            created = self._request(org, "POST", _ENDPOINTS[USER], body)
            state.put(USER, user_id, created["id"])
        except ScimError as exc:
            if exc.status != 409:
                raise
            # An account that already holds the userName (made by hand, or a create whose answer was lost): adopted.
            existing = self._search(org, USER, "userName", body["userName"])
            if existing is None:
                raise
            self._modify(org, USER, existing["id"], _user_replacements(record))
            state.put(USER, user_id, existing["id"])

    def _ensure_group(self, org: str, state: _OrgState, group_id: str, name: str | None) -> str:
        """The group's SCIM id: known, found by externalId, adopted by displayName, or created."""
        known = self._find_id(org, state, GROUP, group_id)
        if known is not None:
            return known
        return self._recreate_group(org, state, group_id, name, known_before=False)

    def _recreate_group(self, org: str, state: _OrgState, group_id: str, name: str | None,
                        known_before: bool = True) -> str:
        if known_before:  # deleted in the application on its own: its members are gone with it
            state.drop(GROUP, group_id)
            state.forget_group_links.add(group_id)
        display_name = name or group_id
        body = {"schemas": [GROUP_SCHEMA], "externalId": group_id, "displayName": display_name}
        # displayName is seldom unique in an application (no 409 to rely on), and groups are few: searched first.
        existing = self._search(org, GROUP, "displayName", display_name)
        if existing is None:
            try:
                scim_id = self._request(org, "POST", _ENDPOINTS[GROUP], body)["id"]
                state.put(GROUP, group_id, scim_id, display_name)
                return scim_id
            except ScimError as exc:
                existing = self._search(org, GROUP, "displayName", display_name) if exc.status == 409 else None
                if existing is None:
                    raise
        scim_id = existing["id"]  # a group made by hand (or by a send whose answer was lost): adopted
        self._modify(org, GROUP, scim_id, [{"op": "replace", "path": "externalId", "value": group_id}])
        state.put(GROUP, group_id, scim_id, display_name)
        return scim_id

    def _find_id(self, org: str, state: _OrgState, rtype: str, ext: str) -> str | None:
        """The SCIM id of a directory id: as the warehouse has it, else by externalId (a resource created by a send
        whose answer was lost, or whose id was not recorded), else None."""
        known = state.get(rtype, ext)
        if known is not None:
            return known
        found = self._search(org, rtype, "externalId", ext)
        if found is None:
            return None
        state.put(rtype, ext, found["id"], found.get("displayName") if rtype == GROUP else None)
        return found["id"]

    def _delete(self, org: str, state: _OrgState, rtype: str, ext: str) -> None:
        scim_id = self._find_id(org, state, rtype, ext)
        if scim_id is not None:
            try:
                self._request(org, "DELETE", f"{_ENDPOINTS[rtype]}/{scim_id}")
            except ScimError as exc:
                if exc.status != 404:  # already gone: what was wanted
                    raise
        state.drop(rtype, ext)

    # -- requests -------------------------------------------------------------------------------------------------

    def capabilities(self, org: str) -> Capabilities:
        base = self.base_url(org)
        if base not in self._capabilities:
            try:
                body = self._request(org, "GET", "/ServiceProviderConfig")
                self._capabilities[base] = Capabilities.from_config(body)
            except ScimError as exc:
                if exc.status not in (404, 501):
                    raise
                self._capabilities[base] = Capabilities()
            except ValueError:  # a body that is no ServiceProviderConfig: assume the common case
                self._capabilities[base] = Capabilities()
        return self._capabilities[base]

    def _search(self, org: str, rtype: str, attr: str, value: str) -> dict | None:
        """The first resource whose ``attr`` equals ``value`` (userName and displayName compared without case, as
        SCIM's ``eq`` compares them)."""
        caps = self.capabilities(org)
        if caps.filter:
            found = self._request(org, "GET", _ENDPOINTS[rtype], params={"filter": f"{attr} eq {_quote(value)}"})
            resources = found.get("Resources") or []
            return resources[0] if resources else None
        exact = attr == "externalId"
        start = 1
        while True:  # no filter: page through them
            page = self._request(org, "GET", _ENDPOINTS[rtype], params={"startIndex": start, "count": caps.max_results})
            resources = page.get("Resources") or []
            for resource in resources:
                have = resource.get(attr)
                if isinstance(have, str) and (have == value if exact else have.lower() == value.lower()):
                    return resource
            start += len(resources)
            if not resources or start > int(page.get("totalResults") or 0):
                return None

    def _modify_gone_ok(self, org: str, rtype: str, scim_id: str, operations: list[dict]) -> None:
        """A removal: a resource that is gone holds nothing to remove."""
        try:
            self._modify(org, rtype, scim_id, operations)
        except ScimError as exc:
            if exc.status != 404:
                raise

    def _modify(self, org: str, rtype: str, scim_id: str, operations: list[dict]) -> None:
        """PATCH the resource; without PATCH support, read it, apply the operations here and PUT it back (with
        If-Match when the service provider has ETags, read again if it changed meanwhile)."""
        path = f"{_ENDPOINTS[rtype]}/{scim_id}"
        caps = self.capabilities(org)
        if caps.patch:
            self._request(org, "PATCH", path, {"schemas": [PATCH_SCHEMA], "Operations": operations})
            return
        for attempt in range(3):
            resource, etag = self._request(org, "GET", path, with_etag=True)
            for o in operations:
                _apply_locally(resource, o)
            resource.pop("meta", None)
            try:
                self._request(org, "PUT", path, resource, if_match=etag if caps.etag else None)
                return
            except ScimError as exc:
                if exc.status != 412 or attempt == 2:
                    raise

    def _request(self, org: str, method: str, path: str, body: Any = None, params: dict | None = None,
                 with_etag: bool = False, if_match: str | None = None) -> Any:
        """One request, retried as the ``changes`` protocol retries a batch (429, 408, 5xx, timeouts, connection
        errors, honouring Retry-After). Raises ScimError for another 4xx, DeliveryRejected for 401/403 (the client
        itself is refused), DeliveryUnavailable after the retry budget."""
        url = self.base_url(org) + path
        headers = {"accept": SCIM_JSON}
        token = self._token(org)
        if token:
            headers["authorization"] = f"Bearer {token}"
        if body is not None:
            headers["content-type"] = SCIM_JSON
        if if_match:
            headers["if-match"] = if_match
        content = json.dumps(body, separators=(",", ":")).encode() if body is not None else None

        def attempt(seen: Attempts) -> Any:
            self.requests += 1
            try:
                response = self._http.request(method, url, content=content, params=params, headers=headers)
            except httpx.TimeoutException as exc:
                seen.maybe_applied = seen.maybe_applied or not isinstance(exc, httpx.ConnectTimeout)
                raise TryAgain(f"timed out ({type(exc).__name__})") from exc
            except httpx.TransportError as exc:
                seen.maybe_applied = seen.maybe_applied or not isinstance(exc, httpx.ConnectError)
                raise TryAgain(f"connection failed: {exc or type(exc).__name__}") from exc
            status = response.status_code
            if 200 <= status < 300:
                if status == 204 or not response.content:
                    return ({}, response.headers.get("etag")) if with_etag else {}
                try:
                    answer = response.json()
                except ValueError:
                    seen.maybe_applied = True
                    raise TryAgain(f"HTTP {status} with a body that is not JSON") from None
                return (answer, response.headers.get("etag")) if with_etag else answer
            error = _scim_error(response)
            if status in (408, 429) or status >= 500:
                seen.maybe_applied = seen.maybe_applied or status >= 500
                raise TryAgain(str(error), parse_retry_after(response.headers.get("retry-after")))
            if status in (401, 403):
                raise DeliveryRejected(status, f"{method} {url} refused: {error}", str(error))
            raise error

        return self.retried(f"{method} {url}", attempt)


def _scim_error(response: httpx.Response) -> ScimError:
    """The SCIM error of an answer: its body's ``status``, ``scimType`` and ``detail`` when it is a SCIM error,
    else the start of the body."""
    try:
        error = Error.model_validate(response.json())
        return ScimError(response.status_code, error.scim_type, error.detail or "")
    except ValueError:
        text = response.text.strip().replace("\n", " ")
        return ScimError(response.status_code, None, text[:300] + ("..." if len(text) > 300 else ""))


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _apply_locally(resource: dict, operation: dict) -> None:
    """One of this client's own PATCH operations applied to a resource read back (the fallback without PATCH):
    ``replace`` of an attribute, ``add`` to a multi-valued one, ``remove`` of the value ``path[value eq "x"]``."""
    op, path = operation["op"], operation["path"]
    if op == "replace":
        resource[path] = operation["value"]
    elif op == "add":
        have = resource.setdefault(path, [])
        have.extend(v for v in operation["value"] if v not in have)
    elif op == "remove":
        attr, _, rest = path.partition("[value eq ")
        value = json.loads(rest.rstrip("]"))
        resource[attr] = [v for v in resource.get(attr) or [] if v.get("value") != value]
