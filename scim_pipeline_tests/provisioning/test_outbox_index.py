"""The outbox index's ready marks, and the leases a delivery takes on them (a real SQLite file)."""

import sqlite3
from datetime import timedelta

from scim_pipeline.provisioning.outbox_index import DEFAULT_LEASE, OutboxIndex

from .conftest import T0


def test_a_claim_is_a_lease_that_comes_due_again_unless_released(tmp_path):
    index = OutboxIndex(tmp_path / "outbox.sqlite")
    index.mark_ready(["org_a", "org_b"], T0)
    index.mark_ready(["org_c"], T0 + timedelta(hours=1))
    lease = index.claim(["org_a", "org_b", "org_c"], T0)
    assert lease.organizations == ["org_a", "org_b"]  # what was due
    assert index.due(T0) == [] and index.due(T0 + DEFAULT_LEASE - timedelta(seconds=1)) == []
    index.release(lease, ["org_a"])  # org_a was delivered; the delivery died before it finished org_b
    assert index.due(T0 + DEFAULT_LEASE) == ["org_b"]
    taken = index.claim(["org_b"], T0 + DEFAULT_LEASE)  # the next delivery takes it over
    assert taken.organizations == ["org_b"]
    index.release(taken)
    assert index.next_ready_at() == T0 + timedelta(hours=1)  # org_c was never claimed
    index.release(lease)  # a lease already taken over releases nothing
    assert index.due(T0 + timedelta(hours=1)) == ["org_c"]


def test_marks_made_during_a_lease_outlive_it(tmp_path):
    index = OutboxIndex(tmp_path / "outbox.sqlite")
    index.mark_ready(["org_a", "org_b"], T0)
    lease = index.claim(["org_a", "org_b"], T0)
    index.mark_ready(["org_a"], T0 + timedelta(hours=2))  # the delivery left a retry for later
    index.mark_ready(["org_b"], T0 + timedelta(seconds=5))  # new changes came in while it ran
    assert index.due(T0 + timedelta(seconds=5)) == ["org_b"]
    index.release(lease)
    assert index.due(T0 + timedelta(hours=2)) == ["org_a", "org_b"]
    assert index.due(T0 + timedelta(hours=1)) == ["org_b"]


def test_claiming_every_mark_takes_those_not_due_too(tmp_path):
    index = OutboxIndex(tmp_path / "outbox.sqlite")
    index.mark_ready(["org_a"], T0 + timedelta(minutes=1))  # a safety net behind an inline delivery
    lease = index.claim(["org_a"], T0, due_only=False)
    assert lease.organizations == []
    index.release(lease)
    assert index.next_ready_at() is None


def test_an_index_written_before_leases_is_upgraded(tmp_path):
    path = tmp_path / "outbox.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE ready (organization_id TEXT PRIMARY KEY, ready_at TEXT NOT NULL)")
        con.execute("INSERT INTO ready VALUES ('org_a', ?)", [T0.isoformat()])
    index = OutboxIndex(path)
    assert index.due(T0) == ["org_a"]
    lease = index.claim(["org_a"], T0)
    assert lease.organizations == ["org_a"] and index.due(T0) == []
    index.release(lease)
    assert index.next_ready_at() is None
