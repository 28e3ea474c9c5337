"""A full sync against the emulator: an id that is not an organization's names no folder and stops no other; small
organizations load together, and one larger than a batch loads alone, each exactly once."""

import pytest

from scim_pipeline.config import settings
from scim_pipeline.scalekit.directory_api import DirectoryAPI
from scim_pipeline.warehouse.connection import Turns, Warehouse
from scim_pipeline.warehouse.directory_sync import sync_organizations
from scim_pipeline_tests.emulator_support import emulator_fixture

emulator = emulator_fixture(seed=21, orgs=5, users_per_org=10, groups_per_org=2)


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


class AlwaysWaited(Turns):
    """Another writer always waits: every turn ends after its first batch."""

    def others_waiting(self) -> bool:
        return True


@pytest.mark.parametrize("turns", [Turns(), AlwaysWaited()], ids=["alone", "others-waiting"])
@pytest.mark.parametrize("batch_users", [1, 10, 25, 1000])
def test_every_organization_is_loaded_once_whatever_the_batch(emulator, tmp_path, monkeypatch, batch_users, turns):
    """Batches of at most ``batch_users`` users: an organization alone when it is larger (1: every one), two
    together (25), or all five in one (1000); and a turn that ends after a batch because another writer waits
    loses none of the organizations already taken."""
    from scim_pipeline.warehouse import directory_sync

    monkeypatch.setattr(directory_sync, "LOAD_BATCH_USERS", batch_users)
    monkeypatch.setattr(directory_sync, "ASK_EVERY_S", 0)
    api = DirectoryAPI(settings().scalekit())
    orgs = [o["organization_id"] for o in api.organizations()]
    warehouse = Warehouse(tmp_path / "w.duckdb")
    report = sync_organizations(api, warehouse, orgs, tmp_path / "spool", workers=1, turns=turns)
    assert not report.failed and sorted(report.synced) == sorted(orgs)
    assert all(counts.users == counts.users_new == 10 for counts in report.synced.values())
    with warehouse.read() as con:
        assert con.execute("SELECT organization_id, count(*) FROM directory_users GROUP BY 1 ORDER BY 1").fetchall() \
            == [(org, 10) for org in sorted(orgs)]
