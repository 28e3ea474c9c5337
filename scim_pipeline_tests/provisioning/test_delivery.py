"""A delivery pass (``deliver_ready``) over a real ledger, against the demo application or scripted HTTP servers,
with the clock given: dead changes coming back, adaptive batches, scheduled waits, re-derived doubts, leases."""

import subprocess
import sys
from datetime import timedelta

import pytest

from scim_pipeline.devstack.services import free_port
from scim_pipeline.provisioning.change_sets import compute_change_sets
from scim_pipeline.provisioning.delivery import DeliveryPolicy, deliver_ready
from scim_pipeline.provisioning.outbox_index import DEFAULT_LEASE, OutboxIndex
from scim_pipeline.warehouse.connection import Warehouse, WarehouseBusy
from scim_pipeline_tests.devstack.demo_app.helpers import running_app

from .conftest import T0, add_user, at
from .test_change_sets import derive
from .test_changes_protocol import Reply, Scripted, Sleeps, client

ORG = "org_a"


@pytest.fixture
def outbox(tmp_path):
    return OutboxIndex(tmp_path / "outbox.sqlite")


def users(warehouse, *user_ids, now=T0, **kwargs):
    with warehouse.write() as con:
        for user_id in user_ids:
            add_user(con, user_id, **kwargs)
        derive(con)
        compute_change_sets(con, ORG, now)


def rows(warehouse, where="true"):
    with warehouse.read() as con:
        return con.execute(f"SELECT entity_key, op, status, attempts, in_doubt, last_error, next_attempt_at "
                           f"FROM change_sets WHERE entity = 'user' AND {where} ORDER BY entity_key").fetchall()


def deliver(warehouse, url, outbox, when, policy=DeliveryPolicy(max_attempts=2, backoff_s=0), **kw):
    """One delivery run at ``when``, as the delivery job makes it: a lease on the organization's mark."""
    lease = outbox.claim([ORG], when, due_only=False)
    with client(url, kw.pop("sleeps", None), max_attempts=kw.pop("max_attempts", 1), **kw) as c:
        return deliver_ready(warehouse, c, [ORG], outbox, policy, now=lambda: when, progress=lambda _: None,
                             lease=lease)


def test_dead_changes_come_back_after_a_cool_down_once_the_application_answers_again(warehouse, outbox):
    users(warehouse, "u1")
    with Scripted([Reply(503)]) as down:  # an outage: two attempts, then dead
        deliver(warehouse, down.url, outbox, at(0))
        assert deliver(warehouse, down.url, outbox, at(1)).dead == 2  # the user and the default role
    assert {r[2] for r in rows(warehouse)} == {"dead"}
    users(warehouse, "u2", now=at(5))
    with Scripted([Reply(200)]) as up:
        report = deliver(warehouse, up.url, outbox, at(6))  # the application is back: u2 goes through
        assert report.applied == 2 and report.revived == 0  # u1 still cooling down
        assert outbox.next_ready_at() == at(1 + 15)  # and comes back then
        report = deliver(warehouse, up.url, outbox, at(16))
        assert report.revived == 2 and report.applied == 2
    assert [(r[0], r[2], r[3]) for r in rows(warehouse)] == [("u1", "delivered", 3), ("u2", "delivered", 1)]


def test_a_dead_change_stays_dead_while_nothing_reaches_the_application(warehouse, outbox):
    users(warehouse, "u1")
    with Scripted([Reply(503)]) as down:
        deliver(warehouse, down.url, outbox, at(0))
        deliver(warehouse, down.url, outbox, at(1))
        assert deliver(warehouse, down.url, outbox, at(60)).revived == 0
    assert {r[2] for r in rows(warehouse)} == {"dead"}


def test_a_batch_too_large_is_split_and_a_change_too_large_alone_is_rejected_not_in_doubt(warehouse, outbox):
    users(warehouse, *[f"u{i}" for i in range(6)])
    users(warehouse, "u_big", given="x" * 5000)
    policy = DeliveryPolicy(max_attempts=2, backoff_s=30)
    with Scripted([Reply(200, max_bytes=4000)]) as server:
        report = deliver(warehouse, server.url, outbox, at(0), policy)
    assert report.applied == 13 and report.rejected == 1  # 7 users and their default roles, but u_big
    (big,) = rows(warehouse, "entity_key = 'u_big'")
    assert big[2:6] == ("failed", 1, False, "rejected: HTTP 413: {\"error\": \"request entity too large\"}")
    assert big[6] > at(0)  # retried on the backoff


def test_a_refused_request_is_a_rejection_retried_on_the_backoff_then_dead(warehouse, outbox):
    users(warehouse, "u1", "u2")
    with Scripted([Reply(400, body={"error": "malformed batch: nope"})]) as server:
        deliver(warehouse, server.url, outbox, at(0))
        assert {(r[2], r[3], r[4]) for r in rows(warehouse)} == {("failed", 1, False)}
        assert rows(warehouse)[0][5].startswith("rejected: HTTP 400: ")
        report = deliver(warehouse, server.url, outbox, at(10))
    assert report.dead == 0 and report.rejected == 4
    assert {(r[2], r[3], r[4]) for r in rows(warehouse)} == {("dead", 2, False)}


def test_later_batches_never_sent_are_not_in_doubt_and_spend_no_attempt(warehouse, outbox):
    users(warehouse, "u1", "u2", "u3")
    policy = DeliveryPolicy(max_attempts=8, backoff_s=30, batch_size=2)
    with Scripted([Reply(503)]) as server:
        deliver(warehouse, server.url, outbox, at(0), policy)
    with warehouse.read() as con:
        states = con.execute("SELECT status, attempts, in_doubt, last_error LIKE 'not sent:%' FROM change_sets "
                             "ORDER BY attempts DESC, change_id").fetchall()
    assert states[:2] == [("failed", 1, True, False)] * 2  # the 5xx may have been applied
    assert set(states[2:]) == {("failed", 0, False, True)}


def test_a_long_retry_after_is_scheduled_instead_of_slept_on(warehouse, outbox):
    users(warehouse, "u1")
    sleeps = Sleeps()
    with Scripted([Reply(429, {"Retry-After": "600"})]) as server:
        deliver(warehouse, server.url, outbox, at(0), max_attempts=5, sleeps=sleeps)
    assert sleeps == []
    assert {(r[2], r[3], r[4], r[6]) for r in rows(warehouse)} == {("failed", 1, False, at(10))}
    assert outbox.next_ready_at() == at(10)


def test_an_in_doubt_deactivation_the_directory_undid_never_reaches_the_application(warehouse, outbox, home):
    with running_app(home) as app:
        users(warehouse, "u1")
        deliver(warehouse, app.url, outbox, at(1), secret=app.secret)
        users(warehouse, "u1", now=at(2), active=False)
        with Scripted([Reply(200, delay=1)]) as slow:  # the answer never comes in time
            deliver(warehouse, slow.url, outbox, at(3), timeout=0.2)
        ((_, stale_op, status, _, in_doubt, _, _),) = rows(warehouse, "status = 'failed'")
        assert (stale_op, status, in_doubt) == ("deactivate", "failed", True)
        users(warehouse, "u1", now=at(4), active=True)  # the directory changed its mind
        report = deliver(warehouse, app.url, outbox, at(5), secret=app.secret)
        assert report.replaced == 2  # the deactivation, and the revocation of the default role that came with it
        applied = app.stats()["applications"]
        with warehouse.read() as con:
            stale, reassert = con.execute(
                "SELECT change_id FROM change_sets WHERE entity_key = 'u1' AND op IN ('deactivate', 'reactivate') "
                "ORDER BY op").fetchall()
        assert stale[0] not in applied and reassert[0] in applied
        assert app.state()["users"][0]["active"] is True


def test_a_delivery_that_dies_leaves_its_organizations_to_come_due_again(tmp_path, outbox):
    warehouse = Warehouse(tmp_path / "warehouse.duckdb", lock_timeout_s=0.5)
    users(warehouse, "u1")
    outbox.mark_ready([ORG], at(0))
    lease = outbox.claim([ORG], at(0))
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(warehouse.path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with client(f"http://127.0.0.1:{free_port()}") as c, pytest.raises(WarehouseBusy):
            deliver_ready(warehouse, c, [ORG], outbox, now=lambda: at(0), progress=lambda _: None, lease=lease)
    finally:
        holder.kill()
        holder.wait()
    assert outbox.due(at(0) + DEFAULT_LEASE - timedelta(seconds=1)) == []
    assert outbox.due(at(0) + DEFAULT_LEASE) == [ORG]


def test_a_delivery_that_finishes_releases_its_lease(warehouse, outbox):
    users(warehouse, "u1", "u2")
    outbox.mark_ready([ORG], at(0))
    lease = outbox.claim([ORG], at(0))
    with Scripted([Reply(200)]) as server, client(server.url) as c:
        deliver_ready(warehouse, c, [ORG], outbox, now=lambda: at(0), progress=lambda _: None, lease=lease)
    assert outbox.next_ready_at() is None


def test_retry_revives_dead_changes_now_and_the_checks_show_what_waits(home, capsys):
    from scim_pipeline.cli import main
    from scim_pipeline.config import settings
    from scim_pipeline.defs.checks import dead_changes, held_changes
    from scim_pipeline.lib.clock import utcnow
    from scim_pipeline.provisioning.ledger import record_failure

    warehouse = Warehouse(settings().warehouse_path)
    users(warehouse, "u1")
    with warehouse.write() as con:
        add_user(con, "v1", org="org_b")
        derive(con, "org_b")
        compute_change_sets(con, "org_b", T0)
        ids = [r[0] for r in con.execute("SELECT change_id FROM change_sets").fetchall()]
        record_failure(con, ids, "HTTP 503: down for maintenance", at(3), max_attempts=1)
        con.execute("INSERT INTO directories (directory_id, organization_id, enabled) VALUES ('dir_2', 'org_c', false)")
        add_user(con, "w1", org="org_c")
        con.execute("UPDATE directory_users SET directory_id = 'dir_2' WHERE user_id = 'w1'")
        derive(con, "org_c")
        compute_change_sets(con, "org_c", T0)

    dead = dead_changes(warehouse=warehouse)
    assert not dead.passed and dead.metadata["failing"].value == 4
    example = dead.metadata["examples"].data[0]
    assert "HTTP 503: down for maintenance" in example and "1" in example and str(at(3)) in example
    held = held_changes(warehouse=warehouse)
    assert held.metadata["examples"].data == [["org_c", "directory disabled", "2", str(T0)]]
    capsys.readouterr()
    assert main(["changes", "--org", "org_c"]) == 0
    assert capsys.readouterr().out.count("directory disabled") == 2  # the column says why each is held

    outbox = OutboxIndex(settings().outbox_index_path)
    assert main(["retry", "--org", "org_a"]) == 0
    assert "revived 2 dead change(s)" in capsys.readouterr().out
    assert outbox.due(utcnow()) == ["org_a"]
    with warehouse.read() as con:
        assert dict(con.execute("SELECT organization_id, any_value(status) FROM change_sets "
                                "WHERE organization_id <> 'org_c' GROUP BY 1").fetchall()) == {
            "org_a": "pending", "org_b": "dead"}
    assert main(["retry", "--all"]) == 0
    out = capsys.readouterr().out
    assert "org_b: 2 dead change(s) tried again" in out and "revived 2 dead change(s)" in out
    assert main(["changes", "--status", "dead"]) == 0
    assert capsys.readouterr().out.strip() == "(no rows)"
    assert dead_changes(warehouse=warehouse).passed
