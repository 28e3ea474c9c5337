"""``scim-pipeline demo`` and ``scim-pipeline dev``: the whole product on the embedded services.

demo: a full sync, delivery, a burst of directory changes arriving as signed webhooks (some dropped, some sent
twice, some out of order), incremental runs through the Dagster daemon's sensors, latency probes, and a
reconciliation; then it compares the application with the directory and says ``converged: yes`` or ``no``.
dev: the same services with live directory churn, and Dagster's webserver and daemon with sensors and schedules on.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import time
from pathlib import Path

from scim_pipeline import config
from scim_pipeline.devstack.convergence import differences
from scim_pipeline.devstack.stack import Stack
from scim_pipeline.provisioning.role_mapping import load_role_mapping

DEMO_EMULATOR = ["--seed", "7", "--orgs", "5", "--users-per-org", "200", "--groups-per-org", "12",
                 "--retry-time-scale", "60"]
BURST_SIZE = 40
PROBES = 6


def say(message: str = "") -> None:
    print(message, flush=True)


def _fresh_home() -> Path:
    """The demo's own folder inside the installation's home, emptied each time (the TLS material is kept)."""
    root = Path(os.environ.get(config.HOME_VAR) or config.DEFAULT_HOME).expanduser().resolve()
    demo = root / "demo"
    if demo.exists():
        for child in demo.iterdir():
            if child.name != "tls":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    demo.mkdir(parents=True, exist_ok=True)
    return demo


def _embedded_environment(home: Path) -> None:
    """The demo always runs on its own embedded services and storage (a fresh home each time, no shared database),
    whatever the shell points at."""
    for var in ("SCALEKIT_ENVIRONMENT_URL", "SCALEKIT_CLIENT_ID", "SCALEKIT_CLIENT_SECRET", "SCALEKIT_WEBHOOK_SECRET",
                "SCIM_PIPELINE_APP_URL", "SCIM_PIPELINE_APP_SECRET", "SCIM_PIPELINE_APP_PROTOCOL",
                "SCIM_PIPELINE_APP_TOKEN", "SCIM_PIPELINE_APP_TENANTS", "DAGSTER_HOME", "SCIM_PIPELINE_POSTGRES_URL"):
        os.environ.pop(var, None)
    os.environ[config.HOME_VAR] = str(home)


def burst(truth: dict, rng: random.Random, size: int) -> list[dict]:
    """Realistic directory changes: hires, leavers, returners, renames, team moves, a renamed and a deleted group.
    Each user is touched once, and moves stay inside the user's own directory (as in a real directory)."""
    ops: list[dict] = []
    touched: set[str] = set()
    orgs = truth["organizations"]
    for i in range(size):
        org = orgs[i % len(orgs)]
        user = rng.choice([u for u in org["users"] if u["id"] not in touched])
        touched.add(user["id"])
        same_directory = [g for g in org["groups"] if g["directory_id"] == user["directory_id"]]
        kind = rng.choice(["hire", "leave", "rename", "move", "move", "hire", "leave", "reactivate"])
        if kind == "hire" and same_directory:
            group = rng.choice(same_directory)
            ops.append({"op": "create_user", "organization_id": org["id"], "directory_id": group["directory_id"],
                        "user": {"given_name": "Demo", "family_name": f"Hire{i}",
                                 "email": f"demo.hire{i}@{org['id'][-6:]}.example.com"},
                        "groups": [group["id"]]})
        elif kind == "leave" and user["active"]:
            ops.append({"op": "deactivate_user", "user_id": user["id"]})
        elif kind == "reactivate" and not user["active"]:
            ops.append({"op": "reactivate_user", "user_id": user["id"]})
        elif kind == "move" and same_directory:
            target = rng.choice(same_directory)
            if target["id"] not in {g["id"] for g in user["groups"]}:
                ops.append({"op": "add_member", "group_id": target["id"], "user_id": user["id"]})
            for g in user["groups"][:1]:
                if g["id"] != target["id"]:
                    ops.append({"op": "remove_member", "group_id": g["id"], "user_id": user["id"]})
        else:
            ops.append({"op": "update_user", "user_id": user["id"], "changes": {"family_name": f"Renamed{i}"}})
    groups = orgs[0]["groups"]
    ops.append({"op": "rename_group", "group_id": groups[0]["id"], "display_name": groups[0]["display_name"] + " (renamed)"})
    ops.append({"op": "delete_group", "group_id": groups[-1]["id"]})
    return ops


def _probe(stack: Stack, org: str, user: dict, timeout: float = 60.0) -> float | None:
    """Deactivate or reactivate one user and time it until the application shows it."""
    want_active = not user["active"]
    started = time.monotonic()
    stack.mutate([{"op": "reactivate_user" if want_active else "deactivate_user", "user_id": user["id"]}])
    while time.monotonic() - started < timeout:
        for u in stack.app_state(org)["users"]:
            if u["user_id"] == user["id"] and u["active"] == want_active:
                return time.monotonic() - started
        time.sleep(0.25)  # the probe must not load the machine it measures
    return None


def _settle(stack: Stack, timeout: float) -> bool:
    """Wait until, for longer than one sensor loop, no run is queued or in progress and nothing in the outbox is due."""
    import dagster as dg

    from scim_pipeline.defs.instance import dagster_instance
    from scim_pipeline.lib.clock import utcnow
    from scim_pipeline.provisioning.outbox_index import OutboxIndex

    instance = dagster_instance()
    outbox = OutboxIndex(config.settings().outbox_index_path)
    quiet_since = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = instance.get_run_records(dg.RunsFilter(statuses=[
            dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
            dg.DagsterRunStatus.STARTED]), limit=1)
        if busy or outbox.due(utcnow()):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 6:  # longer than one sensor loop: nothing new was picked up
            return True
        time.sleep(0.5)
    return False


def _applied_once(stack: Stack) -> tuple[str, bool]:
    """What the application says of how often it applied changes: the demo application counts each change's
    applications; a SCIM application must hold no account or group twice (per tenant, by externalId and name)."""
    if stack.scim2 is None:
        stats = stack.app_stats()
        return (f"{stats['changes_applied']} changes applied, each at most {stats['max_applications']} time(s)",
                stats["max_applications"] <= 1)
    state = stack.app_state()
    keys = [("user", u["organization_id"], u["user_id"]) for u in state["users"]]
    keys += [("userName", u["organization_id"], (u["user_name"] or "").lower()) for u in state["users"]]
    keys += [("group", g["organization_id"], g["group_id"]) for g in state["groups"]]
    twice = len(keys) - len(set(keys))
    return (f"{len(state['users'])} users and {len(state['groups'])} groups read back over SCIM, "
            f"{twice} held twice", twice == 0)


def run_demo(app: str = "demo") -> bool:
    from scim_pipeline.commands import print_summary, run_sync, summarize

    home = _fresh_home()
    _embedded_environment(home)
    say(f"scim-pipeline demo (data in {home})")
    started = time.monotonic()
    with Stack(home) as stack:
        say("Starting the Scalekit emulator, the webhook receiver and "
            + ("a SCIM 2.0 application (scim2-server) ..." if app == "scim2" else "the demo application ..."))
        stack.start_emulator(*DEMO_EMULATOR)
        stack.start_receiver()
        stack.start_scim2_app() if app == "scim2" else stack.start_app()
        say(f"  emulator {stack.emulator_env['SCALEKIT_ENVIRONMENT_URL']}, receiver {stack.receiver.url}, "
            f"application {stack.app.url}")

        say("\n1. Full sync of every organization, then delivery")
        run_sync(say=lambda m: say("   " + m))

        say("\n2. Starting the Dagster daemon (sensors: webhooks, delivery, discovery) ...")
        stack.start_daemon()

        say(f"\n3. A burst of {BURST_SIZE} directory changes, as signed webhooks: 10% dropped, 20% sent twice, "
            "reordered in windows of 4")
        stack.faults(webhook_drop_rate=0.1, webhook_duplicate_rate=0.2, webhook_reorder_window=4)
        rng = random.Random(7)
        results = stack.mutate(burst(stack.truth(), rng, BURST_SIZE))["results"]
        say(f"   {len(results)} mutations applied in the directory, "
            f"{sum(len(r['event_ids']) for r in results)} events sent")
        stack.faults(webhook_drop_rate=0, webhook_duplicate_rate=0, webhook_reorder_window=0)
        if not _settle(stack, 180):
            say("   (runs still busy after 3 minutes)")

        say(f"\n4. Latency probes: {PROBES} leavers and returners, webhook to application")
        truth = stack.truth()
        # Only users the application already shows as the directory does (a dropped webhook may still be pending):
        # otherwise a probe would time a change that was already there.
        shown = {u["user_id"]: u["active"] for u in stack.app_state()["users"]}
        candidates = [(o["id"], u) for o in truth["organizations"] for u in o["users"]
                      if shown.get(u["id"]) == u["active"]]
        latencies = []
        for org, user in rng.sample(candidates, PROBES):
            latency = _probe(stack, org, user)
            say(f"   {user['email']}: " + (f"{latency:.1f}s" if latency is not None else "not seen within 60s"))
            if latency is not None:
                latencies.append(latency)

        say("\n5. Scheduled reconciliation (repairs the webhooks that were dropped)")
        _settle(stack, 120)
        run_sync(say=lambda m: say("   " + m))
        _settle(stack, 120)

        from scim_pipeline.commands import query

        truth = stack.truth()
        diffs = differences(stack.app_state(), truth, load_role_mapping(config.settings().role_mappings_path()))
        if stack.scim2 is not None:
            diffs += _group_differences(stack, truth)
        summary = summarize()
        delivered = query("SELECT entity || '.' || op AS kind, count(*) AS n FROM change_sets "
                          "WHERE status = 'delivered' GROUP BY 1 ORDER BY 1")
        events = query("SELECT outcome, count(*) AS n FROM webhook_events GROUP BY 1 ORDER BY 1")
        applied, once = _applied_once(stack)

        say("\nSummary")
        print_summary(summary)
        say("delivered by type: " + ", ".join(f"{k} {v}" for k, v in zip(delivered.kind, delivered.n)))
        say("webhook events: " + (", ".join(f"{k} {v}" for k, v in zip(events.outcome, events.n)) or "none"))
        say(f"application: {applied}")
        if latencies:
            p95 = sorted(latencies)[max(0, int(round(0.95 * len(latencies))) - 1)]
            say(f"webhook-to-application latency: p50 {statistics.median(latencies):.1f}s, p95 {p95:.1f}s "
                f"({len(latencies)} probes)")
        say(f"took {time.monotonic() - started:.0f}s")
        for line in diffs:
            say("  " + line)
        converged = not diffs and once
        say(f"converged: {'yes' if converged else 'no'}")
        return converged


def _group_differences(stack: Stack, truth: dict) -> list[str]:
    """A SCIM application also holds groups: each directory group with members, by its current name."""
    want = {(o["id"], g["id"], g["display_name"]) for o in truth["organizations"] for g in o["groups"]
            if any(g["id"] in {x["id"] for x in u["groups"]} for u in o["users"])}
    have = {(g["organization_id"], g["group_id"], g["display_name"]) for g in stack.app_state()["groups"]}
    if want == have:
        return []
    return [f"groups: missing {sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]}"]


def demo_from_cli(args) -> int:
    _stop_on_signals()
    return 0 if run_demo(getattr(args, "app", "demo")) else 1


def dev_from_cli(args) -> int:
    """Embedded services (unless configured otherwise), churn, and Dagster's webserver and daemon; Ctrl-C stops
    everything."""
    _stop_on_signals()
    home = config.home()
    real_scalekit = bool(os.environ.get("SCALEKIT_ENVIRONMENT_URL"))
    real_app = bool(os.environ.get("SCIM_PIPELINE_APP_URL"))
    with Stack(home) as stack:
        if not real_scalekit:
            stack.start_emulator("--seed", "7", "--churn", "30", "--retry-time-scale", "60")
            say(f"Scalekit emulator: {stack.emulator_env['SCALEKIT_ENVIRONMENT_URL']} (30 directory changes a minute)")
        stack.start_receiver(8090 if real_scalekit else None)
        say(f"Webhook receiver:  {stack.receiver.url}/webhooks/scalekit")
        if not real_app and getattr(args, "app", "demo") == "scim2":
            stack.start_scim2_app()
            say(f"SCIM application:  {stack.scim2.url} (scim2-server; bearer token in SCIM_PIPELINE_APP_TOKEN)")
        elif not real_app:
            stack.start_app()
            say(f"Demo application:  {stack.app.url}/state")
        stack.start_dagster(3000)
        say("Dagster UI:        http://127.0.0.1:3000  (Ctrl-C stops everything)")
        try:
            while stack.dagster_running():
                time.sleep(1)
        except KeyboardInterrupt:
            say("\nstopping ...")
    return 0


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT unwind like Ctrl-C, so every process this command started is stopped (SIGINT too: a
    shell that starts a job in the background hands it SIGINT ignored)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
