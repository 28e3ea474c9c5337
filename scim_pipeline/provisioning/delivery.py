"""Delivery of the ledger's ready changes to the application: the one path from the warehouse to the application.

Per organization: prepare and read what is ready (short write), send it in protocol order batch after batch with no
warehouse lock held, then record every answer (short write). Small organizations share those writes: one prepares
(and one records for) consecutive organizations until they add up to ``BATCH_CHANGES`` changes or
``BATCH_ORGANIZATIONS``, since opening and checkpointing the warehouse costs more than a small organization's
statements. The delivered state changes only from acknowledged
results, so an application that is down never loses or duplicates anything: its changes wait in the ledger with a
backoff. Preparing means: dead changes come back once the application answers again after a cool-down, in-doubt
changes are re-derived against the desired state, and changes of a disabled directory are held (and released once
it is enabled again).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.change_sets import HOLD_DIRECTORY, apply_directory_holds
from scim_pipeline.provisioning.changes_protocol import ChangeResult, DeliveryClient, send_changes
from scim_pipeline.provisioning.ledger import (
    ready_changes,
    record_failure,
    record_results,
    rederive_in_doubt,
    revive_dead,
)
from scim_pipeline.provisioning.outbox_index import Lease, OutboxIndex
from scim_pipeline.warehouse.connection import Turns, Warehouse
from scim_pipeline.warehouse.sql import first_int


@dataclass
class DeliveryPolicy:
    max_attempts: int = 8  # per change and round, across runs; then it is dead and shown in the UI
    backoff_s: float = 30.0  # first wait before a failed change is tried again (doubling, capped, jittered)
    backoff_cap_s: float = 3600.0
    batch_size: int = 500
    # A dead change gets a fresh round once its organization is delivered to again, this long after it died: an
    # application that answers again has recovered, and the wait keeps a change it keeps refusing from cycling fast.
    dead_cooldown_s: float = 900.0


@dataclass
class DeliveryReport:
    sent: Counter = field(default_factory=Counter)  # "<entity>.<op>" -> applied
    rejected: int = 0
    failed: int = 0
    dead: int = 0
    held_back: int = 0  # changes held for a disabled directory, until it is enabled again
    revived: int = 0  # dead changes given a fresh round
    replaced: int = 0  # in-doubt changes the directory changed its mind about, replaced before being sent again
    errors: dict[str, str] = field(default_factory=dict)  # organization -> transport error
    organizations: list[str] = field(default_factory=list)  # those that had changes to send

    @property
    def applied(self) -> int:
        return sum(self.sent.values())


BATCH_ORGANIZATIONS = 50
BATCH_CHANGES = 2000


def deliver_ready(
    warehouse: Warehouse,
    client: DeliveryClient,
    organization_ids: list[str],
    outbox: OutboxIndex,
    policy: DeliveryPolicy = DeliveryPolicy(),
    now: Callable[[], datetime] = utcnow,
    progress: Callable[[str], None] = print,
    lease: Lease | None = None,
    turns: Turns | None = None,
) -> DeliveryReport:
    """Deliver each organization's ready changes. ``lease``: the outbox claim this delivery works under; each
    organization is released once done, so one this delivery never finishes comes due again when the lease runs
    out. ``turns``: the delivery's writes (before and after each batch is sent, never while the application is
    called) wait their turn with the other writers, so that a busy warehouse never starves them."""
    report = DeliveryReport()
    turns = turns or Turns()
    todo = list(organization_ids)
    while todo:
        done, again = _deliver_batch(warehouse, turns, client, todo, outbox, policy, now, progress, report,
                                     first=True)
        # A second pass sends the dead changes that this pass's answers brought back.
        while again:
            second, _ = _deliver_batch(warehouse, turns, client, again, outbox, policy, now, progress, report,
                                       first=False)
            again = again[len(second):]
        if lease is not None:
            outbox.release(lease, done)
        todo = todo[len(done):]
    return report


def _deliver_batch(warehouse, turns, client, orgs, outbox, policy, now, progress, report,
                   first: bool) -> tuple[list[str], list[str]]:
    """One pass over the first organizations of ``orgs`` (as many as make a batch): the organizations done, and
    those of them whose dead changes are due back now."""
    cooldown = timedelta(seconds=policy.dead_cooldown_s)
    done: list[str] = []
    ready: dict[str, list[dict]] = {}
    prepared: dict[str, tuple[int, int]] = {}  # organization -> (revived, replaced)
    marks: list[tuple[str, datetime]] = []
    with turns.turn(), warehouse.write() as con:
        stamp = now()
        # Only changes pending, failed, dead or held are ever prepared or sent: an organization with none has
        # nothing to do (most of them, in a sync where little changed), and is passed over without a statement.
        active = dict(con.execute(
            "SELECT organization_id, count(*) FROM change_sets WHERE list_contains($orgs, organization_id) "
            "AND status IN ('pending', 'failed', 'dead', 'held') GROUP BY 1", {"orgs": orgs}).fetchall())
        batch: list[str] = []
        batch_changes = 0  # pending to held, of the batch's organizations
        for org in orgs:
            if batch and (len(batch) >= BATCH_ORGANIZATIONS or batch_changes >= BATCH_CHANGES):
                break
            done.append(org)
            if org in active:
                batch.append(org)
                batch_changes += active[org]
        if batch:
            # Each step is one statement for the whole batch: a small organization's delivery costs less than
            # a statement.
            revived = revive_dead(con, batch, stamp, died_before=stamp - cooldown, delivered_since=True)
            rederived = rederive_in_doubt(con, batch, stamp)
            apply_directory_holds(con, batch)
            by_org: dict[str, list[dict]] = defaultdict(list)
            for change in ready_changes(con, batch, stamp, policy.max_attempts):
                by_org[change["organization_id"]].append(change)
            report.revived += sum(revived.values())
            report.replaced += rederived["replaced"]
            if first:
                report.held_back += first_int(con.execute(
                    "SELECT count(*) FROM change_sets WHERE list_contains($orgs, organization_id) "
                    "AND status = 'held' AND hold_reason = $reason", {"orgs": batch, "reason": HOLD_DIRECTORY}))
            for org in batch:
                if by_org.get(org):
                    ready[org] = by_org[org]
                    prepared[org] = (revived.get(org, 0), rederived["replaced_by_organization"].get(org, 0))
                    client.read_state(con, org)
            marks += _next_revivals(con, [org for org in batch if org not in ready], cooldown).items()
    for org, at in marks:
        outbox.mark_ready([org], at)
    if not ready:
        return done, []

    results = {org: send_changes(client, org, changes, batch_size=policy.batch_size) for org, changes in ready.items()}
    again, said = [], []
    marks = []
    with turns.turn(), warehouse.write() as con:
        stamp = now()
        answered = {org: [r for r in results[org] if r.status in ("applied", "rejected")] for org in ready}
        # The answers of the whole batch at once (they name their changes), then what was not delivered.
        if any(answered.values()):
            record_results(con, [r.as_dict() for org in ready for r in answered[org]], stamp, policy.max_attempts,
                           policy.backoff_s, policy.backoff_cap_s)
        failed = {org: [r for r in results[org] if r.status == "failed"] for org in ready}
        for org in ready:
            if failed[org]:
                _record_failed(con, org, failed[org], answered[org], stamp, policy, report)
            client.write_state(con, org)
        retries = dict(con.execute(
            "SELECT organization_id, min(next_attempt_at) FROM change_sets WHERE list_contains($orgs, organization_id) "
            "AND status = 'failed' GROUP BY 1", {"orgs": list(ready)}).fetchall())
        revivals = _next_revivals(con, list(ready), cooldown)
        for org, changes in ready.items():
            retry_at, revival_at = retries.get(org), revivals.get(org)
            if retry_at is not None:
                marks.append((org, retry_at))
            if revival_at is not None and revival_at > stamp:
                marks.append((org, revival_at))
            if first and revival_at is not None and revival_at <= stamp:
                again.append(org)
            by_id = {c["change_id"]: c for c in changes}
            for r in answered[org]:
                if r.status == "applied":
                    c = by_id[r.change_id]
                    report.sent[f"{c['entity']}.{c['op']}"] += 1
                else:
                    report.rejected += 1
            revived, replaced = prepared[org]
            said.append(
                f"{org}: {sum(1 for r in answered[org] if r.status == 'applied')} applied, "
                f"{sum(1 for r in answered[org] if r.status == 'rejected')} rejected, {len(failed[org])} not delivered"
                + (f" ({report.errors[org]})" if org in report.errors else "")
                + (f"; {revived} dead change(s) tried again" if revived else "")
                + (f"; {replaced} in-doubt change(s) re-derived" if replaced else "")
            )
    for org, at in marks:
        outbox.mark_ready([org], at)
    if said:  # one message a batch: a message can cost more than a small organization's delivery
        progress("\n".join(said))
    report.organizations += [org for org in ready if org not in report.organizations]
    return done, again


def _record_failed(con, org: str, failed: list[ChangeResult], answered: list[ChangeResult], stamp: datetime,
                   policy: DeliveryPolicy, report: DeliveryReport) -> None:
    """Changes not delivered: those sent, by what is known of them (in doubt or not, a wait the application asked
    for); then those never sent, which wait as long as the last of the others without spending an attempt."""
    sent: dict[tuple, list[str]] = defaultdict(list)
    for r in failed:
        if r.sent:
            sent[(r.error or "not delivered", r.in_doubt, r.retry_after)].append(r.change_id)
    for (error, in_doubt, retry_after), ids in sent.items():
        outcome = record_failure(
            con, ids, error, stamp, policy.max_attempts, policy.backoff_s, policy.backoff_cap_s, in_doubt=in_doubt,
            retry_at=stamp + timedelta(seconds=retry_after) if retry_after is not None else None)
        report.failed += outcome["failed"]
        report.dead += outcome["dead"]
        report.errors.setdefault(org, error)
    unsent = [r for r in failed if not r.sent]
    if unsent:
        tried = [r.change_id for r in failed if r.sent] + [r.change_id for r in answered if r.status == "rejected"]
        until = con.execute("SELECT max(next_attempt_at) FROM change_sets WHERE list_contains($ids, change_id)",
                            {"ids": tried}).fetchall()[0][0]
        record_failure(con, [r.change_id for r in unsent], unsent[0].error, stamp, attempted=False,
                       retry_at=max(until or stamp, stamp + timedelta(seconds=policy.backoff_s)))
        report.failed += len(unsent)
        report.errors.setdefault(org, unsent[0].error)


def _next_revivals(con, orgs: list[str], cooldown: timedelta) -> dict[str, datetime]:
    """When each organization's first dead change comes back, for those the application has answered since it
    died."""
    if not orgs:
        return {}
    rows = con.execute(
        """
        SELECT c.organization_id, min(coalesce(c.dead_at, c.created_at)) FROM change_sets c
        WHERE list_contains($orgs, c.organization_id) AND c.status = 'dead'
          AND coalesce(c.dead_at, c.created_at) < (SELECT max(x.delivered_at) FROM change_sets x
                                                   WHERE x.organization_id = c.organization_id)
        GROUP BY 1
        """,
        {"orgs": orgs},
    ).fetchall()
    return {org: died + cooldown for org, died in rows}
