"""A full sync against the emulator: an id that is not an organization's names no folder and stops no other."""

from scim_pipeline.config import settings
from scim_pipeline.scalekit.directory_api import DirectoryAPI
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.directory_sync import sync_organizations
from scim_pipeline_tests.emulator_support import emulator_fixture

emulator = emulator_fixture(seed=21, orgs=2, users_per_org=10, groups_per_org=2)


def test_an_id_that_is_not_an_organizations_fails_alone_and_touches_no_folder(emulator, tmp_path):
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("x")
    api = DirectoryAPI(settings().scalekit())
    org = next(api.organizations())["organization_id"]
    strange = ["../canary", f"{org}/../../canary", f"{org}\n", "..."]
    report = sync_organizations(api, Warehouse(tmp_path / "w.duckdb"), [*strange, org], tmp_path / "spool")
    assert set(report.synced) == {org} and report.synced[org].users == 10
    assert set(report.failed) == set(strange)
    assert all("not a Scalekit organization id" in why for why in report.failed.values())
    assert (canary / "keep").exists()
