"""The real SDK, over TLS, against an emulator subprocess: listing gives exactly the truth, and the service's rules
(tokens, id prefixes, page sizes, page tokens, filters) hold as in Scalekit."""

import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct
from google.protobuf.timestamp_pb2 import Timestamp
from scalekit.common.exceptions import (
    ScalekitBadRequestException,
    ScalekitNotFoundException,
    ScalekitUnauthorizedException,
)
from scalekit.v1.directories.directories_pb2 import ListDirectoryUsersRequest

from scim_pipeline.devstack.emulator.events import scim_user
from scim_pipeline.devstack.emulator.synthetic import generate
from scim_pipeline_tests.devstack.emulator.sdk_reader import list_all_users, snapshot
from scim_pipeline_tests.emulator_support import RunningEmulator


def _list_users(client, **kw):
    return client.core_client.grpc_exec(client.directory.directory_service.ListDirectoryUsers.with_call,
                                        ListDirectoryUsersRequest(**kw))


def _first_directory(truth):
    org = truth["organizations"][0]
    return org, org["directories"][0]


def test_sdk_reads_exactly_the_truth(shared_emulator):
    truth = shared_emulator.state()
    seen = snapshot(shared_emulator.client())
    assert seen == truth
    orgs = truth["organizations"]
    assert len(orgs) == 3
    assert sum(len(o["users"]) for o in orgs) == 3 * 75
    # The data is realistic enough to exercise a consumer: several directories, providers, inactive users,
    # users in several groups, role assignments.
    assert any(len(o["directories"]) > 1 for o in orgs)
    users = [u for o in orgs for u in o["users"]]
    assert any(not u["active"] for u in users) and any(u["active"] for u in users)
    assert any(len(u["groups"]) > 1 for u in users)
    assert any(u["roles"] for u in users)


def test_state_of_one_organization(shared_emulator):
    truth = shared_emulator.state()
    org = truth["organizations"][1]
    assert shared_emulator.state(org["id"]) == {"organizations": [org]}
    assert shared_emulator.control("GET", "/_emulator/state", params={"organization_id": "org_404"}).status_code == 404


def test_user_detail_is_a_scim_resource(shared_emulator):
    client = shared_emulator.client()
    org, d = _first_directory(shared_emulator.state())
    response, _ = _list_users(client, organization_id=org["id"], directory_id=d["id"], page_size=5,
                              include_detail=True)
    user = response.users[0]
    detail = MessageToDict(user.user_detail)
    assert detail["userName"] == user.preferred_username
    assert detail["name"]["givenName"] == user.given_name and detail["name"]["familyName"] == user.family_name
    assert detail["emails"][0] == {"value": user.email, "type": "work", "primary": True}
    assert [e["value"] for e in detail["emails"]] == list(user.emails)
    assert isinstance(detail["active"], bool)
    enterprise = detail["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]
    assert {"employeeNumber", "department", "costCenter", "division"} <= set(enterprise)
    assert user.updated_at.seconds > 0
    # Without include_detail the detail is left out, as in Scalekit.
    response, _ = _list_users(client, organization_id=org["id"], directory_id=d["id"], page_size=5)
    assert not response.users[0].HasField("user_detail")


def test_user_detail_the_sdk_receives_is_the_scim_resource_built_for_the_user(shared_emulator):
    # The same seed and sizes as the shared emulator build the same directory in this process.
    store, _ = generate(11, 3, 75, 6)
    assert store.truth() == shared_emulator.state()
    client = shared_emulator.client()
    seen = 0
    for org in store.organizations.values():
        for d in org.directories:
            for user in list_all_users(client, org.id, d.id):
                expected = Struct()
                expected.update(scim_user(store, store.users[user.id]))
                assert user.user_detail == expected
                seen += 1
    assert seen == len(store.users)


def test_get_organization_and_directory(shared_emulator):
    client = shared_emulator.client()
    org, d = _first_directory(shared_emulator.state())
    got = client.organization.get_organization(org["id"])[0].organization
    assert (got.id, got.display_name, got.external_id) == (org["id"], org["display_name"], org["external_id"])
    directory = client.directory.get_directory(org["id"], d["id"])[0].directory
    assert directory.id == d["id"] and directory.enabled
    assert directory.total_users == directory.stats.total_users == len([u for u in org["users"]
                                                                         if u["directory_id"] == d["id"]])
    with pytest.raises(ScalekitNotFoundException):
        client.organization.get_organization("org_1")
    with pytest.raises(ScalekitNotFoundException):
        client.directory.get_directory(org["id"], "dir_1")


def test_same_seed_same_data(shared_emulator, tmp_path):
    with RunningEmulator(tmp_path / "again", seed=11, orgs=3, users_per_org=75, groups_per_org=6) as again:
        assert again.state() == shared_emulator.state()
        assert again.env["SCALEKIT_CLIENT_ID"] == shared_emulator.env["SCALEKIT_CLIENT_ID"]
    with RunningEmulator(tmp_path / "other", seed=12, orgs=3, users_per_org=75, groups_per_org=6) as other:
        assert other.state() != shared_emulator.state()


def test_wrong_client_secret_is_refused(shared_emulator):
    with pytest.raises(ScalekitUnauthorizedException):
        shared_emulator.client(client_secret="test_wrong")
    response = shared_emulator.control("POST", "/oauth/token", data={
        "grant_type": "client_credentials", "client_id": shared_emulator.env["SCALEKIT_CLIENT_ID"],
        "client_secret": "nope"})
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"


def test_page_size_above_30_is_invalid(shared_emulator):
    client = shared_emulator.client()
    org, d = _first_directory(shared_emulator.state())
    with pytest.raises(ScalekitBadRequestException):
        _list_users(client, organization_id=org["id"], directory_id=d["id"], page_size=31)
    response, _ = _list_users(client, organization_id=org["id"], directory_id=d["id"], page_size=0)
    assert len(response.users) == 10 and response.next_page_token


def test_bad_id_prefix_is_refused(shared_emulator):
    client = shared_emulator.client()
    org, d = _first_directory(shared_emulator.state())
    with pytest.raises(ScalekitBadRequestException):
        _list_users(client, organization_id=d["id"], directory_id=d["id"], page_size=5)
    with pytest.raises(ScalekitBadRequestException):
        _list_users(client, organization_id=org["id"], directory_id=org["id"], page_size=5)
    with pytest.raises(ScalekitBadRequestException):
        client.directory.list_directories("acme")
    with pytest.raises(ScalekitNotFoundException):
        client.directory.list_directories("org_999")


def test_page_tokens_are_bound_to_their_listing(shared_emulator):
    client = shared_emulator.client()
    org, d = _first_directory(shared_emulator.state())
    response, _ = _list_users(client, organization_id=org["id"], directory_id=d["id"], page_size=3)
    with pytest.raises(ScalekitBadRequestException):
        _list_users(client, organization_id=org["id"], directory_id=d["id"], page_size=3, page_token="garbage")
    with pytest.raises(ScalekitBadRequestException):  # a users token is no good for another filter
        _list_users(client, organization_id=org["id"], directory_id=d["id"], page_size=3,
                    page_token=response.next_page_token, updated_after=Timestamp(seconds=1))


def test_group_and_updated_after_filters(shared_emulator):
    client = shared_emulator.client()
    org, d = _first_directory(shared_emulator.state())
    everyone = list_all_users(client, org["id"], d["id"])
    group_id = everyone[0].groups[0].id
    members = list_all_users(client, org["id"], d["id"], directory_group_id=group_id)
    assert [u.id for u in members] == [u.id for u in everyone if group_id in [g.id for g in u.groups]]
    pivot = sorted(u.updated_at.ToMicroseconds() for u in everyone)[len(everyone) // 2]
    after = Timestamp()
    after.FromMicroseconds(pivot)
    recent = list_all_users(client, org["id"], d["id"], updated_after=after)
    assert {u.id for u in recent} == {u.id for u in everyone if u.updated_at.ToMicroseconds() > pivot}
    with pytest.raises(ScalekitNotFoundException):
        _list_users(client, organization_id=org["id"], directory_id=d["id"], directory_group_id="dirgroup_1")


def test_missing_or_unknown_token_is_unauthenticated(shared_emulator):
    import grpc
    from scalekit.v1.organizations.organizations_pb2 import ListOrganizationsRequest
    from scalekit.v1.organizations.organizations_pb2_grpc import OrganizationServiceStub

    client = shared_emulator.client()
    stub = OrganizationServiceStub(client.core_client.grpc_secure_channel)
    # The channel's own credentials carry a valid token second; a bad first token must still be refused.
    with pytest.raises(grpc.RpcError) as err:
        stub.ListOrganization(ListOrganizationsRequest(), metadata=(("authorization", "Bearer forged"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
