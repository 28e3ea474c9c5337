"""The pipeline's own subcommands: sync, sql, changes, approve, retry."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import dagster as dg
import pandas as pd

from scim_pipeline.config import settings
from scim_pipeline.defs import warehouse_pool
from scim_pipeline.defs.instance import dagster_instance
from scim_pipeline.defs.run_process import HOST_TAG, PID_TAG, host, process_tags
from scim_pipeline.defs.run_reaper import reap_dead_runs
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.outbox_index import OutboxIndex
from scim_pipeline.warehouse.connection import Warehouse, WarehouseBusy

QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def warehouse() -> Warehouse:
    return Warehouse(settings().warehouse_path)


def _say(message: str) -> None:
    print(message, flush=True)


def run_sync(organization_ids: list[str] | None = None, delivery_backoff_s: float | None = None,
             say=_say, stop: StopSignals | None = None) -> dict:
    """Materialize the whole pipeline once, headless: catalogue, directory sync and change sets of every
    organization (or those given), then delivery. Returns a summary; raises SyncFailed when a run fails, and
    Stopped when ``stop`` saw SIGTERM or SIGINT. ``say`` is also told when a run waits for the warehouse behind
    another one."""
    with warehouse_pool.reporting(say):
        return _run_sync(organization_ids, delivery_backoff_s, say, stop)


def _run_sync(organization_ids: list[str] | None, delivery_backoff_s: float | None, say,
              stop: StopSignals | None) -> dict:
    from scim_pipeline.definitions import defs
    from scim_pipeline.defs.directory.automation import orgs_per_run, partition_ranges, range_tags
    from scim_pipeline.defs.partitions import organizations_partitions

    warehouse_pool.wait_bound_s()  # a malformed bound is a configuration error now, not once a run has to wait
    instance = dagster_instance()
    for run_id in reap_dead_runs(instance):
        say(f"Run {run_id[:8]} had died half-way; marked failed (its organizations are re-synced now)")
    started = time.monotonic()

    say("Listing organizations and directories from Scalekit ...")
    _execute(defs.resolve_job_def("directory_catalog"), instance, stop, run_config=QUIET_LOGS)
    with warehouse().read() as con:
        syncable = [r[0] for r in con.execute(
            "SELECT DISTINCT organization_id FROM directories WHERE enabled ORDER BY 1").fetchall()]
        known = {r[0] for r in con.execute("SELECT organization_id FROM organizations").fetchall()}
    if organization_ids:
        unknown = [o for o in organization_ids if o not in known]
        if unknown:
            raise SyncFailed(f"unknown organization(s): {', '.join(unknown)}")
        targets = list(dict.fromkeys(organization_ids))
    else:
        targets = syncable
    existing = set(instance.get_dynamic_partitions(organizations_partitions.name))
    new = [o for o in targets if o not in existing]
    if new:
        instance.add_dynamic_partitions(organizations_partitions.name, new)
    say(f"Syncing {len(targets)} organization(s) ...")

    sync_job = defs.resolve_job_def("directory_sync")
    keys = list(instance.get_dynamic_partitions(organizations_partitions.name))
    failed: dict[str, str] = {}  # an organization Scalekit would not list does not stop the others
    for first, last in partition_ranges(keys, set(targets), orgs_per_run()):
        result = _execute(sync_job, instance, stop, run_config=QUIET_LOGS, tags=range_tags(first, last))
        for materialization in result.asset_materializations_for_node("directory_snapshot"):
            entry = materialization.metadata.get("failures")
            failed.update(entry.value if entry is not None else {})

    say("Delivering change sets to the application ...")
    # A whole sync also sends what is due for organizations it did not list (an approval for one deleted in Scalekit).
    due = [] if organization_ids else OutboxIndex(settings().outbox_index_path).due(utcnow())
    config = {"organizations": list(dict.fromkeys([*targets, *due]))}
    if delivery_backoff_s is not None:
        config["backoff_s"] = delivery_backoff_s
    _execute(defs.resolve_job_def("deliver_changes"), instance, stop,
             run_config={**QUIET_LOGS, "ops": {"deliver": {"config": config}}})
    summary = summarize(targets)
    summary["failed"] = failed
    summary["seconds"] = round(time.monotonic() - started, 1)
    return summary


class SyncFailed(Exception):
    pass


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT came: the sync stops where it is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM (what a service manager sends) and SIGINT stop a sync. Outside a run's execution they raise
    ``Stopped`` at once. While a run executes, Dagster takes both signals over and raises them only at its
    checkpoints (a step's own code, the wait for the warehouse slot), which fails the run and frees its slot; the
    interpreter's wakeup fd, written whichever handler ran, tells ``check()`` afterwards that a signal came, and
    which."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopSignals":
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous = {signum: signal.signal(signum, self._raise) for signum in self.SIGNALS}
        self.received: int | None = None
        return self

    @staticmethod
    def _raise(signum: int, frame) -> None:
        raise Stopped(signum)

    def check(self) -> None:
        """Raise ``Stopped`` if a stop signal came since the last call (or ever, once one did)."""
        try:
            data = os.read(self._read, 1024)
        except BlockingIOError:
            data = b""
        for signum in data:
            if signum in self.SIGNALS and self.received is None:
                self.received = signum
        if self.received is not None:
            raise Stopped(self.received)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._read)
        os.close(self._write)


def _execute(job, instance, stop: StopSignals | None = None, tags=None, **kwargs):
    # The run names its process from the moment it exists, so that if this process dies the run is found dead.
    tags = {**(tags or {}), **process_tags()}
    result = job.execute_in_process(instance=instance, raise_on_error=False, tags=tags, **kwargs)
    if stop is not None:
        stop.check()  # a run that a signal interrupted failed for that reason: say so, not its error
    if not result.success:
        failures = [e.event_specific_data.error for e in result.all_events
                    if e.is_failure and getattr(e.event_specific_data, "error", None) is not None]
        for error in failures:
            if error.cls_name == warehouse_pool.WarehouseWaitTimeout.__name__:  # its message says it all
                raise SyncFailed(error.message.strip().splitlines()[0].split(": ", 1)[-1])
        errors = [error.message.strip().splitlines()[0] for error in failures]
        raise SyncFailed(f"run {result.run_id[:8]} of {job.name} failed: " + ("; ".join(errors) or "see its logs"))
    return result


def summarize(organization_ids: list[str] | None = None) -> dict:
    """Counts of what the warehouse holds (all organizations, or those given) and what waits for the application."""
    scope = "list_contains($orgs, organization_id)" if organization_ids else "true"
    params = {"orgs": organization_ids} if organization_ids else {}
    with warehouse().read() as con:
        def one(query: str) -> int:
            return con.execute(query, params).fetchone()[0]

        summary = {
            "organizations": one(f"SELECT count(*) FROM organizations WHERE {scope}"),
            "users": one(f"SELECT count(*) FROM directory_users WHERE {scope} AND deleted_at IS NULL"),
            "groups": one(f"SELECT count(*) FROM directory_groups WHERE {scope} AND deleted_at IS NULL"),
            "memberships": one(f"SELECT count(*) FROM group_memberships WHERE {scope}"),
            "roles": one(f"SELECT count(*) FROM role_assignments WHERE {scope}"),
        }
        summary["changes"] = dict(con.execute(
            f"SELECT status, count(*) FROM change_sets WHERE {scope} GROUP BY 1 ORDER BY 1", params).fetchall())
        failures = con.execute(
            f"""SELECT organization_id, count(*), any_value(last_error) FROM change_sets
                WHERE {scope} AND status IN ('failed', 'dead') GROUP BY 1""", params).fetchall()
        summary["undelivered"] = {org: {"changes": n, "error": err} for org, n, err in failures}
    return summary


def print_summary(summary: dict) -> None:
    print(f"organizations: {summary['organizations']}  users: {summary['users']}  groups: {summary['groups']}  "
          f"memberships: {summary['memberships']}  roles: {summary['roles']}")
    print("changes: " + (", ".join(f"{k} {v}" for k, v in summary["changes"].items()) or "none"))
    for org, info in summary["undelivered"].items():
        print(f"  {org}: {info['changes']} change(s) waiting for the application ({info['error']})")
    for org, error in summary.get("failed", {}).items():
        print(f"  {org}: NOT SYNCED: {error}")
    if "seconds" in summary:
        print(f"took {summary['seconds']}s")


def sync_from_cli(args) -> int:
    with StopSignals() as stop:
        try:
            summary = run_sync(args.org or None, stop=stop)
        except SyncFailed as exc:
            print(f"scim-pipeline sync: {exc}", file=sys.stderr)
            return 1
        except Stopped as exc:
            signum = exc.signum
            print(f"scim-pipeline sync: stopped by {signal.Signals(signum).name}: {_settle_own_runs()}",
                  file=sys.stderr, flush=True)
        else:
            print_summary(summary)
            return 1 if summary["failed"] else 0
    # End the way the signal ends a process (a shell shows 143 for SIGTERM; a service manager sees a clean stop).
    sys.stdout.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return 128 + signum  # not reached


def _settle_own_runs() -> str:
    """Leave none of this process's runs started or holding a warehouse slot; what became of the last one."""
    instance = dagster_instance()
    mine = dg.RunsFilter(tags={HOST_TAG: host(), PID_TAG: str(os.getpid())})
    runs = [record.dagster_run for record in instance.get_run_records(mine)]  # newest first
    for run in runs:
        if not run.is_finished:
            instance.report_run_failed(run, "scim-pipeline sync was stopped")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    if not runs:
        return "no run had started"
    last = instance.get_run_by_id(runs[0].run_id)
    if last.is_success:
        return f"run {last.run_id[:8]} of {last.job_name} had finished; the next sync does the rest"
    outcome = "canceled" if last.status == dg.DagsterRunStatus.CANCELED else "failed"
    return (f"run {last.run_id[:8]} of {last.job_name} marked {outcome}, its warehouse slot free; "
            "what it committed is kept and the next sync does the rest")


DEFAULT_QUERY_TIMEOUT_S = 30.0


class QueryTimeout(Exception):
    """A query ran past its timeout and was interrupted."""


def query(sql: str, timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S) -> pd.DataFrame:
    """Read-only SQL on the warehouse: the connection cannot write, and is held only for this query. A reader holds
    DuckDB's file lock while its query runs, so past ``timeout_s`` the query is interrupted: a writer waiting for
    the lock is never held up longer than that."""
    import duckdb

    with warehouse().read(timeout_s=timeout_s or DEFAULT_QUERY_TIMEOUT_S) as con:
        timer = threading.Timer(timeout_s, con.interrupt) if timeout_s else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            return con.execute(sql).df()
        except duckdb.InterruptException:
            raise QueryTimeout(f"query interrupted after {timeout_s:g}s (raise --timeout to allow more)") from None
        finally:
            if timer is not None:
                timer.cancel()


def format_frame(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return frame.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return json.dumps(json.loads(frame.to_json(orient="records", date_format="iso")), indent=2)
    if frame.empty:
        return "(no rows)"
    return frame.to_string(index=False, max_colwidth=60)


def sql_from_cli(args) -> int:
    import duckdb

    if args.timeout <= 0:
        print("scim-pipeline sql: --timeout must be a positive number of seconds", file=sys.stderr)
        return 2
    try:
        frame = query(args.query, args.timeout)
    except QueryTimeout as exc:
        print(f"scim-pipeline sql: {exc}", file=sys.stderr)
        return 1
    except WarehouseBusy as exc:
        print(f"scim-pipeline sql: {exc}; try again", file=sys.stderr)
        return 1
    except duckdb.Error as exc:
        print(f"scim-pipeline sql: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(format_frame(frame, args.format))
    return 0


def changes_from_cli(args) -> int:
    where, params = [], {}
    if args.org:
        where.append("organization_id = $org")
        params["org"] = args.org
    if args.status:
        where.append("status = $status")
        params["status"] = args.status
    sql = ("SELECT change_id, organization_id, entity, op, entity_key, status, hold_reason, attempts, last_error, "
           "created_at, delivered_at FROM change_sets" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY created_at, organization_id, entity_key")
    with warehouse().read() as con:
        frame = con.execute(sql, params).df()
    print(format_frame(frame, "table"))
    return 0


def approve_from_cli(args) -> int:
    from scim_pipeline.provisioning.change_sets import approve

    now = utcnow()
    with warehouse().write() as con:
        released = approve(con, args.org, now)
        still = con.execute("SELECT count(*) FROM change_sets WHERE organization_id = $org AND status = 'held'",
                            {"org": args.org}).fetchall()[0][0]
    OutboxIndex(settings().outbox_index_path).mark_ready([args.org], now)
    print(f"{args.org}: released {released} held change(s); the delivery sensor (or the next sync) sends them")
    if still:
        print(f"{args.org}: {still} change(s) stay held for a disabled directory, until it is enabled again")
    return 0


def retry_from_cli(args) -> int:
    from scim_pipeline.provisioning.ledger import revive_dead

    now = utcnow()
    with warehouse().write() as con:
        revived = revive_dead(con, None if args.all else args.org, now)
    OutboxIndex(settings().outbox_index_path).mark_ready(list(revived), now)
    for org, n in revived.items():
        print(f"{org}: {n} dead change(s) tried again")
    print(f"revived {sum(revived.values())} dead change(s) with fresh attempts; the delivery sensor (or the next "
          "sync) sends them")
    return 0
