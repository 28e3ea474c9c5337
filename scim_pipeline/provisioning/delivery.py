"""Delivery of the ledger's ready changes to the application: the one path from the warehouse to the application.

Per organization: read what is ready (short read), send it in protocol order batch after batch with no warehouse
lock held, then record every answer (short write). The delivered state changes only from acknowledged results, so
an application that is down never loses or duplicates anything: its changes wait in the ledger with a backoff.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.outbox_index import OutboxIndex
from scim_pipeline.provisioning.changes_protocol import ApplicationClient, send_changes
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.provisioning.ledger import ready_changes, record_failure, record_results


@dataclass
class DeliveryPolicy:
    max_attempts: int = 8  # per change, across runs; then it is dead and shown in the UI
    backoff_s: float = 30.0  # first wait before a failed change is tried again (doubling, capped, jittered)
    backoff_cap_s: float = 3600.0
    batch_size: int = 500


@dataclass
class DeliveryReport:
    sent: Counter = field(default_factory=Counter)  # "<entity>.<op>" -> applied
    rejected: int = 0
    failed: int = 0
    dead: int = 0
    held_back: int = 0  # changes of a disabled directory, kept until it is enabled again
    errors: dict[str, str] = field(default_factory=dict)  # organization -> transport error

    @property
    def applied(self) -> int:
        return sum(self.sent.values())


def _disabled_users(con, organization_id: str) -> set[str]:
    rows = con.execute(
        """
        SELECT u.user_id FROM directory_users u JOIN directories d USING (directory_id)
        WHERE u.organization_id = $org AND NOT d.enabled
        """,
        {"org": organization_id},
    ).fetchall()
    return {r[0] for r in rows}


def deliver_ready(
    warehouse: Warehouse,
    client: ApplicationClient,
    organization_ids: list[str],
    outbox: OutboxIndex,
    policy: DeliveryPolicy = DeliveryPolicy(),
    now: Callable[[], datetime] = utcnow,
    progress: Callable[[str], None] = print,
) -> DeliveryReport:
    report = DeliveryReport()
    for org in organization_ids:
        with warehouse.read() as con:
            changes = ready_changes(con, org, now(), policy.max_attempts)
            disabled = _disabled_users(con, org)
        if disabled:
            kept = [c for c in changes if c["data"].get("user_id") not in disabled]
            report.held_back += len(changes) - len(kept)
            changes = kept
        if not changes:
            continue
        results = send_changes(client, org, changes, batch_size=policy.batch_size)
        by_id = {c["change_id"]: c for c in changes}
        answered = [r for r in results if r.status in ("applied", "rejected")]
        failed = [r for r in results if r.status == "failed"]
        with warehouse.write() as con:
            stamp = now()
            if answered:
                record_results(con, [r.as_dict() for r in answered], stamp, policy.max_attempts, policy.backoff_s,
                               policy.backoff_cap_s)
            if failed:
                error = failed[0].error or "not delivered"
                outcome = record_failure(con, [r.change_id for r in failed], error, stamp, policy.max_attempts,
                                         policy.backoff_s, policy.backoff_cap_s)
                report.failed += outcome["failed"]
                report.dead += outcome["dead"]
                report.errors[org] = error
            retry_at = con.execute(
                "SELECT min(next_attempt_at) FROM change_sets WHERE organization_id = $org AND status = 'failed'",
                {"org": org},
            ).fetchone()[0]
        if retry_at is not None:
            outbox.mark_ready([org], retry_at)
        for r in answered:
            if r.status == "applied":
                c = by_id[r.change_id]
                report.sent[f"{c['entity']}.{c['op']}"] += 1
            else:
                report.rejected += 1
        progress(
            f"{org}: {sum(1 for r in answered if r.status == 'applied')} applied, "
            f"{sum(1 for r in answered if r.status == 'rejected')} rejected, {len(failed)} not delivered"
            + (f" ({report.errors[org]})" if org in report.errors else "")
        )
    return report
