"""Benchmark: a full directory sync (list through the SDK to spool files, load each organization into DuckDB)
against the bare SDK listing the same data with the same concurrency, in the same run, and its peak memory.

Starts the emulator (in a temporary home, on 127.0.0.1) with ``--orgs`` organizations of ``--users`` users and
``--latency-ms`` of latency per API call, then alternates rounds of:

- baseline: ``ScalekitClient`` + ``core_client.grpc_exec`` listing every organization's directories, groups and
  users (30 a page, with detail, as the pipeline asks), ``--workers`` organizations at a time, data discarded;
- pipeline: ``sync_organizations`` with the same ``workers`` into a fresh DuckDB file; the time spent inside the
  warehouse's writing sessions is measured from outside (a ``Warehouse`` whose ``session`` is timed).

Each side's best round counts (the machines this runs on are shared and noisy); CPU seconds of each side and of the
emulator are shown too. Then the warehouse write alone: the same organizations spooled first (latency off), then
loaded one transaction each into a fresh file with nothing else running. Last, peak memory: a child process syncs
ONE organization of ``--big-users`` users (no latency) and reports its own RSS after imports and its high-water
mark (VmHWM).

    python bench/sync.py [--orgs 50] [--users 2000] [--latency-ms 20] [--big-users 200000] [--workers 8]
                         [--repeat 3] [--dagster] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RATIO = 1.3
TARGET_PEAK_MB = 400
PAGE_SIZE = 30


def proc_status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MB, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """This process's CPU time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """CPU time of another process (the emulator: it shares the machine's cores with the side being measured)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Clock:
    def __init__(self, other_pids: tuple[int, ...] = ()):
        self.other_pids = other_pids
        self.wall = time.perf_counter()
        self.cpu = cpu_seconds()
        self.other = self._others()

    def _others(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.other_pids)

    def stop(self) -> tuple[float, float, float]:
        """Wall seconds, this process's CPU seconds, the other processes' CPU seconds."""
        return time.perf_counter() - self.wall, cpu_seconds() - self.cpu, self._others() - self.other


def timed_warehouse(path: Path):
    """A Warehouse whose writing sessions (connect, each organization's transaction, close) are timed."""
    from scim_pipeline.warehouse.connection import Warehouse

    class TimedWarehouse(Warehouse):
        seconds = 0.0
        transactions = 0

        @contextmanager
        def session(self):
            started = time.perf_counter()
            try:
                with super().session() as con:
                    yield con
            finally:
                self.seconds += time.perf_counter() - started
                self.transactions += 1

    return TimedWarehouse(path)


def scalekit_settings():
    from scim_pipeline.config import settings

    return settings().scalekit()


# --- the two sides ---------------------------------------------------------------------------------------------------

def bare_sdk_listing(org_ids: list[str], workers: int) -> int:
    """Every organization's directories, groups and users through the bare SDK; returns the number of users seen."""
    from scalekit import ScalekitClient
    from scalekit.v1.directories.directories_pb2 import (
        ListDirectoriesRequest,
        ListDirectoryGroupsRequest,
        ListDirectoryUsersRequest,
    )

    config = scalekit_settings()
    client = ScalekitClient(config.environment_url, config.client_id, config.client_secret)
    service = client.directory.directory_service
    grpc_exec = client.core_client.grpc_exec

    def pages(method, request_type, field, org, directory_id) -> int:
        seen, token = 0, ""
        while True:
            page, _ = grpc_exec(method.with_call, request_type(
                organization_id=org, directory_id=directory_id, page_size=PAGE_SIZE, include_detail=True,
                page_token=token))
            items = getattr(page, field)
            seen += len(items)
            token = page.next_page_token
            if not token or not items:
                return seen

    def one(org: str) -> int:
        listing, _ = grpc_exec(service.ListDirectories.with_call, ListDirectoriesRequest(organization_id=org))
        users = 0
        for d in listing.directories:
            if d.enabled:  # the same order as the pipeline: groups, then users
                pages(service.ListDirectoryGroups, ListDirectoryGroupsRequest, "groups", org, d.id)
                users += pages(service.ListDirectoryUsers, ListDirectoryUsersRequest, "users", org, d.id)
        return users

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(org_ids)))) as pool:
        return sum(pool.map(one, org_ids))


def pipeline_sync(org_ids: list[str], workers: int, folder: Path):
    from scim_pipeline.scalekit.directory_api import DirectoryAPI
    from scim_pipeline.warehouse.directory_sync import sync_organizations

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    warehouse = timed_warehouse(folder / "warehouse.duckdb")
    report = sync_organizations(DirectoryAPI(scalekit_settings()), warehouse, org_ids, folder / "spool",
                                workers=workers, progress=lambda _: None)
    if report.failed or report.skipped:
        raise SystemExit(f"pipeline sync did not sync everything: failed {report.failed}, skipped {report.skipped}")
    return report, warehouse


def write_alone(org_ids: list[str], workers: int, folder: Path) -> tuple[float, float, int]:
    """Spool every organization first, then time loading the spools, nothing else running."""
    from scim_pipeline.lib.clock import utcnow
    from scim_pipeline.scalekit.directory_api import DirectoryAPI
    from scim_pipeline.warehouse.directory import load_snapshot, upsert_directories
    from scim_pipeline.warehouse.directory_sync import list_organization, tune

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    api = DirectoryAPI(scalekit_settings())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        spools = list(pool.map(lambda org: list_organization(api, org, folder / "spool"), org_ids))
    warehouse = timed_warehouse(folder / "warehouse.duckdb")
    clock = Clock()
    # As sync_organizations loads organizations that are ready: one session, one transaction each.
    with warehouse.write() as con:
        tune(con)
        for i, spool in enumerate(spools):
            if i:
                con.execute("COMMIT")
                con.execute("BEGIN TRANSACTION")
            upsert_directories(con, spool.directories, utcnow(), spool.listed_at)
            load_snapshot(con, spool, utcnow())
    wall, cpu, _ = clock.stop()
    return wall, cpu, sum(s.users for s in spools)


# --- peak memory, in a child process of its own ------------------------------------------------------------------------

def memory_child(folder: Path) -> None:
    """Sync every organization of the emulator named by the environment; print RSS figures as one JSON line."""
    from scim_pipeline.scalekit.directory_api import DirectoryAPI
    from scim_pipeline.warehouse.connection import Warehouse
    from scim_pipeline.warehouse.directory_sync import sync_organizations

    api = DirectoryAPI(scalekit_settings())
    org_ids = [o["organization_id"] for o in api.organizations()]
    imported_mb = proc_status_mb("VmRSS")
    clock = Clock()
    report = sync_organizations(api, Warehouse(folder / "warehouse.duckdb"), org_ids, folder / "spool",
                                progress=lambda _: None)
    wall, cpu, _ = clock.stop()
    print(json.dumps({"imported_mb": imported_mb, "peak_mb": proc_status_mb("VmHWM"), "end_mb": proc_status_mb("VmRSS"),
                      "users": report.total("users"), "failed": report.failed, "wall": wall, "cpu": cpu}), flush=True)


def measure_memory(users: int, groups: int, root: Path, timeout: float) -> dict:
    from scim_pipeline_tests.emulator_support import RunningEmulator

    home = root / "big"
    with RunningEmulator(home, orgs=1, users_per_org=users, groups_per_org=groups, timeout=timeout) as emulator:
        env = {**os.environ, **emulator.env, "SCIM_PIPELINE_HOME": str(home)}
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(home / "child")],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
    if child.returncode != 0:
        raise SystemExit(f"memory child failed ({child.returncode}):\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


# --- optional: the whole Dagster path ------------------------------------------------------------------------------

def dagster_sync(home: Path) -> float:
    """``run_sync`` (catalogue, directory sync, derived assets, change sets, delivery to the demo application)."""
    from scim_pipeline.commands import run_sync
    from scim_pipeline.devstack import services

    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    app = services.start("app", [], home, ready=lambda s: (home / "app.env").exists()
                         and services.port_open("127.0.0.1", s.port))
    try:
        clock = Clock()
        run_sync(say=lambda _: None)
        return clock.stop()[0]
    finally:
        app.stop()


# --- the run ---------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orgs", type=int, default=50)
    parser.add_argument("--users", type=int, default=2000, help="users per organization")
    parser.add_argument("--groups", type=int, default=12, help="groups per organization")
    parser.add_argument("--latency-ms", type=int, default=20)
    parser.add_argument("--big-users", type=int, default=200_000, help="users of the one organization of the memory run")
    parser.add_argument("--workers", type=int, default=8, help="organizations listed at once (both sides)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of baseline and pipeline; the best counts")
    parser.add_argument("--dagster", action="store_true", help="also time the whole Dagster path (run_sync) once")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--memory-child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(Path(args.memory_child))
        return 0
    if args.quick:
        args.orgs, args.users, args.latency_ms, args.big_users, args.repeat = 4, 300, 5, 20_000, 1

    from scim_pipeline.scalekit.directory_api import DirectoryAPI
    from scim_pipeline_tests.emulator_support import RunningEmulator

    root = Path(tempfile.mkdtemp(prefix="scim-bench-sync-"))
    home = root / "home"
    os.environ["SCIM_PIPELINE_HOME"] = str(home)
    timeout = 120 + args.orgs * args.users / 2000 + args.big_users / 1000  # generation grows with the data
    failed = False
    try:
        print(f"{args.orgs} organizations x {args.users} users, {args.groups} groups each; "
              f"{args.latency_ms} ms per API call; {args.workers} workers; {args.repeat} round(s)", flush=True)
        with RunningEmulator(home, orgs=args.orgs, users_per_org=args.users, groups_per_org=args.groups,
                             timeout=timeout) as emulator:
            os.environ.update(emulator.env)  # the SDK (and settings()) read the emulator's URL, credentials and CA
            org_ids = sorted(o["organization_id"] for o in DirectoryAPI(scalekit_settings()).organizations())
            # Untimed warm-up: the emulator serializes each user on first read and serves its cached bytes after.
            bare_sdk_listing(org_ids, args.workers)
            emulator.faults(latency_ms=args.latency_ms)
            # The emulator and its router process (see emulator/router.py) share the machine's cores with each side.
            pids = (emulator.service.process.pid, emulator.control("GET", "/_emulator/healthz").json()["router_pid"])

            base, pipe, writes, counts = [], [], [], set()
            for round_ in range(args.repeat):
                # Alternate which side goes first, so that both meet the same drift in background load.
                for side in (("baseline", "pipeline") if round_ % 2 == 0 else ("pipeline", "baseline")):
                    clock = Clock(pids)
                    if side == "baseline":
                        users = bare_sdk_listing(org_ids, args.workers)
                        base.append(clock.stop())
                        counts.add(users)
                    else:
                        # A fresh path each round: DuckDB reopening a path deleted in the same process found no tables.
                        shutil.rmtree(root / f"pipeline-{round_ - 1}", ignore_errors=True)
                        report, warehouse = pipeline_sync(org_ids, args.workers, root / f"pipeline-{round_}")
                        pipe.append(clock.stop())
                        writes.append((warehouse.seconds, warehouse.transactions))
                        counts.add(report.total("users"))
                print(f"  round {round_ + 1}: baseline {base[-1][0]:.2f}s, pipeline {pipe[-1][0]:.2f}s "
                      f"(writes {writes[-1][0]:.2f}s)", flush=True)

            if len(counts) != 1:  # both sides must have read the same directory
                raise SystemExit(f"the rounds saw different numbers of users: {sorted(counts)}")
            emulator.faults(latency_ms=0)
            alone_wall, alone_cpu, alone_users = write_alone(org_ids, args.workers, root / "alone")
            dagster_wall = dagster_sync(home) if args.dagster else None

        b_wall, b_cpu, b_emu = min(base)
        best = min(range(len(pipe)), key=lambda i: pipe[i][0])
        p_wall, p_cpu, p_emu = pipe[best]
        w_in_pipe, transactions = writes[best]
        ratio = p_wall / b_wall
        ratios = [p[0] / b[0] for p, b in zip(pipe, base)]
        print()
        print(f"{'':34}{'wall s':>9}{'cpu s':>9}{'emulator cpu s':>16}")
        print(f"{'baseline: bare SDK listing':34}{b_wall:9.2f}{b_cpu:9.2f}{b_emu:16.2f}")
        print(f"{'pipeline: sync_organizations':34}{p_wall:9.2f}{p_cpu:9.2f}{p_emu:16.2f}")
        print(f"{'  of which in write transactions':34}{w_in_pipe:9.2f}{'':>9}   ({transactions} warehouse sessions)")
        print(f"{'warehouse write alone':34}{alone_wall:9.2f}{alone_cpu:9.2f}   ({alone_users} users)")
        if dagster_wall is not None:
            print(f"{'Dagster path: run_sync (all)':34}{dagster_wall:9.2f}")
        print()
        print(f"pipeline / baseline: {ratio:.2f}x (best rounds; per round: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f})")
        print(f"write share: {w_in_pipe / p_wall:.0%} of the pipeline's wall time in write transactions; "
              f"write alone is {alone_wall / b_wall:.0%} of the baseline")
        verdict = ratio <= TARGET_RATIO
        failed |= not verdict
        print(f"speed target pipeline <= {TARGET_RATIO}x baseline: {'PASS' if verdict else 'FAIL'}", flush=True)

        if not args.no_memory:
            print(f"\npeak memory: one organization of {args.big_users} users, no latency, in a child process ...",
                  flush=True)
            mem = measure_memory(args.big_users, args.groups, root, timeout + args.big_users / 200)
            if mem["failed"] or mem["users"] != args.big_users:
                raise SystemExit(f"memory run synced {mem['users']} users, failed: {mem['failed']}")
            verdict = mem["peak_mb"] < TARGET_PEAK_MB
            failed |= not verdict
            print(f"  RSS after imports {mem['imported_mb']:.0f} MB, peak {mem['peak_mb']:.0f} MB, at exit "
                  f"{mem['end_mb']:.0f} MB; sync took {mem['wall']:.1f}s wall, {mem['cpu']:.1f}s cpu")
            print(f"memory target peak < {TARGET_PEAK_MB} MB: {'PASS' if verdict else 'FAIL'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
