"""Runs whose process died (``kill -9``, an out-of-memory kill, a reboot) stay "started" in Dagster forever and keep
their slot of the warehouse pool, so every later writer would wait behind them. Dagster's run monitoring cannot see
that for runs in their own local process, so this finds them: a started run whose last event came from a process
that no longer exists on this host is reported failed and its pool slots are freed."""

from __future__ import annotations

import os
import socket

import dagster as dg

TERMINAL_WAIT = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _last_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    records = instance.get_records_for_run(run_id, ascending=False, limit=20).records
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is not None and event.pid:
            return event.pid
    return None


def reap_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Fail the started runs whose process is gone; returns their ids."""
    reaped = []
    for record in instance.get_run_records(dg.RunsFilter(statuses=TERMINAL_WAIT), limit=200):
        run = record.dagster_run
        pid = _last_pid(instance, run.run_id)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue
        instance.report_run_failed(
            run, f"the process that ran it (pid {pid} on {socket.gethostname()}) is gone; its warehouse slot is freed"
        )
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Fails runs whose process died and frees their warehouse slot, so no writer waits forever.")
def dead_run_reaper(context: dg.SensorEvaluationContext):
    reaped = reap_dead_runs(context.instance)
    return dg.SkipReason(f"failed {len(reaped)} dead run(s): {', '.join(reaped)}" if reaped else "no dead runs")
