"""Listing in worker processes (``scim_pipeline.listing_processes``): the same warehouse as listing in threads, and
a worker that dies fails only what was not listed yet, without hanging the sync."""

import multiprocessing
import os
import signal
import threading

from scim_pipeline.config import settings
from scim_pipeline.directory_api import DirectoryAPI
from scim_pipeline.directory_sync import listing_processes_for, sync_organizations
from scim_pipeline.listing_processes import ListingProcesses
from scim_pipeline.resources.warehouse import Warehouse
from scim_pipeline_tests.emulator_support import RunningEmulator

ORGS = 9


def _sync(home, processes, progress=lambda _: None):
    api = DirectoryAPI(settings().scalekit())
    orgs = sorted(o["organization_id"] for o in api.organizations())
    warehouse = Warehouse(home / "warehouse.duckdb")
    return sync_organizations(api, warehouse, orgs, home / "spool", workers=4, progress=progress,
                              processes=processes), warehouse


def _tables(warehouse):
    with warehouse.read() as con:
        users = set(con.execute("SELECT user_id, organization_id, email, active FROM directory_users "
                                "WHERE deleted_at IS NULL").fetchall())
        memberships = set(con.execute("SELECT organization_id, group_id, user_id FROM directory_user_groups").fetchall())
    return users, memberships


def _truth(emulator):
    truth = emulator.state()
    users = {(u["id"], o["id"], u["email"], u["active"]) for o in truth["organizations"] for u in o["users"]}
    memberships = {(o["id"], g["id"], u["id"]) for o in truth["organizations"] for u in o["users"] for g in u["groups"]}
    return users, memberships


def test_processes_are_chosen_for_many_organizations_only():
    assert listing_processes_for(3, 8) == 0  # starting processes costs more than a few organizations save
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert listing_processes_for(50, 8) == (min(cores, 4) if cores > 1 else 0)
    assert listing_processes_for(50, 1) <= 1


def test_listing_in_processes_loads_exactly_the_directory(home, monkeypatch):
    with RunningEmulator(home, orgs=ORGS, users_per_org=40, groups_per_org=4) as emulator:
        emulator.apply_env(monkeypatch)
        org = emulator.state()["organizations"][0]
        emulator.mutate([{"op": "disable_directory", "directory_id": d["id"]} for d in org["directories"]])
        emulator.faults(latency_ms=5, rate_limit_every=11)  # retried inside the workers
        report, warehouse = _sync(home, processes=2)
        assert set(report.skipped) == {org["id"]} and not report.failed
        assert len(report.synced) == ORGS - 1
        users, memberships = _truth(emulator)
        live = {u for u in users if u[1] != org["id"]}
        assert _tables(warehouse) == (live, {m for m in memberships if m[0] != org["id"]})


def test_a_listing_process_that_dies_fails_what_was_left_and_the_next_sync_completes(home, monkeypatch):
    with RunningEmulator(home, orgs=ORGS, users_per_org=60, groups_per_org=4) as emulator:
        emulator.apply_env(monkeypatch)
        emulator.faults(latency_ms=40)  # slow enough that most organizations are still to list
        killed = threading.Event()

        def kill_a_worker(_line):
            if not killed.is_set():
                killed.set()
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

        report, warehouse = _sync(home, processes=2, progress=kill_a_worker)
        assert killed.is_set()
        assert report.failed, "no organization was outstanding when the worker died"
        assert all("listing process exited" in why for why in report.failed.values())
        assert len(report.synced) + len(report.failed) == ORGS
        assert not multiprocessing.active_children()  # the survivor was stopped and joined too
        with warehouse.read() as con:  # what was reported synced is whole
            for org in report.synced:
                loaded = con.execute("SELECT count(*) FROM directory_users WHERE organization_id = ?", [org]).fetchone()
                assert loaded[0] == report.synced[org].users

        emulator.faults(latency_ms=0)
        report, warehouse = _sync(home, processes=2)
        assert len(report.synced) == ORGS and not report.failed
        assert _tables(warehouse) == _truth(emulator)


def test_the_parent_lists_while_the_workers_start(home, monkeypatch):
    """Starting a worker takes about a second, which the parent spends listing one organization per slot: here
    with its workers killed before they could list anything, exactly those organizations are listed."""
    with RunningEmulator(home, orgs=ORGS, users_per_org=30, groups_per_org=2) as emulator:
        emulator.apply_env(monkeypatch)
        emulator.faults(latency_ms=100)  # each listing takes a few calls: well past the kill
        api = DirectoryAPI(settings().scalekit())
        orgs = sorted(o["organization_id"] for o in api.organizations())
        with ListingProcesses(api, home / "spool", processes=1, threads=3) as lister:
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signal.SIGKILL)
            futures = {lister.submit(org): org for org in orgs}
            outcomes = {org: future.exception(timeout=60) for future, org in futures.items()}
        listed = [org for org, error in outcomes.items() if error is None]
        assert len(listed) == 3  # one for each of the 3 slots
        assert all("listing process exited" in str(error) for error in outcomes.values() if error is not None)
        assert all((home / "spool" / org / "users.ndjson").stat().st_size > 0 for org in listed)
