"""Read a whole Scalekit environment through the real SDK, in the shape of the emulator's ``/_emulator/state``."""

from __future__ import annotations

from google.protobuf.json_format import MessageToDict
from scalekit.v1.directories.directories_pb2 import (
    DirectoryProvider,
    DirectoryType,
    ListDirectoryGroupsRequest,
    ListDirectoryUsersRequest,
)
from scalekit.v1.organizations.organizations_pb2 import GetOrganizationUserManagementSettingsRequest


def list_all_users(client, org_id: str, dir_id: str, page_size: int = 30, **filters) -> list:
    users, token, pages = [], "", 0
    while True:
        response, _call = client.core_client.grpc_exec(
            client.directory.directory_service.ListDirectoryUsers.with_call,
            ListDirectoryUsersRequest(organization_id=org_id, directory_id=dir_id, page_size=page_size,
                                      page_token=token, include_detail=True, **filters))
        users.extend(response.users)
        pages += 1
        assert len(response.users) <= page_size
        token = response.next_page_token
        if not token:
            assert len(users) == response.total_size
            return users
        assert pages < 10_000


def list_all_groups(client, org_id: str, dir_id: str, page_size: int = 30) -> list:
    groups, token = [], ""
    while True:
        response, _call = client.core_client.grpc_exec(
            client.directory.directory_service.ListDirectoryGroups.with_call,
            ListDirectoryGroupsRequest(organization_id=org_id, directory_id=dir_id, page_size=page_size,
                                       page_token=token))
        groups.extend(response.groups)
        token = response.next_page_token
        if not token:
            assert len(groups) == response.total_size
            return groups


def list_all_organizations(client, page_size: int = 2) -> list:
    orgs, token = [], None
    while True:
        response, _call = client.organization.list_organizations(page_size=page_size, page_token=token)
        orgs.extend(response.organizations)
        token = response.next_page_token
        if not token:
            assert len(orgs) == response.total_size
            return orgs


def snapshot(client) -> dict:
    """Everything the SDK can see, as ``/_emulator/state`` shows it."""
    out = []
    for org in list_all_organizations(client):
        directories, users, groups = [], [], []
        for d in client.directory.list_directories(org.id)[0].directories:
            assignments = [(a.group_id, a.role_name) for a in d.role_assignments.assignments]
            directories.append({
                "id": d.id, "name": d.name, "provider": DirectoryProvider.Name(d.directory_provider),
                "directory_type": DirectoryType.Name(d.directory_type), "enabled": d.enabled,
                "role_assignments": [{"group_id": g, "role_name": r} for g, r in assignments],
            })
            dir_groups = list_all_groups(client, org.id, d.id)
            assert d.total_groups == len(dir_groups)
            groups += [{"id": g.id, "directory_id": d.id, "display_name": g.display_name} for g in dir_groups]
            dir_users = list_all_users(client, org.id, d.id)
            assert d.total_users == len(dir_users)
            for u in dir_users:
                detail = MessageToDict(u.user_detail)
                group_ids = [g.id for g in u.groups]
                roles = []
                for gid, role in assignments:
                    if gid in group_ids and role not in roles:
                        roles.append(role)
                users.append({
                    "id": u.id, "directory_id": d.id, "email": u.email, "given_name": u.given_name,
                    "family_name": u.family_name, "preferred_username": u.preferred_username,
                    "active": detail["active"],
                    "groups": [{"id": g.id, "name": g.display_name} for g in u.groups],
                    "roles": [{"role_name": r} for r in roles],
                })
        # The user-management limit is not part of the organization message: its own method reads it.
        limit = client.core_client.grpc_exec(
            client.organization.organization_service.GetOrganizationUserManagementSetting.with_call,
            GetOrganizationUserManagementSettingsRequest(organization_id=org.id))[0].settings
        out.append({"id": org.id, "display_name": org.display_name, "external_id": org.external_id,
                    "metadata": dict(org.metadata),
                    "settings": {"features": [{"name": f.name, "enabled": f.enabled} for f in org.settings.features],
                                 "max_allowed_users": (limit.max_allowed_users.value
                                                       if limit.HasField("max_allowed_users") else None)},
                    "directories": directories, "users": users, "groups": groups})
    return {"organizations": out}
