"""Runs whose process died (``kill -9``, an out-of-memory kill, a reboot) stay "started" in Dagster forever and keep
their slot of the warehouse pool, so every later writer would wait behind them. Dagster's run monitoring cannot see
that for runs executed by the default run launcher, so this finds them: a started run whose own process, recorded
on the run when it started (``run_process``), no longer exists on this host is reported failed and its pool slots
are freed.

Only runs recorded on this host are judged. Dagster's storage may be shared by several hosts, and a pid means
nothing on another host: failing another host's live run would free its slot while it still writes. A run with no
record of its process (one that died before recording it, or one from before the record existed) is not judged
either, since nothing proves its process was here; it holds no warehouse slot in that case (steps claim slots
after the record is made), and a writer waiting behind a slot names the run that holds it."""

from __future__ import annotations

import dagster as dg

from scim_pipeline.defs.run_process import HOST_TAG, PID_TAG, Process, host, judge

JUDGED = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def reap_dead_runs(instance: dg.DagsterInstance, run_ids: list[str] | None = None) -> list[str]:
    """Fail (or, if they were being canceled, cancel) this host's started runs whose process is gone, and free their
    pool slots; ``run_ids`` limits the search to those runs. Returns the ids of the runs reaped."""
    reaped = []
    runs_filter = dg.RunsFilter(statuses=JUDGED, tags={HOST_TAG: host()}, run_ids=run_ids)
    for record in instance.get_run_records(runs_filter):
        run = record.dagster_run
        if judge(instance, run) is not Process.DEAD:
            continue
        why = f"the process that ran it (pid {run.tags[PID_TAG]} on {host()}) is gone; its warehouse slot is freed"
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, why)
        else:
            instance.report_run_failed(run, why)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(run.run_id)
    return reaped


@dg.sensor(minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Fails runs of this host whose process died and frees their warehouse slot, so no writer "
                       "waits forever.")
def dead_run_reaper(context: dg.SensorEvaluationContext):
    reaped = reap_dead_runs(context.instance)
    return dg.SkipReason(f"failed {len(reaped)} dead run(s): {', '.join(reaped)}" if reaped else "no dead runs")
