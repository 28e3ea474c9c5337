"""``scim-pipeline daemon``: Dagster's daemon (``dagster-daemon``, with the same arguments: ``scim-pipeline daemon
run -w workspace.yaml``) with its sensor loop every ``SCIM_PIPELINE_SENSOR_LOOP_S`` seconds (default 0.5) instead of
Dagster's fixed 5, and its run queue looked at every ``SCIM_PIPELINE_DEQUEUE_S`` seconds (default 0.25) instead of
the whole seconds Dagster's setting allows.

Dagster's daemon evaluates the sensors in a loop of 5 s whatever a sensor's ``minimum_interval_seconds``, so a
webhook waited 2.5 s on average and 5 s at worst for the tick that starts its run: a third of the webhook path's
latency (measured under ``dagster dev``: p50 7.6 s with the 5 s loop, 4.5 s with a 1 s loop). Dagster has no setting
for it; this sets the loop's module constant before the daemon starts, and everything else is Dagster's own. Each
sensor still ticks no more often than its own minimum interval; only the webhook sensor asks for 1 s.
"""

from __future__ import annotations

import logging

from scim_pipeline.config import number_setting

log = logging.getLogger(__name__)

SENSOR_LOOP_VAR = "SCIM_PIPELINE_SENSOR_LOOP_S"
# Half a sensor's minimum interval of 1 s: a loop of exactly 1 s finds a sensor due or 1 ms short of due, and it
# ticked every 1 or 2 s.
DEFAULT_SENSOR_LOOP_S = 0.5
DEQUEUE_VAR = "SCIM_PIPELINE_DEQUEUE_S"
DEFAULT_DEQUEUE_S = 0.25  # a look at the queue is a query or two of Dagster's run storage


def sensor_loop_s() -> float:
    """Seconds between the daemon's sensor evaluations, from SCIM_PIPELINE_SENSOR_LOOP_S."""
    return number_setting(SENSOR_LOOP_VAR, DEFAULT_SENSOR_LOOP_S, "a number of seconds from 0.2 to 30",
                          lambda s: 0.2 <= s <= 30)


def set_sensor_loop(seconds: float) -> bool:
    """Make this process's Dagster daemon evaluate sensors every ``seconds``. False when this Dagster has no such
    loop constant (a version that changed it): the daemon then keeps Dagster's own loop, and says so."""
    from dagster._daemon import sensor

    if not isinstance(getattr(sensor, "MIN_INTERVAL_LOOP_TIME", None), (int, float)):
        log.warning("this Dagster version has no sensor loop setting to shorten: sensors tick on Dagster's own loop "
                    "(%s has no effect)", SENSOR_LOOP_VAR)
        return False
    sensor.MIN_INTERVAL_LOOP_TIME = seconds
    return True


def dequeue_s() -> float:
    """Seconds between the daemon's looks at the run queue, from SCIM_PIPELINE_DEQUEUE_S."""
    return number_setting(DEQUEUE_VAR, DEFAULT_DEQUEUE_S, "a number of seconds from 0.1 to 30",
                          lambda s: 0.1 <= s <= 30)


def set_dequeue_interval(seconds: float) -> bool:
    """Make this process's Dagster daemon look at the run queue every ``seconds``: its setting,
    ``dequeue_interval_seconds``, is a whole number of seconds, and a webhook run waited half of it on average
    between the sensor's request and its launch. False when this Dagster has no such daemon class to adjust."""
    from dagster._daemon.run_coordinator import queued_run_coordinator_daemon as module

    daemon = getattr(module, "QueuedRunCoordinatorDaemon", None)
    if daemon is None:
        log.warning("this Dagster version has no run queue daemon to adjust: runs are dequeued on Dagster's own "
                    "interval (%s has no effect)", DEQUEUE_VAR)
        return False
    original = daemon.__init__

    def __init__(self, interval_seconds, *args, **kwargs) -> None:
        original(self, seconds, *args, **kwargs)

    daemon.__init__ = __init__
    return True


def daemon_from_cli(args) -> int:
    set_sensor_loop(sensor_loop_s())
    set_dequeue_interval(dequeue_s())
    from dagster._daemon.cli import cli

    return cli.main(args=args.dagster_args, prog_name="scim-pipeline daemon", obj={}, standalone_mode=True)
