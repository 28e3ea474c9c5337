"""The management methods (organizations and directories) through the unmodified SDK over TLS, with Scalekit's
answers and error codes; what they change shows in ``/_emulator/state`` and in the mutations and webhooks that
follow."""

import json
import time

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from scalekit.common.exceptions import ScalekitBadRequestException, ScalekitConflictException, ScalekitNotFoundException
from scalekit.v1.directories.directories_pb2 import (
    CreateDirectory,
    CreateDirectoryRequest,
    DirectoryProvider,
    DirectoryType,
)
from scalekit.v1.organizations.organizations_pb2 import (
    CreateOrganization,
    Feature,
    GetOrganizationRequest,
    GetOrganizationUserManagementSettingsRequest,
    UpdateOrganization,
    UpdateOrganizationRequest,
)

from scim_pipeline_tests.devstack.emulator.sdk_reader import list_all_organizations, list_all_users, snapshot
from scim_pipeline_tests.emulator_support import MutationRejected


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.args[0].code()  # the SDK's exception wraps the call's error


def _okta_scim():
    return CreateDirectory(directory_provider=DirectoryProvider.OKTA, directory_type=DirectoryType.SCIM)


def test_organization_lifecycle(emulator, client):
    before = [o.id for o in list_all_organizations(client)]
    created, call = client.organization.create_organization(CreateOrganization(
        display_name="Initech", external_id="tenant-42", metadata={"plan": "growth"}))
    assert call.code() == grpc.StatusCode.OK
    org = created.organization
    assert org.id.startswith("org_") and len(org.id) <= 32
    assert (org.display_name, org.external_id, dict(org.metadata)) == ("Initech", "tenant-42", {"plan": "growth"})
    assert org.create_time.seconds > 0 and org.update_time == org.create_time

    # Readable at once by id, by external id (both ways the SDK has) and in the listing, after the others.
    assert client.organization.get_organization(org.id)[0].organization == org
    assert client.organization.get_organization_by_external_id("tenant-42")[0].organization == org
    service = client.organization.organization_service
    by_rpc = client.core_client.grpc_exec(service.GetOrganizationByExternalId.with_call,
                                          GetOrganizationRequest(external_id="tenant-42"))[0]
    assert by_rpc.organization.id == org.id
    assert [o.id for o in list_all_organizations(client)] == [*before, org.id]
    assert emulator.state(org.id)["organizations"][0] | {"directories": [], "users": [], "groups": []} == {
        "id": org.id, "display_name": "Initech", "external_id": "tenant-42", "metadata": {"plan": "growth"},
        "settings": {"features": [], "max_allowed_users": None}, "directories": [], "users": [], "groups": []}

    # Updates: by id (fields set), by external id, and with a field mask (which may clear a field).
    updated = client.organization.update_organization(org.id, UpdateOrganization(
        display_name="Initrode", metadata={"plan": "enterprise", "region": "emea"}))[0].organization
    assert (updated.display_name, updated.external_id, dict(updated.metadata)) == (
        "Initrode", "tenant-42", {"plan": "enterprise", "region": "emea"})
    assert updated.update_time.ToMicroseconds() > org.update_time.ToMicroseconds()
    by_external = client.organization.update_organization_by_external_id(
        "tenant-42", UpdateOrganization(external_id="tenant-43"))[0].organization
    assert (by_external.id, by_external.external_id, by_external.display_name) == (org.id, "tenant-43", "Initrode")
    masked = client.core_client.grpc_exec(client.organization.organization_service.UpdateOrganization.with_call,
                                          UpdateOrganizationRequest(id=org.id, organization=UpdateOrganization(),
                                                                    update_mask=FieldMask(paths=["metadata"])))[0]
    assert dict(masked.organization.metadata) == {} and masked.organization.display_name == "Initrode"
    truth = emulator.state(org.id)["organizations"][0]
    assert (truth["display_name"], truth["external_id"], truth["metadata"]) == ("Initrode", "tenant-43", {})

    # Settings and user management.
    features = client.organization.update_organization_settings(
        org.id, [{"name": "sso", "enabled": True}, {"name": "dir_sync", "enabled": False}])[0].organization
    assert [(f.name, f.enabled) for f in features.settings.features] == [("sso", True), ("dir_sync", False)]
    again = client.organization.update_organization_settings(org.id, [{"name": "dir_sync", "enabled": True}])[0]
    assert [(f.name, f.enabled) for f in again.organization.settings.features] == [("sso", True), ("dir_sync", True)]
    limit = client.organization.upsert_user_management_settings(org.id, max_allowed_users=45)
    assert limit.max_allowed_users.value == 45
    read = client.core_client.grpc_exec(
        client.organization.organization_service.GetOrganizationUserManagementSetting.with_call,
        GetOrganizationUserManagementSettingsRequest(organization_id=org.id))[0]
    assert read.settings.max_allowed_users.value == 45
    assert emulator.state(org.id)["organizations"][0]["settings"] == {
        "features": [{"name": "sso", "enabled": True}, {"name": "dir_sync", "enabled": True}], "max_allowed_users": 45}
    assert not client.organization.upsert_user_management_settings(org.id).HasField("max_allowed_users")
    assert emulator.state(org.id)["organizations"][0]["settings"]["max_allowed_users"] is None

    link = client.organization.generate_portal_link(org.id, [Feature.dir_sync, Feature.sso])
    assert link.id.startswith("lnk_") and link.location.endswith(f"/portal/{link.id}")
    assert time.time() < link.expire_time.seconds <= time.time() + 61

    # What the SDK reads is still exactly the truth.
    assert snapshot(client) == emulator.state()

    assert client.organization.delete_organization(org.id)[1].code() == grpc.StatusCode.OK
    with pytest.raises(ScalekitNotFoundException):
        client.organization.get_organization(org.id)
    with pytest.raises(ScalekitNotFoundException):
        client.organization.delete_organization(org.id)
    assert [o.id for o in list_all_organizations(client)] == before
    assert emulator.control("GET", "/_emulator/state", params={"organization_id": org.id}).status_code == 404


def test_organization_errors(emulator, client):
    existing = emulator.state()["organizations"][0]
    org_methods = client.organization
    with pytest.raises(ScalekitBadRequestException) as err:  # display_name is required
        org_methods.create_organization(CreateOrganization(external_id="x-1"))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ScalekitBadRequestException):
        org_methods.create_organization(CreateOrganization(display_name="x" * 201))
    with pytest.raises(ScalekitBadRequestException):  # metadata keys are 3 to 25 characters
        org_methods.create_organization(CreateOrganization(display_name="Acme", metadata={"k": "v"}))
    with pytest.raises(ScalekitBadRequestException):
        org_methods.create_organization(CreateOrganization(display_name="Acme", slug="Not A Slug"))
    with pytest.raises(ScalekitConflictException) as err:  # an external id names one organization
        org_methods.create_organization(CreateOrganization(display_name="Acme", external_id=existing["external_id"]))
    assert _code(err) == grpc.StatusCode.ALREADY_EXISTS
    assert len(emulator.state()["organizations"]) == 2  # nothing was created by the refused calls

    with pytest.raises(ScalekitBadRequestException):
        org_methods.get_organization("acme")
    with pytest.raises(ScalekitBadRequestException):
        org_methods.get_organization("org_" + "1" * 40)
    with pytest.raises(ScalekitNotFoundException):
        org_methods.get_organization_by_external_id("no-such-tenant")
    with pytest.raises(ScalekitNotFoundException):
        org_methods.update_organization("org_1", UpdateOrganization(display_name="Nobody"))
    with pytest.raises(ScalekitNotFoundException):
        org_methods.update_organization_by_external_id("no-such-tenant", UpdateOrganization(display_name="Nobody"))
    with pytest.raises(ScalekitBadRequestException):
        org_methods.update_organization(existing["id"], UpdateOrganization(display_name=""))
    with pytest.raises(ScalekitNotFoundException):
        org_methods.delete_organization("org_1")
    with pytest.raises(ScalekitBadRequestException):
        org_methods.delete_organization("dir_1")
    with pytest.raises(ScalekitNotFoundException):
        org_methods.generate_portal_link("org_1")
    with pytest.raises(ScalekitBadRequestException):
        org_methods.update_organization_settings(existing["id"], [{"name": "teleport", "enabled": True}])
    with pytest.raises(ScalekitNotFoundException):
        org_methods.update_organization_settings("org_1", [{"name": "sso", "enabled": True}])
    with pytest.raises(ScalekitBadRequestException):
        org_methods.upsert_user_management_settings(existing["id"], max_allowed_users=-1)
    with pytest.raises(ScalekitNotFoundException):
        org_methods.upsert_user_management_settings("org_1", max_allowed_users=5)
    assert emulator.state(existing["id"])["organizations"][0] == existing


def test_directory_lifecycle_and_onboarding(emulator, client, receiver):
    emulator.set_webhook_url(receiver.url)
    org = client.organization.create_organization(CreateOrganization(display_name="Globex"))[0].organization
    with pytest.raises(Exception, match="Directory does not exist"):
        client.directory.get_primary_directory_by_organization_id(org.id)

    created, call = client.directory.create_directory(org.id, _okta_scim())
    assert call.code() == grpc.StatusCode.OK
    d = created.directory
    assert d.id.startswith("dir_") and d.organization_id == org.id and d.enabled
    assert (d.directory_provider, d.directory_type, d.total_users) == (DirectoryProvider.OKTA, DirectoryType.SCIM, 0)
    assert client.directory.get_directory(org.id, d.id)[0].directory == d
    assert [x.id for x in client.directory.list_directories(org.id)[0].directories] == [d.id]
    assert client.directory.get_primary_directory_by_organization_id(org.id).id == d.id
    second = client.directory.create_directory(org.id, CreateDirectory(
        directory_provider=DirectoryProvider.MICROSOFT_AD, directory_type=DirectoryType.SCIM))[0].directory
    assert [x.id for x in client.directory.list_directories(org.id)[0].directories] == [d.id, second.id]
    assert client.directory.get_primary_directory_by_organization_id(org.id).id == d.id

    # The new directory takes users and groups through the control API; the SDK lists them.
    group_id = emulator.mutate([{"op": "create_group", "organization_id": org.id, "directory_id": d.id,
                                 "display_name": "Engineering"}])[0]["id"]
    results = emulator.mutate([
        {"op": "create_user", "organization_id": org.id, "directory_id": d.id, "groups": [group_id]},
        {"op": "create_user", "organization_id": org.id, "directory_id": d.id,
         "user": {"email": "ada@globex.example.com", "given_name": "Ada"}},
    ])
    users = list_all_users(client, org.id, d.id)
    assert [u.id for u in users] == [r["id"] for r in results]
    assert users[0].email.endswith(".example.com") and users[0].groups[0].display_name == "Engineering"
    assert snapshot(client) == emulator.state()

    # Disable and enable: the answer, the state and the webhooks.
    assert client.directory.disable_directory(org.id, d.id)[0].enabled is False
    assert client.directory.get_directory(org.id, d.id)[0].directory.enabled is False
    assert client.directory.disable_directory(org.id, d.id)[0].enabled is False  # already disabled: no event
    assert client.directory.enable_directory(org.id, d.id)[0].enabled is True
    toggles = [e for e in emulator.events() if e["type"].startswith("organization.directory_")]
    assert [(e["type"], e["organization_id"], e["data"]["id"], e["data"]["enabled"]) for e in toggles] == [
        ("organization.directory_disabled", org.id, d.id, False),
        ("organization.directory_enabled", org.id, d.id, True)]
    delivered = [json.loads(body)["type"] for _, body in receiver.wait_for(len(emulator.events()))]
    assert delivered[-2:] == ["organization.directory_disabled", "organization.directory_enabled"]

    # An enabled directory is not deleted; a disabled one goes with its users and groups.
    with pytest.raises(ScalekitBadRequestException) as err:
        client.directory.delete_directory(org.id, d.id)
    assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
    client.directory.disable_directory(org.id, d.id)
    assert client.directory.delete_directory(org.id, d.id)[1].code() == grpc.StatusCode.OK
    with pytest.raises(ScalekitNotFoundException):
        client.directory.get_directory(org.id, d.id)
    truth = emulator.state(org.id)["organizations"][0]
    assert ([x["id"] for x in truth["directories"]], truth["users"], truth["groups"]) == ([second.id], [], [])
    assert client.directory.get_primary_directory_by_organization_id(org.id).id == second.id

    # Deleting the organization takes its (enabled) directories along, and emits no webhook.
    emulator.mutate([{"op": "create_user", "organization_id": org.id, "directory_id": second.id}])
    events_before = len(emulator.events())
    client.organization.delete_organization(org.id)
    with pytest.raises(ScalekitNotFoundException):
        client.directory.list_directories(org.id)
    with pytest.raises(ScalekitNotFoundException):
        client.directory.get_directory(org.id, second.id)
    assert len(emulator.events()) == events_before
    assert org.id not in {o["id"] for o in emulator.state()["organizations"]}


def test_directory_errors(emulator, client):
    org = emulator.state()["organizations"][0]
    other = emulator.state()["organizations"][1]
    d = org["directories"][0]["id"]
    directory = client.directory
    with pytest.raises(ScalekitNotFoundException):
        directory.create_directory("org_1", _okta_scim())
    with pytest.raises(ScalekitBadRequestException):
        directory.create_directory("acme", _okta_scim())
    with pytest.raises(ScalekitBadRequestException):  # a type is required
        directory.create_directory(org["id"], CreateDirectory(directory_provider=DirectoryProvider.OKTA))
    with pytest.raises(ScalekitBadRequestException):
        client.core_client.grpc_exec(directory.directory_service.CreateDirectory.with_call,
                                     CreateDirectoryRequest(organization_id=org["id"]))
    with pytest.raises(ScalekitNotFoundException):  # a directory of another organization
        directory.get_directory(other["id"], d)
    with pytest.raises(ScalekitNotFoundException):
        directory.enable_directory(other["id"], d)
    with pytest.raises(ScalekitBadRequestException):
        directory.disable_directory(org["id"], "diruser_1")
    with pytest.raises(ScalekitNotFoundException):
        directory.delete_directory(org["id"], "dir_1")
    with pytest.raises(ScalekitBadRequestException):
        directory.delete_directory(org["id"], "dir_" + "1" * 40)
    assert emulator.state(org["id"])["organizations"][0] == org


def test_management_calls_need_a_token(emulator, client):
    from scalekit.v1.organizations.organizations_pb2 import CreateOrganizationRequest
    from scalekit.v1.organizations.organizations_pb2_grpc import OrganizationServiceStub

    stub = OrganizationServiceStub(client.core_client.grpc_secure_channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateOrganization(CreateOrganizationRequest(organization=CreateOrganization(display_name="Forged")),
                                metadata=(("authorization", "Bearer forged"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Forged" not in {o["display_name"] for o in emulator.state()["organizations"]}


def test_organization_and_directory_mutations(emulator):
    results = emulator.mutate([
        {"op": "create_organization", "organization": {"display_name": "Umbrella", "external_id": "umb-1"}},
    ])
    org_id = results[0]["id"]
    assert org_id.startswith("org_") and results[0]["event_ids"] == []
    d = emulator.mutate([{"op": "create_directory", "organization_id": org_id, "provider": "GOOGLE",
                          "enabled": False}])[0]["id"]
    emulator.mutate([{"op": "create_user", "organization_id": org_id, "directory_id": d}])
    truth = emulator.state(org_id)["organizations"][0]
    assert truth["directories"] == [{"id": d, "name": "Google Workspace SCIM", "provider": "GOOGLE",
                                     "directory_type": "SCIM", "enabled": False, "role_assignments": []}]
    assert len(truth["users"]) == 1

    # All or nothing: a refused operation undoes the deletions before it.
    before = emulator.state()
    for batch, reason in [
        ([{"op": "delete_organization", "organization_id": org_id},
          {"op": "create_directory", "organization_id": org_id}], "unknown organization_id"),
        ([{"op": "delete_directory", "directory_id": d},
          {"op": "create_organization", "organization": {"display_name": "Dup", "external_id": "umb-1"}}],
         "already exists"),
        ([{"op": "delete_directory", "directory_id": before["organizations"][0]["directories"][0]["id"]}],
         "disable it before deleting it"),
        ([{"op": "create_organization", "organization": {"external_id": "nameless"}}], "display_name is required"),
        ([{"op": "create_directory", "organization_id": org_id, "provider": "NOVELL"}], "provider must be one of"),
        ([{"op": "update_organization", "organization_id": org_id, "changes": {"colour": "red"}}],
         "unknown organization attribute"),
    ]:
        with pytest.raises(MutationRejected, match=reason):
            emulator.mutate(batch)
        assert emulator.state() == before

    emulator.mutate([{"op": "update_organization", "external_id": "umb-1", "changes": {"display_name": "Umbrella Co"}},
                     {"op": "delete_directory", "organization_id": org_id, "directory_id": d}])
    truth = emulator.state(org_id)["organizations"][0]
    assert (truth["display_name"], truth["directories"], truth["users"]) == ("Umbrella Co", [], [])
    emulator.mutate([{"op": "delete_organization", "organization_id": org_id}])
    assert org_id not in {o["id"] for o in emulator.state()["organizations"]}
