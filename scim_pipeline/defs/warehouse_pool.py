"""Waiting for the warehouse pool's slot: asleep, saying which run holds it, for a bounded time, and stoppable.

Every run here executes its steps in process, and Dagster 1.13's in-process executor waits for a step's pool slot
in a loop that never sleeps: ``InstanceConcurrencyContext.interval_to_next_pending_claim_check`` returns
``min(0, ...)``, so the loop asks again at once, on one core, for as long as the slot is held (forever, behind a
run whose process died). Dagster also takes SIGTERM and SIGINT over while it executes and raises them only at its
checkpoints, which that loop never reaches. ``install()`` replaces those two methods of Dagster's class so that a
step waiting for a slot

- sleeps between checks (at most ``CHECK_EVERY_S`` apart, so a freed slot is taken promptly),
- says once, then every ``SAY_EVERY_S``, which run holds the slot, and meanwhile reaps the holder if its process
  died on this host (the dead-run reaper's rule),
- gives up after ``SCIM_PIPELINE_WAREHOUSE_WAIT_S`` seconds (default 600) with ``WarehouseWaitTimeout``, which
  fails the run and frees its claim,
- stops at once on SIGTERM or SIGINT, as a step's own code would.

``PoolTurns`` waits the same way for a step that takes the slot for each write instead of for its whole run (a
full sync, which lists Scalekit between its writes; provisioning, chunk by chunk).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext
from dagster._utils.interrupts import check_captured_interrupt

from scim_pipeline.config import number_setting
from scim_pipeline.defs.partitions import WAREHOUSE_POOL
from scim_pipeline.warehouse.connection import Turns

WAIT_VAR = "SCIM_PIPELINE_WAREHOUSE_WAIT_S"
DEFAULT_WAIT_S = 600.0
CHECK_EVERY_S = 0.25  # how often the pool is asked again (an SQLite query); Dagster's own backoff reaches 15 s
SLEEP_S = 0.25  # longest sleep between looks at a signal
SAY_EVERY_S = 60.0
TURN_CHECK_S = 0.1  # a turn is short, and every wait adds to a webhook's latency: look often (an SQLite query)
TURN_SAY_AFTER_S = 5.0

log = logging.getLogger(__name__)


class WarehouseWaitTimeout(Exception):
    """A step waited longer than its bound for a pool slot. The message is one line naming the holders."""


def wait_bound_s() -> float:
    # A wait must end: a positive, finite number of seconds.
    return number_setting(WAIT_VAR, DEFAULT_WAIT_S, "a positive number of seconds",
                          lambda s: s > 0 and math.isfinite(s))


_reporters: list[Callable[[str], None]] = []


@contextmanager
def reporting(say: Callable[[str], None]) -> Iterator[None]:
    """Also tell ``say`` what a step of this process waits for (the sync command prints it)."""
    _reporters.append(say)
    try:
        yield
    finally:
        _reporters.remove(say)


def holders(instance, pool: str) -> str:
    """``run 1a2b3c4d (directory_sync, pid 4242 on host-a, started 12:03:04 UTC)``, for each run holding ``pool``."""
    from scim_pipeline.defs.run_process import describe

    run_ids = sorted({slot.run_id for slot in instance.event_log_storage.get_concurrency_info(pool).claimed_slots})
    return ", ".join(describe(instance, run_id) for run_id in run_ids) or "no run (it is being handed over)"


class _Wait:
    def __init__(self, bound_s: float):
        self.started = time.monotonic()
        self.said_at = -math.inf
        self.bound_s = bound_s


def _claim(self: InstanceConcurrencyContext, concurrency_key: str, step_key: str, step_priority: int = 0) -> bool:
    if check_captured_interrupt():  # SIGTERM/SIGINT came while this step waited: stop as a step's code would
        raise DagsterExecutionInterruptedError()
    waits: dict[str, _Wait] = self.__dict__.setdefault("_scim_waits", {})
    if _dagster_claim(self, concurrency_key, step_key, step_priority):
        waits.pop(step_key, None)
        return True
    timeouts = self._pending_timeouts
    if step_key in timeouts:
        timeouts[step_key] = min(timeouts[step_key], time.time() + CHECK_EVERY_S)
    wait = waits.get(step_key)
    if wait is None:
        wait = waits[step_key] = _Wait(wait_bound_s())
    _still_waiting(self._instance, self._run_id, concurrency_key, step_key, wait)
    return False


def _still_waiting(instance, run_id: str, pool: str, step_key: str, wait: _Wait) -> None:
    """Give up past the bound; once a minute, say who holds the slot (and free it from a dead or ended run)."""
    now = time.monotonic()
    if now - wait.started >= wait.bound_s:
        raise WarehouseWaitTimeout(
            f"gave up waiting for the {pool} after {wait.bound_s:g}s: {holders(instance, pool)} holds its slot")
    if now - wait.said_at >= SAY_EVERY_S:
        wait.said_at = now
        _waiting(instance, run_id, pool, step_key, wait)


def _waiting(instance, run_id: str, pool: str, step_key: str, wait: _Wait) -> None:
    from scim_pipeline.defs.run_reaper import reap_dead_runs

    info = instance.event_log_storage.get_concurrency_info(pool)
    held_by = [slot.run_id for slot in info.claimed_slots]
    if held_by and reap_dead_runs(instance, held_by):
        return  # the slot was held by a dead run, freed now: the next check takes it
    if _free_for_finished_runs(instance, (set(held_by) | info.assigned_run_ids) - {run_id}):
        return  # a run that has ended kept a slot (or a slot handed to it): freed, the next check takes it
    message = (f"Waiting for the {pool}: {holders(instance, pool)} holds its slot "
               f"(step {step_key}; giving up {wait.bound_s:g}s after it began to wait)")
    for say in list(_reporters) or [log.warning]:
        say(message)
    run = instance.get_run_by_id(run_id)
    if run is not None:
        instance.report_engine_event(message, run)  # shows in the run's log in the UI


def _free_for_finished_runs(instance, run_ids: set[str]) -> bool:
    """Free what runs that have ended still hold or were handed in the pool. Under load a slot can be handed to a
    waiting step of a run that ends before it takes it, and nothing frees it then: the pool looks free to everyone
    and no one can claim it."""
    finished = [r.run_id for r in instance.get_runs(dg.RunsFilter(run_ids=sorted(run_ids)))
                if r.is_finished] if run_ids else []
    for run_id in finished:
        log.warning("freeing the warehouse slot of run %s, which has ended", run_id[:8])
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return bool(finished)


def _interval_to_next_pending_claim_check(self: InstanceConcurrencyContext) -> float:
    if not self._pending_claims:
        return 0.0
    now = time.time()
    next_check = min((at - now for at in self._pending_timeouts.values()), default=0.0)
    # Short sleeps: a signal is acted on by the next claim, and Dagster's loop calls it right after this sleep.
    return max(0.0, min(SLEEP_S, next_check))


class PoolTurns(Turns):
    """A step's turns at the warehouse: the pool's slot, claimed for one write and freed after it, so that a step
    which spends most of its time elsewhere (a full sync listing Scalekit) holds the slot only while it writes.

    The pool queues claims first come, first served (Dagster's pending steps, by priority then time), so a step
    that takes turn after turn lets every step that asked meanwhile write in between, and is never passed over
    itself: a burst of webhook runs delays a reconciliation by their writes, never indefinitely. A step taking
    turns declares no ``pool``: the executor's claim would hold the slot for the whole step."""

    def __init__(self, instance, run_id: str, step_key: str, pool: str = WAREHOUSE_POOL):
        self.instance, self.run_id, self.step_key, self.pool = instance, run_id, step_key, pool

    @classmethod
    def of(cls, context: dg.AssetExecutionContext) -> "PoolTurns":
        return cls(context.instance, context.run.run_id, context.get_step_execution_context().step.key)

    @contextmanager
    def turn(self) -> Iterator[None]:
        storage = self.instance.event_log_storage
        try:
            wait = None
            while not storage.claim_concurrency_slot(self.pool, self.run_id, self.step_key).is_claimed:
                if check_captured_interrupt():
                    raise DagsterExecutionInterruptedError()
                if wait is None:
                    wait = _Wait(wait_bound_s())
                    # Waiting a turn is routine: said (in the run's log, an event) only once it lasts.
                    wait.said_at = wait.started - SAY_EVERY_S + TURN_SAY_AFTER_S
                _still_waiting(self.instance, self.run_id, self.pool, self.step_key, wait)
                time.sleep(TURN_CHECK_S)
            yield
        finally:  # the slot, or the place in its queue: a run that stops here keeps neither
            storage.free_concurrency_slot_for_step(self.run_id, self.step_key)

    def others_waiting(self) -> bool:
        info = self.instance.event_log_storage.get_concurrency_info(self.pool)
        return any(step.run_id != self.run_id or step.step_key != self.step_key for step in info.pending_steps)


_dagster_claim = InstanceConcurrencyContext.claim


def install() -> None:
    """Replace Dagster's pool waiting in this process (idempotent)."""
    if InstanceConcurrencyContext.claim is not _claim:
        InstanceConcurrencyContext.claim = _claim
        InstanceConcurrencyContext.interval_to_next_pending_claim_check = _interval_to_next_pending_claim_check
