"""Benchmark: changes per second delivered to a SCIM 2.0 application (``scim2-server``, the ``scim2`` protocol)
against the ``changes`` protocol to the demo application, in the same run, over the same ledger.

Builds one warehouse of ``--orgs`` organizations with ``--users`` users each, in ``--groups`` groups (two groups per
user), derives memberships and roles, and computes the change sets of a first sync. A copy of the file goes to each
protocol, and ``deliver_ready`` (what a delivery run calls) delivers every organization: then a second round with
``--churn`` of the users changed (renamed, deactivated, moved to another group), as an incremental sync would.
Both applications run in processes of their own on this machine; each side's wall time counts. The ``changes``
protocol sends batches of up to 500 changes; SCIM sends one request per change, so the ratio is mostly requests per
change and the server's time per request; the pipeline's own CPU per change is printed beside it.

    python bench/scim2.py [--orgs 3] [--users 300] [--groups 10] [--churn 0.1]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scim_pipeline.config import settings  # noqa: E402
from scim_pipeline.devstack import services  # noqa: E402
from scim_pipeline.devstack.scim2_app import read_state, start_scim2_server  # noqa: E402
from scim_pipeline.provisioning.change_sets import compute_change_sets  # noqa: E402
from scim_pipeline.provisioning.changes_protocol import ApplicationClient  # noqa: E402
from scim_pipeline.provisioning.delivery import DeliveryPolicy, deliver_ready  # noqa: E402
from scim_pipeline.provisioning.derive import derive_memberships, derive_roles  # noqa: E402
from scim_pipeline.provisioning.outbox_index import OutboxIndex  # noqa: E402
from scim_pipeline.provisioning.role_mapping import parse_role_mapping  # noqa: E402
from scim_pipeline.provisioning.scim2_protocol import Scim2Client  # noqa: E402
from scim_pipeline.warehouse.connection import Warehouse  # noqa: E402

T0 = datetime(2026, 1, 1, 12, 0, 0)
MAPPING = parse_role_mapping("default_role: member\nrules:\n  - group: 'Eng*'\n    role: developer\n")


def directory(warehouse: Warehouse, orgs: list[str], users: int, groups: int, rng: random.Random,
              churn: float = 0.0) -> None:
    """The directory of every organization (first call), or ``churn`` of its users changed; derive and diff."""
    with warehouse.write() as con:
        for org in orgs:
            if churn == 0:
                for g in range(groups):
                    con.execute("INSERT INTO directory_groups (group_id, organization_id, directory_id, display_name) "
                                "VALUES (?, ?, ?, ?)", [f"{org}_g{g}", org, f"dir_{org}",
                                                        ("Engineering " if g % 3 == 0 else "Team ") + str(g)])
                con.executemany(
                    "INSERT INTO directory_users (user_id, organization_id, directory_id, email, given_name, "
                    "family_name, preferred_username, active) VALUES (?, ?, ?, ?, ?, ?, ?, true)",
                    [(f"{org}_u{u}", org, f"dir_{org}", f"user{u}@{org}.example.com", "Given", f"Family{u}",
                      f"user{u}") for u in range(users)])
                con.executemany("INSERT INTO directory_user_groups VALUES (?, ?, ?)",
                                [(org, f"{org}_u{u}", f"{org}_g{(u + k) % groups}") for u in range(users)
                                 for k in (0, 1)])
            else:
                for u in rng.sample(range(users), int(users * churn)):
                    kind = rng.choice(["rename", "deactivate", "move"])
                    uid = f"{org}_u{u}"
                    if kind == "rename":
                        con.execute("UPDATE directory_users SET family_name = 'Renamed' WHERE user_id = ?", [uid])
                    elif kind == "deactivate":
                        con.execute("UPDATE directory_users SET active = false WHERE user_id = ?", [uid])
                    else:
                        con.execute("DELETE FROM directory_user_groups WHERE user_id = ? AND group_id = ?",
                                    [uid, f"{org}_g{u % groups}"])
                        con.execute("INSERT OR IGNORE INTO directory_user_groups VALUES (?, ?, ?)",
                                    [org, uid, f"{org}_g{(u + 5) % groups}"])
            derive_memberships(con, org)
            derive_roles(con, org, MAPPING)
        compute_change_sets(con, None, T0 + timedelta(minutes=1 if churn == 0 else 10))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def deliver(warehouse: Warehouse, client, orgs: list[str], outbox: OutboxIndex, when: datetime) -> tuple:
    """(changes applied, wall seconds, CPU seconds of this process: the pipeline's side of the exchange)."""
    started, cpu = time.perf_counter(), cpu_seconds()
    report = deliver_ready(warehouse, client, orgs, outbox, DeliveryPolicy(), now=lambda: when,
                           progress=lambda _: None)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    if report.rejected or report.failed:
        raise SystemExit(f"delivery incomplete: {report}")
    return report.applied, elapsed, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orgs", type=int, default=3)
    parser.add_argument("--users", type=int, default=300, help="users per organization")
    parser.add_argument("--groups", type=int, default=10, help="groups per organization")
    parser.add_argument("--churn", type=float, default=0.1, help="share of users changed in the second round")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="scim-bench-scim2-"))
    for var in ("SCIM_PIPELINE_APP_URL", "SCIM_PIPELINE_APP_SECRET", "SCIM_PIPELINE_APP_PROTOCOL"):
        os.environ.pop(var, None)
    os.environ["SCIM_PIPELINE_HOME"] = str(home)
    orgs = [f"org_bench{i}" for i in range(args.orgs)]
    try:
        base = Warehouse(home / "base.duckdb")
        directory(base, orgs, args.users, args.groups, random.Random(1))
        runs = {}
        for protocol in ("changes", "scim2"):
            path = home / f"{protocol}.duckdb"
            shutil.copy(home / "base.duckdb", path)
            warehouse, outbox = Warehouse(path), OutboxIndex(home / f"{protocol}-outbox.sqlite")
            if protocol == "changes":
                app = services.start("app", [], home, ready=lambda s: (home / "app.env").exists()
                                     and services.port_open("127.0.0.1", s.port))
                client = ApplicationClient(app.url, settings().app_secret())
            else:
                app = start_scim2_server(home)
                client = Scim2Client(app.settings())
            with app, client:
                first = deliver(warehouse, client, orgs, outbox, T0 + timedelta(minutes=2))
                directory(warehouse, orgs, args.users, args.groups, random.Random(2), churn=args.churn)
                second = deliver(warehouse, client, orgs, outbox, T0 + timedelta(minutes=11))
                if protocol == "scim2":
                    held = read_state(app.settings(), orgs)
                    assert len(held["users"]) == args.orgs * args.users, "not every user reached the application"
                    runs["requests"] = client.requests
            runs[protocol] = (first, second)

        print(f"{args.orgs} organizations x {args.users} users, {args.groups} groups each; "
              f"then {args.churn:.0%} of the users changed")
        for label, i in (("first sync", 0), ("churn", 1)):
            (n_c, t_c, cpu_c), (n_s, t_s, cpu_s) = runs["changes"][i], runs["scim2"][i]
            rate_c, rate_s = n_c / t_c, n_s / t_s
            print(f"{label:>10}: changes protocol {n_c} changes in {t_c:.2f}s = {rate_c:,.0f}/s; "
                  f"scim2 {n_s} changes in {t_s:.2f}s = {rate_s:,.0f}/s; ratio scim2/changes {rate_s / rate_c:.2f}"
                  f" (pipeline CPU per change: changes {1e3 * cpu_c / n_c:.2f} ms, scim2 {1e3 * cpu_s / n_s:.2f} ms)")
        total = sum(n for n, _, _ in runs["scim2"])
        print(f"scim2: {runs['requests']} HTTP requests for {total} changes "
              f"({runs['requests'] / total:.2f} per change)")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
