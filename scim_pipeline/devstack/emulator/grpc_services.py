"""The gRPC services the pipeline calls, implemented on the servicer classes generated in the Scalekit SDK, with the
rules of the real service: bearer token, id prefixes, NOT_FOUND, page sizes, opaque page tokens, filters.

Listing users is the hot path (a full sync of a large directory is thousands of pages), so each user's serialized
``ListDirectoryUsersResponse`` entry is cached on the user and a page is the concatenation of those bytes and a
small tail (protobuf merges concatenated messages, so repeated fields append). The servicers may therefore return
``bytes``; ``_PassBytes`` lets those through the generated response serializers unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from google.protobuf import empty_pb2, timestamp_pb2
from scalekit.v1.directories import directories_pb2 as dpb
from scalekit.v1.directories import directories_pb2_grpc as dgrpc
from scalekit.v1.events import events_pb2 as epb
from scalekit.v1.events import events_pb2_grpc as egrpc
from scalekit.v1.organizations import organizations_pb2 as opb
from scalekit.v1.organizations import organizations_pb2_grpc as ogrpc

from scim_pipeline.devstack.emulator import events as ev
from scim_pipeline.devstack.emulator.directory import Directory, DirectoryStore, Group, Organization, User
from scim_pipeline.devstack.emulator.gateway import FaultInjector, Tokens
from scim_pipeline.devstack.emulator.mutations import Applied, MutationError

READ_AHEAD_PAGES = 10  # how far ahead of a sequential listing the background builder works
log = logging.getLogger(__name__)

MAX_DIRECTORY_PAGE = 30  # Scalekit's limit for users and groups
DEFAULT_DIRECTORY_PAGE = 10
MAX_ORG_PAGE = 100
DEFAULT_ORG_PAGE = 10
MAX_ID_LEN = 32  # the SDK's validation rules bound every organization and directory id
PORTAL_LINK_TTL_US = 60 * 1_000_000  # Scalekit's admin portal links are valid for one minute
FEATURES = ("sso", "dir_sync", "domain_verification", "session_policy")  # Scalekit's organization setting names
_STATUS = {c.name: c for c in grpc.StatusCode}
Mutate = Callable[[list[dict]], list[Applied]]
_DIRECTORY_TYPES = {"SCIM": dpb.SCIM, "LDAP": dpb.LDAP, "POLL": dpb.POLL}


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def _us(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


# --- page tokens: opaque to clients, bound to the listing they came from --------------------------------------------

def encode_token(scope: str, cursor: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([scope, cursor]).encode()).decode().rstrip("=")


def decode_token(token: str, scope: str) -> int | None:
    """The cursor in ``token``, or None when it is not a token of this listing."""
    try:
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error):
        return None
    if not (isinstance(value, list) and len(value) == 2 and value[0] == scope and isinstance(value[1], int)):
        return None
    return value[1]


# --- protobuf views of the store's objects ---------------------------------------------------------------------------

def organization_pb(org: Organization) -> opb.Organization:
    msg = opb.Organization(
        id=org.id, display_name=org.display_name, external_id=org.external_id, metadata=org.metadata,
        create_time=timestamp(org.created_at), update_time=timestamp(org.updated_at),
        settings=opb.OrganizationSettings(features=[
            opb.OrganizationSettingsFeature(name=n, enabled=e) for n, e in org.features.items()]),
    )
    if org.slug:
        msg.slug = org.slug
    if org.logo_url:
        msg.logo_url = org.logo_url
    return msg


def directory_pb(store: DirectoryStore, d: Directory, endpoint_base: str) -> dpb.Directory:
    total_users, total_groups = len(d.user_ids), len(d.group_ids)
    return dpb.Directory(
        id=d.id, name=d.name, organization_id=d.organization_id, enabled=d.enabled,
        directory_type=_DIRECTORY_TYPES.get(d.directory_type, dpb.SCIM),
        directory_provider=dpb.DirectoryProvider.Value(d.provider),
        last_synced_at=timestamp(d.last_synced_at),
        directory_endpoint=f"{endpoint_base}/api/v1/directories/{d.id}/scim/v2",
        total_users=total_users, total_groups=total_groups,
        stats=dpb.Stats(total_users=total_users, total_groups=total_groups,
                        user_updated_at=timestamp(d.user_updated_at), group_updated_at=timestamp(d.group_updated_at)),
        role_assignments=dpb.RoleAssignments(assignments=[
            dpb.RoleAssignment(group_id=g, role_name=r) for g, r in d.role_assignments]),
        status="COMPLETED",
    )


def user_entry(store: DirectoryStore, user: User, detail: bool) -> bytes:
    """``user`` as a serialized ``ListDirectoryUsersResponse`` holding only that user (cached until the user changes);
    a page concatenates these entries."""
    cached = user._pb_detail if detail else user._pb
    if cached is not None:
        return cached
    response = dpb.ListDirectoryUsersResponse()
    entry = response.users.add(
        id=user.id, email=user.email, preferred_username=user.preferred_username, given_name=user.given_name,
        family_name=user.family_name, updated_at=timestamp(user.updated_at), emails=[v for v, _ in user.emails],
        groups=[dpb.DirectoryGroup(id=gid, display_name=store.groups[gid].display_name) for gid in user.groups])
    if detail:
        entry.user_detail.update(ev.scim_user(store, user))
    cached = response.SerializeToString()
    if detail:
        user._pb_detail = cached
    else:
        user._pb = cached
    return cached


def group_entry(group: Group, detail: bool) -> bytes:
    cached = group._pb_detail if detail else group._pb
    if cached is not None:
        return cached
    msg = dpb.DirectoryGroup(id=group.id, display_name=group.display_name, total_users=len(group.members),
                             updated_at=timestamp(group.updated_at))
    if detail:
        msg.group_detail.update(ev.scim_group(group))
    cached = dpb.ListDirectoryGroupsResponse(groups=[msg]).SerializeToString()
    if detail:
        group._pb_detail = cached
    else:
        group._pb = cached
    return cached


def user_page_bytes(store: DirectoryStore, d: Directory, scope: str, after: int, size: int, group_id: str = "",
                    updated_after: int = 0, detail: bool = False) -> tuple[bytes, int]:
    """One serialized ``ListDirectoryUsersResponse`` and the next page's cursor (call with the store's lock held)."""
    users, total, next_cursor = store.user_page(d, after, size, group_id, updated_after)
    parts = [user_entry(store, u, detail) for u in users]
    parts.append(dpb.ListDirectoryUsersResponse(
        total_size=total, next_page_token=encode_token(scope, next_cursor) if next_cursor else "",
        prev_page_token=encode_token(scope, 0) if after else "").SerializeToString())
    return b"".join(parts), next_cursor


# --- the common edge of every call ------------------------------------------------------------------------------------

class Edge:
    """Fault injection and bearer-token authentication, applied at the start of every call."""

    def __init__(self, tokens: Tokens, faults: FaultInjector):
        self.tokens, self.faults = tokens, faults

    def admit(self, context: grpc.ServicerContext) -> None:
        failure, latency = self.faults.on_call()
        if latency:
            time.sleep(latency)
        if failure == "UNAVAILABLE":
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is temporarily unavailable (injected fault)")
        if failure == "RESOURCE_EXHAUSTED":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit exceeded (injected fault)")
        # The SDK sends 'authorization' twice: its current token first, the channel's original one second.
        token = None
        for key, value in context.invocation_metadata():
            if key == "authorization":
                token = value
                break
        if not token or not token.startswith("Bearer "):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        if not self.tokens.valid(token[len("Bearer "):].strip()):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token is expired or invalid")


def _check_id(context: grpc.ServicerContext, value: str, prefix: str, field: str) -> None:
    if not value:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required")
    if not value.startswith(prefix + "_") or len(value) <= len(prefix) + 1:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must start with '{prefix}_'")


def _check_org_id(context: grpc.ServicerContext, value: str, field: str = "id") -> None:
    """An organization id as the management methods' rules want it: present, ``org_``, at most 32 characters."""
    _check_id(context, value, "org", field)
    if len(value) > MAX_ID_LEN:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be at most {MAX_ID_LEN} characters")


def _page_size(context: grpc.ServicerContext, requested: int, default: int, maximum: int) -> int:
    if requested < 0 or requested > maximum:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_size must be between 0 and {maximum}")
    return requested or default


def _check_lengths(context: grpc.ServicerContext, *values: str) -> None:
    for value in values:
        if len(value) > MAX_ID_LEN:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"ids must be at most {MAX_ID_LEN} characters")


# --- services ---------------------------------------------------------------------------------------------------------

def _apply(context: grpc.ServicerContext, mutate: Mutate | None, op: dict) -> Applied:
    """One mutation (the control API's path: same validation, atomicity and events), its refusal as a gRPC status."""
    if mutate is None:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not supported")
    try:
        return mutate([op])[0]
    except MutationError as exc:
        context.abort(_STATUS.get(exc.code, grpc.StatusCode.INVALID_ARGUMENT), exc.reason)


class OrganizationService(ogrpc.OrganizationServiceServicer):
    """Listing and reading (the pipeline's calls) and the management methods an application calls."""

    def __init__(self, store: DirectoryStore, edge: Edge, mutate: Mutate | None = None,
                 endpoint_base: str = "https://localhost"):
        self.store, self.edge, self.mutate, self.endpoint_base = store, edge, mutate, endpoint_base

    def ListOrganization(self, request, context):
        self.edge.admit(context)
        size = _page_size(context, request.page_size, DEFAULT_ORG_PAGE, MAX_ORG_PAGE)
        scope = f"orgs:{request.external_id}"
        after = 0
        if request.page_token:
            after = decode_token(request.page_token, scope)
            if after is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token")
        with self.store.lock:
            orgs = [o for o in self.store.organizations.values()
                    if not request.external_id or o.external_id == request.external_id]
            later = [o for o in orgs if o.seq > after]
            page = later[:size]
            next_token = encode_token(scope, page[-1].seq) if len(later) > size else ""
            prev_token = encode_token(scope, 0) if after else ""
            return opb.ListOrganizationsResponse(
                organizations=[organization_pb(o) for o in page], total_size=len(orgs),
                next_page_token=next_token, prev_page_token=prev_token)

    def GetOrganization(self, request, context):
        self.edge.admit(context)
        with self.store.lock:
            return opb.GetOrganizationResponse(organization=organization_pb(self._find(context, request)))

    def GetOrganizationByExternalId(self, request, context):
        return self.GetOrganization(request, context)

    def _identity(self, context, request) -> dict:
        """The ``identities`` oneof (``id`` or ``external_id``) as a mutation's fields; the id wins if both are set."""
        if request.id or not request.external_id:
            _check_org_id(context, request.id)
            return {"organization_id": request.id}
        return {"external_id": request.external_id}

    def _find(self, context, request) -> Organization:
        """The organization a request names by ``id`` or ``external_id`` (call with the lock held)."""
        which = self._identity(context, request)
        if "organization_id" in which:
            org = self.store.organizations.get(which["organization_id"])
        else:
            org = next((o for o in self.store.organizations.values() if o.external_id == which["external_id"]), None)
        if org is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "organization not found")
        return org

    def _organization(self, context, org_id: str) -> Organization:
        org = self.store.organizations.get(org_id)
        if org is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "organization not found")
        return org

    def CreateOrganization(self, request, context):
        self.edge.admit(context)
        if not request.HasField("organization"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "organization is required")
        new = request.organization
        fields: dict = {"display_name": new.display_name}
        for name in ("external_id", "slug", "logo_url"):
            if new.HasField(name):
                fields[name] = getattr(new, name)
        if new.metadata:
            fields["metadata"] = dict(new.metadata)
        with self.store.lock:
            applied = _apply(context, self.mutate, {"op": "create_organization", "organization": fields})
            return opb.CreateOrganizationResponse(organization=organization_pb(self.store.organizations[applied.id]))

    def UpdateOrganization(self, request, context):
        self.edge.admit(context)
        if not request.HasField("organization"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "organization is required")
        self._identity(context, request)  # the ids' shapes before anything else
        change = request.organization
        paths = set(request.update_mask.paths) if request.HasField("update_mask") else None
        unknown = sorted((paths or set()) - {"display_name", "external_id", "metadata", "slug", "logo_url"})
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"update_mask names unknown field(s) {', '.join(unknown)}")
        fields: dict = {}
        for name in ("display_name", "external_id", "slug", "logo_url"):
            if (name in paths) if paths is not None else change.HasField(name):
                fields[name] = getattr(change, name)
        if ("metadata" in paths) if paths is not None else bool(change.metadata):
            fields["metadata"] = dict(change.metadata)  # replaced as a whole
        with self.store.lock:
            org = self._find(context, request)
            if fields:
                _apply(context, self.mutate, {"op": "update_organization", "organization_id": org.id,
                                              "changes": fields})
            return opb.UpdateOrganizationResponse(organization=organization_pb(org))

    def DeleteOrganization(self, request, context):
        self.edge.admit(context)
        which = self._identity(context, request)
        _apply(context, self.mutate, {"op": "delete_organization", **which})
        return empty_pb2.Empty()

    def GeneratePortalLink(self, request, context):
        self.edge.admit(context)
        _check_org_id(context, request.id)
        with self.store.lock:
            self._organization(context, request.id)
            link_id, _ = self.store.new_id("lnk")
            expires = self.store.now() + PORTAL_LINK_TTL_US
        return opb.GeneratePortalLinkResponse(link=opb.Link(
            id=link_id, location=f"{self.endpoint_base}/portal/{link_id}", expire_time=timestamp(expires)))

    def UpdateOrganizationSettings(self, request, context):
        self.edge.admit(context)
        _check_org_id(context, request.id)
        if not request.HasField("settings"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "settings is required")
        features = [(f.name, f.enabled) for f in request.settings.features]
        for name, _ in features:
            if name not in FEATURES:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"unknown feature {name!r}; known: {', '.join(FEATURES)}")
        with self.store.lock:
            org = self._organization(context, request.id)
            org.features.update(features)
            org.updated_at = self.store.now()
            self.store.changed()
            return opb.GetOrganizationResponse(organization=organization_pb(org))

    def UpsertUserManagementSettings(self, request, context):
        self.edge.admit(context)
        _check_org_id(context, request.organization_id, "organization_id")
        if not request.HasField("settings"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "settings is required")
        settings = request.settings
        limit = settings.max_allowed_users.value if settings.HasField("max_allowed_users") else None
        if limit is not None and limit < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_allowed_users must not be negative")
        with self.store.lock:
            org = self._organization(context, request.organization_id)
            org.max_allowed_users = limit  # absent: the setting is cleared (no limit)
            org.updated_at = self.store.now()
            self.store.changed()
        return opb.UpsertUserManagementSettingsResponse(settings=_user_management_pb(limit))

    def GetOrganizationUserManagementSetting(self, request, context):
        self.edge.admit(context)
        _check_org_id(context, request.organization_id, "organization_id")
        with self.store.lock:
            limit = self._organization(context, request.organization_id).max_allowed_users
        return opb.GetOrganizationUserManagementSettingsResponse(settings=_user_management_pb(limit))


def _user_management_pb(limit: int | None) -> opb.OrganizationUserManagementSettings:
    settings = opb.OrganizationUserManagementSettings()
    if limit is not None:
        settings.max_allowed_users.value = limit
    return settings


class DirectoryService(dgrpc.DirectoryServiceServicer):
    def __init__(self, store: DirectoryStore, edge: Edge, endpoint_base: str, mutate: Mutate | None = None):
        self.store, self.edge, self.endpoint_base = store, edge, endpoint_base
        self.mutate = mutate  # applies a batch of mutations (control API semantics, webhook events included)
        self._read_ahead_pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="emulator-read-ahead")
        self._read_ahead_lock = threading.Lock()
        self._reading_ahead: set[tuple] = set()

    def _directory(self, context, organization_id: str, directory_id: str) -> Directory:
        _check_id(context, organization_id, "org", "organization_id")
        _check_id(context, directory_id, "dir", "directory_id")
        if organization_id not in self.store.organizations:
            context.abort(grpc.StatusCode.NOT_FOUND, "organization not found")
        d = self.store.directories.get(directory_id)
        if d is None or d.organization_id != organization_id:
            context.abort(grpc.StatusCode.NOT_FOUND, "directory not found")
        return d

    def ListDirectories(self, request, context):
        self.edge.admit(context)
        _check_id(context, request.organization_id, "org", "organization_id")
        with self.store.lock:
            org = self.store.organizations.get(request.organization_id)
            if org is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "organization not found")
            return dpb.ListDirectoriesResponse(
                directories=[directory_pb(self.store, d, self.endpoint_base) for d in org.directories])

    def GetDirectory(self, request, context):
        self.edge.admit(context)
        with self.store.lock:
            d = self._directory(context, request.organization_id, request.id)
            return dpb.GetDirectoryResponse(directory=directory_pb(self.store, d, self.endpoint_base))

    def ListDirectoryUsers(self, request, context):
        self.edge.admit(context)
        size = _page_size(context, request.page_size, DEFAULT_DIRECTORY_PAGE, MAX_DIRECTORY_PAGE)
        updated_after = _us(request.updated_after) if request.HasField("updated_after") else 0
        group_id = request.directory_group_id
        if group_id:
            _check_id(context, group_id, "dirgroup", "directory_group_id")
        store = self.store
        with store.lock:
            d = self._directory(context, request.organization_id, request.directory_id)
            if group_id and (group_id not in store.groups or store.groups[group_id].directory_id != d.id):
                context.abort(grpc.StatusCode.NOT_FOUND, "directory group not found")
            scope = f"users:{d.id}:{group_id}:{updated_after}"
            after = 0
            if request.page_token:
                after = decode_token(request.page_token, scope)
                if after is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token")
            page, next_cursor = user_page_bytes(store, d, scope, after, size, group_id, updated_after,
                                                request.include_detail)
            ahead = None
            if next_cursor:
                # Only wake the read-ahead thread when the window ahead ends with a user never served yet.
                upcoming, _, _ = store.user_page(d, next_cursor, size * READ_AHEAD_PAGES, group_id, updated_after)
                attr = "_pb_detail" if request.include_detail else "_pb"
                if upcoming and getattr(upcoming[-1], attr) is None:
                    ahead = upcoming
        if ahead:
            self._read_ahead(d, group_id, updated_after, ahead, request.include_detail)
        return self.edge.faults.malformed(page)

    def _read_ahead(self, d: Directory, group_id: str, updated_after: int, users: list[User], detail: bool) -> None:
        """Build the next pages' entries in the background while this page travels and the client parses it: a
        full listing is sequential, so the cold cost of page k+1 then overlaps with the round trip of page k."""
        key = (d.id, group_id, updated_after, detail)
        with self._read_ahead_lock:
            if key in self._reading_ahead:
                return
            self._reading_ahead.add(key)
        self._read_ahead_pool.submit(self._build_ahead, key, users, detail)

    def _build_ahead(self, key, users: list[User], detail: bool) -> None:
        store = self.store
        try:
            attr = "_pb_detail" if detail else "_pb"
            for i, u in enumerate(users):
                if getattr(u, attr) is not None:
                    continue
                with store.lock:  # a mutation drops a user's cache under this lock: never cache a stale entry
                    if u.id in store.users:
                        user_entry(store, u, detail)
                if i % 4 == 3:
                    time.sleep(0)  # let the request threads have the GIL
        except Exception:  # a best-effort optimisation must never take the server down
            log.exception("read-ahead failed")
        finally:
            with self._read_ahead_lock:
                self._reading_ahead.discard(key)

    def ListDirectoryGroups(self, request, context):
        self.edge.admit(context)
        size = _page_size(context, request.page_size, DEFAULT_DIRECTORY_PAGE, MAX_DIRECTORY_PAGE)
        updated_after = _us(request.updated_after) if request.HasField("updated_after") else 0
        store = self.store
        with store.lock:
            d = self._directory(context, request.organization_id, request.directory_id)
            scope = f"groups:{d.id}:{updated_after}"
            after = 0
            if request.page_token:
                after = decode_token(request.page_token, scope)
                if after is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token")
            groups, total, next_cursor = store.group_page(d, after, size, updated_after)
            parts = [group_entry(g, request.include_detail) for g in groups]
        parts.append(dpb.ListDirectoryGroupsResponse(
            total_size=total, next_page_token=encode_token(scope, next_cursor) if next_cursor else "",
            prev_page_token=encode_token(scope, 0) if after else "").SerializeToString())
        return b"".join(parts)

    def _toggle(self, request, context, enabled: bool):
        self.edge.admit(context)
        _check_lengths(context, request.organization_id, request.id)
        with self.store.lock:
            d = self._directory(context, request.organization_id, request.id)
            _apply(context, self.mutate, {"op": "enable_directory" if enabled else "disable_directory",
                                          "organization_id": d.organization_id, "directory_id": d.id})
            return dpb.ToggleDirectoryResponse(enabled=d.enabled)

    def EnableDirectory(self, request, context):
        return self._toggle(request, context, True)

    def DisableDirectory(self, request, context):
        return self._toggle(request, context, False)

    def CreateDirectory(self, request, context):
        self.edge.admit(context)
        _check_id(context, request.organization_id, "org", "organization_id")
        _check_lengths(context, request.organization_id)
        if not request.HasField("directory"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "directory is required")
        new = request.directory
        if new.directory_type == dpb.DIRECTORY_TYPE_UNSPECIFIED:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "directory.directory_type is required")
        if new.directory_provider == dpb.DIRECTORY_PROVIDER_UNSPECIFIED:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "directory.directory_provider is required")
        try:
            directory_type = dpb.DirectoryType.Name(new.directory_type)
            provider = dpb.DirectoryProvider.Name(new.directory_provider)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "directory_type and directory_provider must be defined values")
        with self.store.lock:
            applied = _apply(context, self.mutate, {
                "op": "create_directory", "organization_id": request.organization_id, "provider": provider,
                "directory_type": directory_type})
            d = self.store.directories[applied.id]
            return dpb.CreateDirectoryResponse(directory=directory_pb(self.store, d, self.endpoint_base))

    def DeleteDirectory(self, request, context):
        self.edge.admit(context)
        _check_lengths(context, request.organization_id, request.id)
        with self.store.lock:
            d = self._directory(context, request.organization_id, request.id)
            _apply(context, self.mutate, {"op": "delete_directory", "organization_id": d.organization_id,
                                          "directory_id": d.id})
        return empty_pb2.Empty()


class EventsService(egrpc.EventsServiceServicer):
    """Recent events, newest last, as Scalekit's event log lists them (what was also sent as webhooks)."""

    def __init__(self, edge: Edge, recent_events: Callable[[], list[tuple[int, dict]]]):
        self.edge, self.recent_events = edge, recent_events

    def ListEventsPaginated(self, request, context):
        self.edge.admit(context)
        size = _page_size(context, request.page_size, DEFAULT_DIRECTORY_PAGE, MAX_ORG_PAGE)
        f = request.filter
        wanted = set(f.event_types)
        start = _us(f.start_time) if f.HasField("start_time") else 0
        end = _us(f.end_time) if f.HasField("end_time") else 0
        scope = "events"
        offset = 0
        if request.page_token:
            offset = decode_token(request.page_token, scope)
            if offset is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token")
        matching = [(us, e) for us, e in self.recent_events()
                    if (not wanted or e["type"] in wanted)
                    and (not f.organization_id or e["organization_id"] == f.organization_id)
                    and (not start or us >= start) and (not end or us < end)]
        page = matching[offset:offset + size]
        out = []
        for us, e in page:
            msg = epb.ScalekitEvent(spec_version=e["spec_version"], id=e["id"], type=e["type"],
                                    occurred_at=timestamp(us), environment_id=e["environment_id"],
                                    organization_id=e["organization_id"], object=epb.ObjectType.Value(e["object"]))
            msg.data.update(e["data"])
            out.append(msg)
        return epb.ListEventsPaginatedResponse(
            events=out, next_page_token=encode_token(scope, offset + size) if offset + size < len(matching) else "",
            prev_page_token=encode_token(scope, max(0, offset - size)) if offset else "")


# --- server ----------------------------------------------------------------------------------------------------

def _serialize_or_pass(serializer):
    def serialize(response):
        return response if isinstance(response, bytes) else serializer(response)
    return serialize


class _PassBytes(grpc.GenericRpcHandler):
    """Wraps a generated handler so that a servicer may return already-serialized bytes."""

    def __init__(self, inner: grpc.GenericRpcHandler):
        self.inner = inner
        self.cache: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method not in self.cache:
            handler = self.inner.service(handler_call_details)
            if handler is not None and handler.response_serializer is not None:
                handler = handler._replace(response_serializer=_serialize_or_pass(handler.response_serializer))
            self.cache[method] = handler
        return self.cache[method]


class _Registrar:
    """Stands in for the server in the generated ``add_*_to_server`` functions, wrapping their handlers."""

    def __init__(self, server: grpc.Server):
        self.server = server

    def add_generic_rpc_handlers(self, handlers):
        self.server.add_generic_rpc_handlers(tuple(_PassBytes(h) for h in handlers))

    def add_registered_method_handlers(self, service_name, method_handlers):  # newer grpcio code generators
        pass


SERVER_OPTIONS = [
    # The SDK pings idle connections every 60 s: allow it, or the server answers GOAWAY too_many_pings.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


def build_server(store: DirectoryStore, edge: Edge, endpoint_base: str,
                 recent_events: Callable[[], list[tuple[int, dict]]],
                 mutate: Mutate | None = None, workers: int = 8,
                 tls_key_and_cert: tuple[bytes, bytes] | None = None) -> tuple[grpc.Server, int]:
    """The gRPC server on an ephemeral loopback port, and that port. With ``tls_key_and_cert`` it terminates TLS
    itself (the router process pipes the SDK's encrypted bytes to it); without, it speaks plain text (tests, benchmarks)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="emulator-grpc"),
                         options=SERVER_OPTIONS)
    registrar = _Registrar(server)
    ogrpc.add_OrganizationServiceServicer_to_server(OrganizationService(store, edge, mutate, endpoint_base), registrar)
    dgrpc.add_DirectoryServiceServicer_to_server(DirectoryService(store, edge, endpoint_base, mutate), registrar)
    egrpc.add_EventsServiceServicer_to_server(EventsService(edge, recent_events), registrar)
    if tls_key_and_cert is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([tls_key_and_cert]))
    return server, port

