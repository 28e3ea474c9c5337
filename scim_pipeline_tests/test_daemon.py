"""``scim-pipeline daemon``: Dagster's daemon with a shorter sensor loop (its effect under a running daemon is
checked in pipeline/test_webhooks_e2e.py)."""

import subprocess
import sys

from dagster._daemon import sensor

from scim_pipeline.daemon import (
    DEFAULT_DEQUEUE_S,
    DEFAULT_SENSOR_LOOP_S,
    dequeue_s,
    sensor_loop_s,
    set_dequeue_interval,
    set_sensor_loop,
)


def test_the_sensor_loop_is_set_from_the_setting(monkeypatch):
    before = sensor.MIN_INTERVAL_LOOP_TIME
    try:
        assert sensor_loop_s() == DEFAULT_SENSOR_LOOP_S
        monkeypatch.setenv("SCIM_PIPELINE_SENSOR_LOOP_S", "2.5")
        assert set_sensor_loop(sensor_loop_s())
        assert sensor.MIN_INTERVAL_LOOP_TIME == 2.5
    finally:
        sensor.MIN_INTERVAL_LOOP_TIME = before


def test_the_run_queue_is_looked_at_every_quarter_second_whatever_dagsters_whole_seconds(monkeypatch):
    from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

    monkeypatch.setattr(QueuedRunCoordinatorDaemon, "__init__", QueuedRunCoordinatorDaemon.__init__)  # restored after
    assert dequeue_s() == DEFAULT_DEQUEUE_S == 0.25
    assert set_dequeue_interval(dequeue_s())
    # What the daemon's controller builds from dagster.yaml's dequeue_interval_seconds (1 here).
    assert QueuedRunCoordinatorDaemon(interval_seconds=1).interval_seconds == 0.25
    done = subprocess.run([sys.executable, "-m", "scim_pipeline.cli", "daemon", "run"], capture_output=True,
                          text=True, timeout=60, env={"SCIM_PIPELINE_DEQUEUE_S": "0", "PATH": ""})
    assert done.returncode == 2 and "SCIM_PIPELINE_DEQUEUE_S is malformed" in done.stderr


def test_a_malformed_setting_is_one_line_and_starts_nothing():
    for value in ("fast", "0", "-1", "3600"):
        done = subprocess.run([sys.executable, "-m", "scim_pipeline.cli", "daemon", "run"], capture_output=True,
                              text=True, timeout=60, env={"SCIM_PIPELINE_SENSOR_LOOP_S": value, "PATH": ""})
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            "scim-pipeline daemon: configuration error: SCIM_PIPELINE_SENSOR_LOOP_S is malformed: expected a number "
            f"of seconds from 0.2 to 30, got {value!r}"]
