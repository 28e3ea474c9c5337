"""Benchmark: the change-set diff in DuckDB SQL against a pandas baseline doing the same diff, in the same run.

Generates (in DuckDB) N users, 5 memberships and 1 role per user as both the desired and the delivered state for a
few organizations, applies 1% churn (attribute changes, deactivations, deletions, new users, membership and role
changes), then times ``compute_change_sets`` over all organizations (one pass, and one call per organization), and a
pandas baseline that diffs the same tables with outer merges (``indicator=True``). Each side runs in its own process
so that its peak RSS (``ru_maxrss``) is its own; the baseline gets its DataFrames loaded before the clock starts and
computes neither payload JSON nor change ids, which favours it. Each side runs ``--repeat`` times (the pandas side
one time fewer, it is slow) and its best run counts: the machines this runs on are shared and noisy.

    python bench/diff.py [--users 1000000] [--orgs 5] [--churn 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scim_pipeline.warehouse.schema import create_all  # noqa: E402

NOW = datetime(2026, 1, 1, 12, 0, 0)
MEMBERSHIPS_PER_USER = 5
GROUPS_PER_ORG = 200


def quiet(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    con.execute("SET enable_progress_bar = false")
    return con


def cpu_seconds() -> float:
    """CPU time of this process, all threads: unlike wall time, it hardly depends on what else the machine runs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


class _Con:
    """Passes each statement only the parameters it names (DuckDB refuses extra ones)."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    def execute(self, sql: str, params: dict | None = None):
        used = {k: v for k, v in (params or {}).items() if re.search(rf"\${k}\b", sql)}
        return self.con.execute(sql, used)

    def close(self) -> None:
        self.con.close()


def generate(path: Path, users: int, orgs: int, churn: float) -> dict[str, int]:
    con = _Con(quiet(duckdb.connect(str(path))))
    create_all(con.con)
    p = {"users": users, "orgs": orgs, "groups": GROUPS_PER_ORG}
    # Desired side: directory users, their memberships and roles (what derive_* would have written).
    con.execute(
        """
        INSERT INTO directory_users (user_id, organization_id, directory_id, email, given_name, family_name,
                                     preferred_username, active, synced_at)
        SELECT 'usr_' || i, 'org_' || (i % $orgs), 'dir_' || (i % $orgs), 'user' || i || '@example.com',
               'Given' || (i % 997), 'Family' || (i % 1009), 'user' || i, true, TIMESTAMP '2026-01-01'
        FROM range($users) t(i)
        """, p)
    con.execute(
        """
        INSERT INTO directory_groups (group_id, organization_id, directory_id, display_name)
        SELECT 'grp_' || o || '_' || g, 'org_' || o, 'dir_' || o, 'Group ' || g
        FROM range($orgs) a(o), range($groups) b(g)
        """, p)
    con.execute(
        f"""
        INSERT INTO group_memberships (organization_id, group_id, user_id, group_name)
        SELECT 'org_' || (i % $orgs), 'grp_' || (i % $orgs) || '_' || ((i + k * 37) % $groups), 'usr_' || i,
               'Group ' || ((i + k * 37) % $groups)
        FROM range($users) t(i), range({MEMBERSHIPS_PER_USER}) m(k)
        """, p)
    con.execute(
        """
        INSERT INTO role_assignments (organization_id, user_id, role_name, source)
        SELECT 'org_' || (i % $orgs), 'usr_' || i, 'role_' || (i % 7), 'rule:1:Group*' FROM range($users) t(i)
        """, p)
    # Delivered side: the application is in sync before the churn.
    con.execute("INSERT INTO delivered_users SELECT organization_id, user_id, email, given_name, family_name, "
                "preferred_username, active FROM directory_users")
    con.execute("INSERT INTO delivered_memberships SELECT organization_id, group_id, user_id, group_name "
                "FROM group_memberships")
    con.execute("INSERT INTO delivered_roles SELECT organization_id, user_id, role_name FROM role_assignments")

    # 1% churn, spread over the kinds of change. hash() picks pseudo-random but repeatable rows.
    n = max(1, int(users * churn))
    c = {"n": n, "users": users, "orgs": orgs, "groups": GROUPS_PER_ORG}
    con.execute("UPDATE directory_users SET email = 'renamed.' || email WHERE hash(user_id || 'a') % $users < $n * 0.3", c)
    con.execute("UPDATE directory_users SET active = false WHERE hash(user_id || 'b') % $users < $n * 0.2", c)
    con.execute("UPDATE directory_users SET deleted_at = TIMESTAMP '2026-01-01' "
                "WHERE hash(user_id || 'c') % $users < $n * 0.1", c)
    con.execute("DELETE FROM group_memberships WHERE user_id IN (SELECT user_id FROM directory_users "
                "WHERE deleted_at IS NOT NULL)")
    con.execute("DELETE FROM role_assignments WHERE user_id IN (SELECT user_id FROM directory_users "
                "WHERE deleted_at IS NOT NULL)")
    con.execute(
        """
        INSERT INTO directory_users (user_id, organization_id, email, given_name, family_name, preferred_username, active)
        SELECT 'usr_new_' || i, 'org_' || (i % $orgs), 'new' || i || '@example.com', 'New', 'User', 'new' || i, true
        FROM range(CAST($n * 0.2 AS BIGINT)) t(i)
        """, c)
    con.execute(
        """
        INSERT INTO group_memberships
        SELECT 'org_' || (i % $orgs), 'grp_' || (i % $orgs) || '_' || (i % $groups), 'usr_new_' || i, 'Group ' || (i % $groups)
        FROM range(CAST($n * 0.2 AS BIGINT)) t(i)
        """, c)
    con.execute("INSERT INTO role_assignments SELECT organization_id, user_id, 'role_new', 'default' FROM directory_users "
                "WHERE user_id LIKE 'usr_new_%'")
    # Membership and role churn among existing users: 1% of each removed, as many added.
    con.execute(f"DELETE FROM group_memberships WHERE hash(user_id || group_id) % ($users * {MEMBERSHIPS_PER_USER}) "
                f"< $n * {MEMBERSHIPS_PER_USER}", c)
    con.execute(
        f"""
        INSERT INTO group_memberships
        SELECT u.organization_id, 'grp_' || substr(u.organization_id, 5) || '_' || (hash(u.user_id) % $groups + 1000),
               u.user_id, 'Group new'
        FROM directory_users u WHERE u.deleted_at IS NULL AND hash(u.user_id || 'm') % $users < $n * {MEMBERSHIPS_PER_USER}
        """, c)
    con.execute("DELETE FROM role_assignments WHERE hash(user_id || 'r') % $users < $n", c)
    con.execute(
        """
        INSERT INTO role_assignments
        SELECT organization_id, user_id, 'role_extra', 'rule:2:x' FROM directory_users
        WHERE deleted_at IS NULL AND hash(user_id || 'g') % $users < $n
        """, c)
    sizes = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in (
        "directory_users", "group_memberships", "role_assignments",
        "delivered_users", "delivered_memberships", "delivered_roles")}
    con.close()
    return sizes


def run_duckdb(path: str, repeat: int) -> dict:
    from scim_pipeline.provisioning.change_sets import compute_change_sets
    from scim_pipeline.provisioning.role_mapping import GuardSettings

    con = quiet(duckdb.connect(path))
    rss_open = peak_rss_mb()
    out: dict = {"all_orgs": [], "per_org": [], "cpu": [], "load": os.getloadavg()[0]}
    orgs = [r[0] for r in con.execute("SELECT DISTINCT organization_id FROM directory_users ORDER BY 1").fetchall()]
    for variant in ["all_orgs"] * repeat + ["per_org"]:
        con.execute("BEGIN")
        started, cpu = time.perf_counter(), cpu_seconds()
        if variant == "all_orgs":
            counts = compute_change_sets(con, None, NOW, GuardSettings())
        else:
            counts = {"total": 0}
            for org in orgs:
                counts["total"] += compute_change_sets(con, org, NOW, GuardSettings())["total"]
        out[variant].append(time.perf_counter() - started)
        if variant == "all_orgs":
            out["cpu"].append(cpu_seconds() - cpu)
        out[f"{variant}_total"] = counts["total"]
        if variant == "all_orgs":
            out["counts"] = {k: v for k, v in counts.items() if "." in k}
        con.execute("ROLLBACK")  # every run starts from the same ledger
    con.close()
    out["rss_open_mb"] = rss_open
    out["rss_peak_mb"] = peak_rss_mb()
    return out


def run_pandas(path: str, repeat: int) -> dict:
    import pandas as pd

    con = quiet(duckdb.connect(path, read_only=True))
    want_users = con.execute("SELECT organization_id, user_id, email, given_name, family_name, preferred_username, "
                             "active FROM desired_users").df()
    have_users = con.execute("SELECT * FROM delivered_users").df()
    want_m = con.execute("SELECT organization_id, group_id, user_id, group_name FROM desired_memberships").df()
    have_m = con.execute("SELECT organization_id, group_id, user_id FROM delivered_memberships").df()
    want_r = con.execute("SELECT organization_id, user_id, role_name FROM desired_roles").df()
    have_r = con.execute("SELECT * FROM delivered_roles").df()
    con.close()
    rss_loaded = peak_rss_mb()
    load = os.getloadavg()[0]
    timings, cpu = [], []
    for _ in range(repeat):
        started, cpu_started = time.perf_counter(), cpu_seconds()
        counts = _pandas_diff(pd, want_users, have_users, want_m, have_m, want_r, have_r)
        timings.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - cpu_started)
    return {"seconds": timings, "cpu": cpu, "total": sum(counts.values()), "counts": counts, "load": load,
            "rss_loaded_mb": rss_loaded, "rss_peak_mb": peak_rss_mb()}


def _pandas_diff(pd, want_users, have_users, want_m, have_m, want_r, have_r) -> dict[str, int]:
    fields = ["email", "given_name", "family_name", "preferred_username"]
    u = want_users.merge(have_users, on=["organization_id", "user_id"], how="outer", indicator=True,
                         suffixes=("", "_have"))
    both = u["_merge"] == "both"
    active_changed = both & (u["active"] != u["active_have"])
    fields_changed = both & ~active_changed & pd.concat(
        [(u[f] != u[f"{f}_have"]) & ~(u[f].isna() & u[f"{f}_have"].isna()) for f in fields], axis=1).any(axis=1)
    user_changes = pd.concat([
        u.loc[u["_merge"] == "left_only", ["organization_id", "user_id"]].assign(op="create"),
        u.loc[u["_merge"] == "right_only", ["organization_id", "user_id"]].assign(op="delete"),
        u.loc[active_changed & u["active"].astype(bool), ["organization_id", "user_id"]].assign(op="reactivate"),
        u.loc[active_changed & ~u["active"].astype(bool), ["organization_id", "user_id"]].assign(op="deactivate"),
        u.loc[fields_changed, ["organization_id", "user_id"]].assign(op="update"),
    ])
    m = want_m.merge(have_m, on=["organization_id", "group_id", "user_id"], how="outer", indicator=True)
    m = m[m["_merge"] != "both"]
    membership_changes = m.assign(op=m["_merge"].map({"left_only": "add", "right_only": "remove"}).astype(str))
    r = want_r.merge(have_r, on=["organization_id", "user_id", "role_name"], how="outer", indicator=True)
    r = r[r["_merge"] != "both"]
    role_changes = r.assign(op=r["_merge"].map({"left_only": "grant", "right_only": "revoke"}).astype(str))
    counts = {}
    for entity, frame in (("user", user_changes), ("membership", membership_changes), ("role", role_changes)):
        for op, k in frame["op"].value_counts().items():
            counts[f"{entity}.{op}"] = int(k)
    return counts


def in_subprocess(side: str, path: Path, repeat: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--side", side, "--db", str(path), "--repeat", str(repeat)],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--orgs", type=int, default=5)
    parser.add_argument("--churn", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts (noisy machines)")
    parser.add_argument("--side", choices=["duckdb", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_duckdb(args.db, args.repeat) if args.side == "duckdb" else run_pandas(args.db, args.repeat)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        started = time.perf_counter()
        sizes = generate(path, args.users, args.orgs, args.churn)
        print(f"generated in {time.perf_counter() - started:.1f}s: " + ", ".join(f"{k}={v:,}" for k, v in sizes.items()))
        sql = in_subprocess("duckdb", path, args.repeat)
        pandas = in_subprocess("pandas", path, max(1, args.repeat - 1))

    if sql["counts"] != pandas["counts"]:
        print(f"MISMATCH\n  duckdb {sql['counts']}\n  pandas {pandas['counts']}")
        sys.exit(1)
    print(f"changes: {sql['all_orgs_total']:,} " + json.dumps(sql["counts"]))
    one_pass, per_org, baseline = min(sql["all_orgs"]), min(sql["per_org"]), min(pandas["seconds"])
    runs = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"duckdb compute_change_sets, all organizations in one pass: {one_pass:.2f}s (runs: {runs(sql['all_orgs'])}; "
          f"load average {sql['load']:.1f})")
    print(f"duckdb compute_change_sets, one call per organization ({args.orgs}): {per_org:.2f}s")
    print(f"pandas outer merges (data already in memory, no payloads or ids): {baseline:.2f}s "
          f"(runs: {runs(pandas['seconds'])}; load average {pandas['load']:.1f})")
    print(f"ratio pandas / duckdb: {baseline / one_pass:.1f}x (one pass), {baseline / per_org:.1f}x (per organization)")
    print(f"CPU seconds (all threads, best run): duckdb {min(sql['cpu']):.2f}, pandas {min(pandas['cpu']):.2f}, "
          f"ratio {min(pandas['cpu']) / min(sql['cpu']):.1f}x")
    print(f"peak RSS: duckdb {sql['rss_peak_mb']:.0f} MB (after opening {sql['rss_open_mb']:.0f} MB); "
          f"pandas {pandas['rss_peak_mb']:.0f} MB (after loading {pandas['rss_loaded_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
