"""Soak: a bad week in a few minutes. Random directory churn arrives as webhooks (some dropped, duplicated,
reordered) while the webhook receiver, the Dagster run workers and the application are each killed with SIGKILL
and restarted, and the application fails 20% of its requests and rate-limits 10%. Then the application recovers,
an operator approves what the mass-deprovisioning guard held, one reconciliation runs, and the benchmark prints
what matters:

- changes applied twice by the application (must be 0): idempotency held through every crash;
- differences left between the application and the directory's truth with the role mapping applied (must be 0).

Everything runs on this machine: the emulator, the receiver, the demo application and the Dagster daemon, in a
temporary home.

    python bench/chaos.py [--minutes 4] [--orgs 4] [--users-per-org 60] [--changes-per-minute 60]
                          [--kill-every 20] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _started_run_pids(instance) -> list[int]:
    """The processes of the runs in progress (each run's RUN_START event names its process)."""
    import dagster as dg

    pids = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]), limit=20):
        start = instance.get_records_for_run(record.dagster_run.run_id, of_type=dg.DagsterEventType.RUN_START,
                                             limit=1).records
        if start and start[0].event_log_entry.dagster_event.pid:
            pids.append(start[0].event_log_entry.dagster_event.pid)
    return pids


def _churn(truth: dict, rng: random.Random, burst) -> list[dict]:
    """Two user changes (the demo's mix of hires, leavers, returners, renames and moves), and now and then a group
    created, renamed or deleted somewhere, so that no organization runs out of groups."""
    ops = burst(truth, rng, 2)[:-2]  # the demo's burst ends by renaming and deleting a group of its first org
    org = rng.choice(truth["organizations"])
    draw = rng.random()
    if draw < 0.1 and org["groups"]:
        directory = org["groups"][0]["directory_id"]
        ops.append({"op": "create_group", "organization_id": org["id"], "directory_id": directory,
                    "display_name": f"Chaos {rng.randrange(10**6)}"})
    elif draw < 0.2 and org["groups"]:
        group = rng.choice(org["groups"])
        ops.append({"op": "rename_group", "group_id": group["id"], "display_name": group["display_name"] + " II"})
    elif draw < 0.25 and len(org["groups"]) > 3:
        ops.append({"op": "delete_group", "group_id": rng.choice(org["groups"])["id"]})
    return ops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="how long the churn and the killing go on")
    parser.add_argument("--orgs", type=int, default=4)
    parser.add_argument("--users-per-org", type=int, default=60)
    parser.add_argument("--changes-per-minute", type=int, default=60)
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between two kills")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="scim-chaos-"))
    for var in ("SCALEKIT_ENVIRONMENT_URL", "SCALEKIT_CLIENT_ID", "SCALEKIT_CLIENT_SECRET", "SCALEKIT_WEBHOOK_SECRET",
                "SCIM_PIPELINE_APP_URL", "SCIM_PIPELINE_APP_SECRET", "DAGSTER_HOME"):
        os.environ.pop(var, None)
    os.environ["SCIM_PIPELINE_HOME"] = str(home)
    os.environ["SCIM_PIPELINE_RECONCILE_CRON"] = "0 0 1 1 *"  # the one reconciliation is this benchmark's own

    from scim_pipeline import config
    from scim_pipeline.cli import main as cli
    from scim_pipeline.commands import query, run_sync
    from scim_pipeline.defs.instance import dagster_instance
    from scim_pipeline.devstack.convergence import differences
    from scim_pipeline.devstack.demo import _settle, burst
    from scim_pipeline.devstack.services import free_port
    from scim_pipeline.devstack.stack import Stack
    from scim_pipeline.provisioning.role_mapping import load_role_mapping

    rng = random.Random(args.seed)
    kills: Counter = Counter()
    print(f"chaos: {args.orgs} organizations x {args.users_per_org} users, {args.changes_per_minute} changes a "
          f"minute for {args.minutes:g} min, a kill every {args.kill_every:g}s (home {home})", flush=True)
    with Stack(home) as stack:
        stack.start_emulator("--seed", str(args.seed), "--orgs", str(args.orgs), "--users-per-org",
                             str(args.users_per_org), "--groups-per-org", "6", "--retry-time-scale", "60")
        stack.start_receiver()
        receiver_port = stack.receiver.port  # a receiver restarted after a kill comes back on it
        faulty_app = ("--fail-rate", "0.2", "--rate-limit-rate", "0.1")
        app_port = free_port()
        stack.start_app(*faulty_app, port=app_port)
        run_sync(say=lambda m: None)
        stack.start_daemon()
        instance = dagster_instance()
        stack.faults(webhook_drop_rate=0.05, webhook_duplicate_rate=0.1, webhook_reorder_window=3)

        victims = ["receiver", "run worker", "application"]
        started = time.monotonic()
        next_kill = started + args.kill_every
        applied = 0
        while time.monotonic() - started < args.minutes * 60:
            try:
                applied += len(stack.mutate(_churn(stack.truth(), rng, burst))["results"])
            except Exception as exc:  # the directory changed under the plan: draw again next time
                print(f"  (a burst was refused: {str(exc)[:80]})", flush=True)
            if time.monotonic() >= next_kill:
                victim = victims[kills.total() % len(victims)]
                if victim == "receiver":
                    stack.receiver.kill()
                    stack.services.remove(stack.receiver)
                    stack.start_receiver(receiver_port)
                elif victim == "application":
                    stack.app.kill()
                    stack.services.remove(stack.app)
                    stack.start_app(*faulty_app, port=app_port)
                else:
                    for pid in _started_run_pids(instance):
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                kills[victim] += 1
                print(f"  {time.monotonic() - started:5.0f}s: killed the {victim}", flush=True)
                next_kill += args.kill_every
            time.sleep(max(0.2, 60.0 * 2 / args.changes_per_minute))

        print(f"churn over: {applied} directory changes; kills: {dict(kills)}", flush=True)
        stack.faults(webhook_drop_rate=0, webhook_duplicate_rate=0, webhook_reorder_window=0)
        stack.app.stop()
        stack.services.remove(stack.app)
        stack.start_app(port=app_port)  # the application recovers
        _settle(stack, 300)
        # Minutes of churn on small directories add up past the mass-deprovisioning guard; an operator reviews and
        # approves, as the README says (the guard has tests of its own).
        held = query("SELECT DISTINCT organization_id FROM change_sets WHERE status = 'held'").organization_id
        for org in held:
            cli(["approve", "--org", org])
        print("reconciliation ...", flush=True)
        run_sync(say=lambda m: None, delivery_backoff_s=1.0)
        _settle(stack, 300)

        truth = stack.truth()
        stats = stack.app_stats()
        diffs = differences(stack.app_state(), truth, load_role_mapping(config.settings().role_mappings_path()),
                            limit=3)
        applied_twice = sum(1 for n in stats["applications"].values() if n > 1)
        print(f"application: {stats['changes_applied']} changes applied, each at most "
              f"{stats['max_applications']} time(s)")
        for line in diffs:
            print("  " + line)
        print(f"changes applied twice: {applied_twice}")
        print(f"differences left: {len(diffs)}")
        return 0 if applied_twice == 0 and not diffs else 1


if __name__ == "__main__":
    sys.exit(main())
