"""The pipeline's Scalekit reader against the emulator: paging to the truth, and backoff that rides out faults."""

import pytest

from scim_pipeline.config import settings
from scim_pipeline.lib.retry import RetryPolicy
from scim_pipeline.scalekit import records
from scim_pipeline.scalekit.directory_api import DirectoryAPI, ScalekitError
from scim_pipeline.warehouse.directory_sync import list_organization
from scim_pipeline_tests.emulator_support import emulator_fixture

emulator = emulator_fixture(seed=21, orgs=2, users_per_org=70, groups_per_org=5)


def list_everything(api: DirectoryAPI) -> dict:
    users, groups = {}, {}
    for org in api.organizations():
        for d in api.directories(org["organization_id"]):
            for page in api.user_pages(org["organization_id"], d["directory_id"]):
                users.update({u["user_id"]: u for u in page.records()})
            for page in api.group_pages(org["organization_id"], d["directory_id"]):
                groups.update({g["group_id"]: g for g in page.records()})
    return {"users": users, "groups": groups}


def test_the_reader_rides_out_rate_limits_and_unavailability_with_backoff(emulator):
    emulator.faults(rate_limit_every=3, unavailable_every=4)
    slept = []
    api = DirectoryAPI(settings().scalekit(), RetryPolicy(attempts=6, base_s=0.01, max_delay_s=0.05), sleep=slept.append)
    listed = list_everything(api)
    truth = emulator.state()
    assert set(listed["users"]) == {u["id"] for o in truth["organizations"] for u in o["users"]}
    assert set(listed["groups"]) == {g["id"] for o in truth["organizations"] for g in o["groups"]}
    for org in truth["organizations"]:
        for u in org["users"]:
            row = listed["users"][u["id"]]
            assert (row["email"], row["active"], sorted(g["id"] for g in row["groups"])) == (
                u["email"], u["active"], sorted(g["id"] for g in u["groups"]))
    assert api.retries > 0 and len(slept) == api.retries
    assert all(0 <= s <= 0.05 for s in slept)  # jittered and capped


def test_a_scalekit_that_keeps_failing_is_a_clear_error_after_the_budget(emulator):
    emulator.faults(rate_limit_every=1)
    api = DirectoryAPI(settings().scalekit(), RetryPolicy(attempts=3, base_s=0.01, max_delay_s=0.02), sleep=lambda _: None)
    with pytest.raises(ScalekitError, match="kept failing ListOrganization after 3 attempts"):
        list(api.organizations())


def test_refused_credentials_and_unreachable_scalekit_are_named(emulator, monkeypatch):
    monkeypatch.setenv("SCALEKIT_CLIENT_SECRET", "not-the-secret")
    with pytest.raises(ScalekitError, match="refused the client credentials") as info:
        list(DirectoryAPI(settings().scalekit()).organizations())
    assert "not-the-secret" not in str(info.value)


def test_without_the_c_extension_a_listing_writes_the_same_spool(emulator, tmp_path, monkeypatch):
    api = DirectoryAPI(settings().scalekit())
    org = next(api.organizations())["organization_id"]
    compiled = list_organization(api, org, tmp_path / "c")
    monkeypatch.setattr(records, "_records", None)  # as installed without a C compiler
    fallback = list_organization(api, org, tmp_path / "py")
    assert (compiled.users, compiled.groups) == (fallback.users, fallback.groups) == (70, 5)
    for name in ("users.ndjson", "groups.ndjson"):
        assert (compiled.folder / name).read_bytes() == (fallback.folder / name).read_bytes()
