"""Benchmark: many small organizations (default 1,000 x 20 users) on one machine.

Starts the emulator (with webhooks to the receiver) and the demo application in a temporary home, then prints:

- discover: one evaluation of the ``discover_organizations`` sensor (lists every organization and its directories,
  adds the partitions), beside the floor measured in the same run: the bare SDK listing every organization's
  directories, groups and users with the same concurrency (``bench/sync.py``'s baseline);
- first sync and a sync with nothing changed: ``run_sync`` (catalogue, full-sync runs, change sets, delivery to the
  application), the way ``scim-pipeline sync`` runs them;
- webhook latency: a user deactivated or reactivated in the emulator until the application shows it, through the
  receiver, the inbox, a ``webhook_events_sensor`` tick and its incremental run executed here (no daemon, so no
  tick interval or queue in the figure), first quiet, then while ``scim-pipeline sync`` re-syncs every
  organization in another process;
- sensor ticks with every organization a partition: ``webhook_events_sensor`` with events just arrived for
  ``--event-orgs`` organizations, and ``delivery_sensor``;
- the asset pages: Dagster's webserver started on the same instance, and the GraphQL queries behind an asset's page
  (partition counts, every partition's status, the latest materializations, one partition's) timed, slowest of the
  assets ``directory_users`` and ``change_sets``.

``--postgres``: Dagster's storage (runs, event log) and the webhook inbox in a PostgreSQL server the benchmark
starts, as ``SCIM_PIPELINE_POSTGRES_URL`` sets up an installation: the way to run this many organizations.

    .venv/bin/python bench/scale.py [--orgs 1000] [--users 20] [--groups 4] [--probes 10] [--postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"first sync": 60.0, "no-change sync": 20.0, "sensor tick": 1.0, "webhook p95 while syncing": 10.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    started = time.monotonic()
    result = fn(*args, **kwargs)
    return time.monotonic() - started, result


class Probe:
    """One directory change at a time, from the emulator to the application, with the sensor run here."""

    def __init__(self, stack, users: list[dict], seed: int = 1):
        import dagster as dg

        from scim_pipeline.config import settings
        from scim_pipeline.defs.instance import dagster_instance
        from scim_pipeline.receiver.inbox import Inbox

        self.dg, self.stack, self.users = dg, stack, users
        self.rng = random.Random(seed)
        self.instance = dagster_instance()
        self.inbox = Inbox(settings().inbox_location)
        self.cursor = str(self.inbox.last_seq())

    def tick(self):
        from scim_pipeline.defs.webhooks.sensor import webhook_events_sensor

        with self.dg.build_sensor_context(instance=self.instance, cursor=self.cursor) as context:
            result = webhook_events_sensor(context)
        return result

    def once(self) -> float:
        from scim_pipeline.definitions import defs

        user = self.rng.choice(self.users)
        want = not user["active"]
        seq = self.inbox.last_seq()
        started = time.monotonic()
        self.stack.mutate([{"op": "reactivate_user" if want else "deactivate_user", "user_id": user["id"]}])
        user["active"] = want
        while self.inbox.last_seq() <= seq:
            time.sleep(0.02)
        result = self.tick()
        if not isinstance(result, self.dg.SkipReason):
            self.cursor = result.cursor
            for request in result.run_requests:
                if request.partition_key == user["org"]:
                    defs.resolve_job_def(request.job_name).execute_in_process(
                        instance=self.instance, partition_key=request.partition_key, run_config=request.run_config,
                        tags=request.tags, raise_on_error=False)
        while time.monotonic() - started < 120:
            state = self.stack.app_state(user["org"])
            if any(u["user_id"] == user["id"] and u["active"] == want for u in state["users"]):
                return time.monotonic() - started
            time.sleep(0.1)
        return float("inf")


ASSET_PAGE_QUERIES = {
    "partition counts": '{ assetNodeOrError(assetKey: {path: ["%s"]}) { ... on AssetNode { partitionStats { '
                        'numMaterialized numPartitions numFailed numMaterializing } } } }',
    "every partition's status": '{ assetNodeOrError(assetKey: {path: ["%s"]}) { ... on AssetNode { '
                                'assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions '
                                'failedPartitions materializingPartitions } } } } }',
    "latest materializations": '{ assetOrError(assetKey: {path: ["%s"]}) { ... on Asset { '
                               'assetMaterializations(limit: 25) { partition timestamp metadataEntries { label } } '
                               '} } }',
    "one partition": '{ assetOrError(assetKey: {path: ["%s"]}) { ... on Asset { '
                     'assetMaterializations(partitions: ["%s"], limit: 1) { timestamp metadataEntries { label } } '
                     '} } }',
}


def asset_page_queries(partition: str) -> dict[str, float]:
    """Seconds for each query behind an asset's page, slowest of two assets, from a webserver on this instance."""
    import httpx

    from scim_pipeline.devstack.services import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("dagster-webserver")), "-m",
                               "scim_pipeline.definitions", "-h", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/server_info", timeout=1).status_code == 200:
                    break
            time.sleep(0.5)
        slowest: dict[str, float] = {}
        for asset in ("directory_users", "change_sets"):
            for name, query in ASSET_PAGE_QUERIES.items():
                query = query % ((asset, partition) if name == "one partition" else asset)
                seconds, response = timed(httpx.post, f"{url}/graphql", json={"query": query}, timeout=120)
                if "errors" in response.json():
                    raise SystemExit(f"asset page query {name!r} failed: {response.text[:300]}")
                slowest[name] = max(slowest.get(name, 0.0), seconds)
        return slowest
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--users", type=int, default=20, help="users per organization")
    parser.add_argument("--groups", type=int, default=4, help="groups per organization")
    parser.add_argument("--probes", type=int, default=10, help="webhook probes, quiet and while syncing each")
    parser.add_argument("--event-orgs", type=int, default=300, help="organizations with new events at the tick")
    parser.add_argument("--postgres", action="store_true", help="Dagster's storage and the inbox in PostgreSQL")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.postgres:
            from scim_pipeline.devstack.postgres import PostgresServer

            os.environ["SCIM_PIPELINE_POSTGRES_URL"] = stack.enter_context(PostgresServer()).create_database("bench")
        else:
            os.environ.pop("SCIM_PIPELINE_POSTGRES_URL", None)
        return run(args)


def run(args) -> int:

    home = Path(tempfile.mkdtemp(prefix="scim-scale-"))
    for var in ("SCALEKIT_ENVIRONMENT_URL", "SCIM_PIPELINE_APP_URL", "DAGSTER_HOME"):
        os.environ.pop(var, None)
    os.environ["SCIM_PIPELINE_HOME"] = str(home)
    import dagster as dg

    from bench.sync import bare_sdk_listing
    from scim_pipeline.commands import run_sync
    from scim_pipeline.defs.directory.automation import discover_organizations
    from scim_pipeline.defs.instance import dagster_instance
    from scim_pipeline.defs.provisioning.delivery import delivery_sensor
    from scim_pipeline.defs.resources import ScalekitResource
    from scim_pipeline.devstack.stack import Stack

    print(f"{args.orgs} organizations x {args.users} users, {args.groups} groups each, Dagster's storage in "
          f"{'PostgreSQL' if args.postgres else 'SQLite'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with Stack(home) as stack:
        stack.start_emulator("--seed", "7", "--orgs", str(args.orgs), "--users-per-org", str(args.users),
                             "--groups-per-org", str(args.groups))
        stack.start_receiver()
        stack.start_app()
        instance = dagster_instance()
        truth = stack.truth()
        org_ids = [o["id"] for o in truth["organizations"]]

        floor, _ = timed(bare_sdk_listing, org_ids, 8)
        with dg.build_sensor_context(instance=instance, resources={"scalekit": ScalekitResource()}) as context:
            discover, result = timed(discover_organizations, context)
        print(f"discover {args.orgs} organizations (sensor):   {discover:6.1f} s   "
              f"({len(result.run_requests)} run requests; bare SDK listing of every directory: {floor:.1f} s)",
              flush=True)
        for request in result.dynamic_partitions_requests:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))

        first, summary = timed(run_sync, say=lambda _: None)
        print(f"first sync:                                {first:6.1f} s   ({summary['users']} users, "
              f"{sum(summary['changes'].values())} changes; {first / floor:.1f}x the bare listing)", flush=True)
        again, summary = timed(run_sync, say=lambda _: None)
        print(f"sync with nothing changed:                 {again:6.1f} s   ({again / floor:.1f}x the bare listing)",
              flush=True)

        users = [{**u, "org": o["id"]} for o in truth["organizations"] for u in o["users"]]
        probe = Probe(stack, users)
        quiet = [probe.once() for _ in range(args.probes)]
        sync = subprocess.Popen([sys.executable, "-m", "scim_pipeline.cli", "sync"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(5)  # the catalogue first: the probes below meet the full-sync runs
        busy = []
        while len(busy) < args.probes and sync.poll() is None:
            busy.append(probe.once())
        sync.wait()
        for label, values in (("quiet", quiet), ("while syncing", busy)):
            if values:
                print(f"webhook to application, {label + ':':15s}  p50 {statistics.median(values):5.1f} s   "
                      f"p95 {percentile(values, 0.95):5.1f} s   max {max(values):5.1f} s   ({len(values)} probes)",
                      flush=True)

        # Events for many organizations at once, then one tick of each sensor.
        chosen = random.Random(2).sample(truth["organizations"], min(args.event_orgs, len(org_ids)))
        seq = probe.inbox.last_seq()
        stack.mutate([{"op": "update_user", "user_id": o["users"][0]["id"], "changes": {"family_name": "Scaled"}}
                      for o in chosen])
        deadline = time.monotonic() + 60
        while probe.inbox.last_seq() < seq + len(chosen) and time.monotonic() < deadline:
            time.sleep(0.1)
        tick, result = timed(probe.tick)
        asked = 0 if isinstance(result, dg.SkipReason) else len(result.run_requests)
        with dg.build_sensor_context(instance=instance) as context:
            delivery_tick, _ = timed(delivery_sensor, context)
        print(f"webhook sensor tick, {len(instance.get_dynamic_partitions('organizations'))} partitions, events of "
              f"{len(chosen)} organizations: {tick:5.2f} s ({asked} run requests)", flush=True)
        print(f"delivery sensor tick:                      {delivery_tick:5.2f} s", flush=True)
        for name, seconds in asset_page_queries(org_ids[0]).items():
            print(f"asset page, {name + ':':28s}  {seconds * 1000:5.0f} ms", flush=True)

    print()
    checks = {"first sync": first, "no-change sync": again, "sensor tick": tick,
              "webhook p95 while syncing": percentile(busy, 0.95) if busy else float("inf")}
    for name, value in checks.items():
        print(f"target {name} <= {TARGETS[name]:g} s: {value:.1f} s {'PASS' if value <= TARGETS[name] else 'FAIL'}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
