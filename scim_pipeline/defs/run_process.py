"""Which process executes a run, and on which host: recorded on the run as tags by the run's own process when it
starts, so that whoever finds the run later can tell whether that process still exists.

Every run here executes in one process (the in-process executor): ``scim-pipeline sync`` for its own runs, a run
worker for runs the daemon or the UI launch. ``scim-pipeline sync`` tags its runs as it creates them; a run worker
tags its run when it initializes the warehouse resource, at the start of the run and before any step can take the
warehouse pool's slot.

A run's tags may be copied from another run (a re-execution), so the recorded pid counts only when it is also the
pid of the run's own ``RUN_START`` event; a process id is told apart from a later process that reuses it (or from
the same number after a reboot) by the process's start time and the host's boot id, where the system shows them.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import socket
from pathlib import Path

import dagster as dg

HOST_TAG = "scim_pipeline/host"
PID_TAG = "scim_pipeline/pid"
STARTED_TAG = "scim_pipeline/process_started"  # boot id and start time of the process, where /proc shows them


def host() -> str:
    return socket.gethostname()


def _started(pid: int) -> str | None:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the start time is field 22.
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"


def process_tags() -> dict[str, str]:
    """The tags that name this process as the one executing a run."""
    tags = {HOST_TAG: host(), PID_TAG: str(os.getpid())}
    started = _started(os.getpid())
    if started is not None:
        tags[STARTED_TAG] = started
    return tags


def record(instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
    """Tag ``run`` as executed by this process (unless it already is)."""
    tags = process_tags()
    if any(run.tags.get(key) != value for key, value in tags.items()):
        instance.add_run_tags(run.run_id, tags)


class Process(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"
    UNKNOWN = "unknown"  # another host's run, or one whose process was never recorded: not ours to judge


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _start_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.RUN_START, ascending=False, limit=1).records
    event = records[0].event_log_entry.dagster_event if records else None
    return event.pid if event is not None else None


def judge(instance: dg.DagsterInstance, run: dg.DagsterRun) -> Process:
    """Whether the process that executes ``run`` still exists. Only a run recorded on this host is judged: a pid
    means nothing on another host, and a run that shares Dagster's storage with other hosts must not be failed
    because its pid is missing here."""
    if run.tags.get(HOST_TAG) != host():
        return Process.UNKNOWN
    try:
        pid = int(run.tags[PID_TAG])
    except (KeyError, ValueError):
        return Process.UNKNOWN
    if _start_pid(instance, run.run_id) != pid:  # tags copied from an earlier run, not yet replaced by its own
        return Process.UNKNOWN
    if not _exists(pid):
        return Process.DEAD
    recorded, current = run.tags.get(STARTED_TAG), _started(pid)
    if recorded and current and recorded != current:  # the number now belongs to another process
        return Process.DEAD
    return Process.ALIVE


def describe(instance: dg.DagsterInstance, run_id: str) -> str:
    """``run 1a2b3c4d (directory_sync, pid 4242 on host-a, started 12:03:04 UTC)``, as much of it as is known."""
    record = instance.get_run_record_by_id(run_id)
    if record is None:
        return f"run {run_id[:8]}"
    run = record.dagster_run
    parts = [run.job_name]
    if PID_TAG in run.tags:
        parts.append(f"pid {run.tags[PID_TAG]} on {run.tags.get(HOST_TAG, 'an unknown host')}")
    if record.start_time:
        parts.append("started " + dt.datetime.fromtimestamp(record.start_time, dt.timezone.utc).strftime("%H:%M:%S UTC"))
    return f"run {run_id[:8]} ({', '.join(parts)})"
