"""A full sync against the emulator: an id that is not an organization's names no folder and stops no other; small
organizations load together, and one larger than a batch loads alone, each exactly once; two syncs at once keep
their spools apart."""

import os
import threading
import time

import pytest

from scim_pipeline.config import settings
from scim_pipeline.scalekit.directory_api import DirectoryAPI
from scim_pipeline.warehouse.connection import Turns, Warehouse
from scim_pipeline.warehouse.directory import OWNER_LOCK, sync_spool
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


def test_two_syncs_listing_the_same_organizations_at_once_keep_their_spools_apart(emulator, tmp_path):
    """A reconciliation and a ``scim-pipeline sync`` may list the same organization at the same moment: in one
    shared spool folder, one removed or truncated the files the other was writing (a sync failed in CI)."""
    emulator.faults(latency_ms=30)  # the listings overlap for their whole length
    api = DirectoryAPI(settings().scalekit())
    orgs = [o["organization_id"] for o in api.organizations()]
    reports = {}

    def sync(name: str, order: list[str]) -> None:
        warehouse = Warehouse(tmp_path / f"{name}.duckdb")  # two files: only the spool is shared
        reports[name] = sync_organizations(DirectoryAPI(settings().scalekit()), warehouse, order,
                                           tmp_path / "spool", workers=2)

    # In opposite orders, each organization is listed by one sync while the other loads (and removes) it.
    threads = [threading.Thread(target=sync, args=("a", orgs)), threading.Thread(target=sync, args=("b", orgs[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    emulator.faults(latency_ms=0)
    assert sorted(reports) == ["a", "b"]
    for name, report in reports.items():
        assert not report.failed and sorted(report.synced) == sorted(orgs), (name, report.failed)
        with Warehouse(tmp_path / f"{name}.duckdb").read() as con:
            assert con.execute("SELECT count(*) FROM directory_users").fetchone() == (10 * len(orgs),)
    assert list((tmp_path / "spool").iterdir()) == []  # each sync removes its own folder


def test_a_spool_folder_is_removed_once_its_sync_has_died_and_never_while_it_runs(tmp_path):
    root = tmp_path / "spool"
    with sync_spool(root) as running:
        died = root / "sync-died"
        died.mkdir()
        (died / OWNER_LOCK).touch()  # its lock is free: the kernel freed it with the process
        (died / "org_1").mkdir()
        fresh = root / "sync-starting"  # created a moment ago, its lock not taken yet
        fresh.mkdir()
        old = root / "org_2"  # a spool of a version that shared one folder, long ago
        old.mkdir()
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        with sync_spool(root) as second:
            assert running.exists() and second != running
            assert not died.exists() and not old.exists() and fresh.exists()
        assert not second.exists() and running.exists()
    assert not running.exists()


def test_an_organization_named_twice_is_synced_once(emulator, tmp_path):
    api = DirectoryAPI(settings().scalekit())
    org = next(api.organizations())["organization_id"]
    lines = []
    report = sync_organizations(api, Warehouse(tmp_path / "w.duckdb"), [org, org, org], tmp_path / "spool",
                                progress=lines.append)
    assert not report.failed and report.synced[org].users == 10
    assert "[1/1]" in "\n".join(lines)


class ThreadNiceness(DirectoryAPI):
    """The real API, noting the niceness of each thread that lists users."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: set[int] = set()

    def user_pages(self, *args, **kwargs):
        self.seen.add(os.getpriority(os.PRIO_PROCESS, 0))  # on Linux: the calling thread's
        return super().user_pages(*args, **kwargs)


def test_the_listing_threads_give_way_on_the_cpu_and_the_writing_thread_keeps_its_priority(emulator, tmp_path):
    api = ThreadNiceness(settings().scalekit())
    orgs = [o["organization_id"] for o in api.organizations()]
    before = os.getpriority(os.PRIO_PROCESS, 0)
    report = sync_organizations(api, Warehouse(tmp_path / "w.duckdb"), orgs, tmp_path / "spool", workers=2,
                                listing_nice=7)
    assert not report.failed and len(report.synced) == len(orgs)
    assert api.seen == {before + 7}
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # this thread wrote every organization
