import asyncio
import json
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from scim_pipeline.receiver.inbox import Inbox, InboxClosed
from scim_pipeline_tests.receiver.helpers import event_body


@pytest.fixture(params=["sqlite", "postgres"])
def inbox_at(request, home):
    """Where an inbox lives, for each store: a SQLite file in the home, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return home / "inbox.sqlite"
    return request.getfixturevalue("postgres_url")


def _put(inbox: Inbox, webhook_id: str, **kw):
    return inbox.put(webhook_id, event_body(**kw).decode())


def test_reader_on_missing_file_is_empty(home):
    inbox = Inbox(home / "inbox.sqlite")
    assert inbox.read_after(0) == [] and inbox.last_seq() == 0 and inbox.count() == 0
    assert not (home / "inbox.sqlite").exists()  # reading never creates the file


def test_stores_envelope_columns_and_raw_body(inbox_at):
    body = event_body("organization.directory.group_created", org="org_9")
    with Inbox(inbox_at) as inbox:
        stored = inbox.put("msg_1", body.decode())
        assert (stored.seq, stored.duplicate) == (1, False)
    (event,) = Inbox(inbox_at).read_after(0)
    payload = json.loads(body)
    assert event.webhook_id == "msg_1" and event.event_id == payload["id"]
    assert event.type == "organization.directory.group_created" and event.organization_id == "org_9"
    assert event.occurred_at == payload["occurred_at"] and event.body == body.decode() and event.payload == payload
    assert datetime.fromisoformat(event.received_at) <= datetime.now(timezone.utc)


def test_duplicate_webhook_id_stored_once_and_seq_stays_dense(inbox_at):
    with Inbox(inbox_at) as inbox:
        first = _put(inbox, "msg_1")
        again = _put(inbox, "msg_1")
        second = _put(inbox, "msg_2")
    assert again.duplicate and again.seq == first.seq
    assert second.seq == first.seq + 1
    reader = Inbox(inbox_at)
    assert reader.count() == 2 and reader.last_seq() == second.seq
    assert [e.webhook_id for e in reader.read_after(0)] == ["msg_1", "msg_2"]


def test_non_string_envelope_fields_are_kept_only_in_body(inbox_at):
    with Inbox(inbox_at) as inbox:
        inbox.put("msg_1", json.dumps({"type": 7, "id": None, "data": {}}))
    (event,) = Inbox(inbox_at).read_after(0)
    assert event.type is None and event.event_id is None and event.payload["type"] == 7


def test_read_after_pages(inbox_at):
    with Inbox(inbox_at) as inbox:
        for i in range(25):
            _put(inbox, f"msg_{i}")
    reader = Inbox(inbox_at)
    page = reader.read_after(10, limit=7)
    assert [e.seq for e in page] == list(range(11, 18))
    assert reader.read_after(25) == []


def test_concurrent_writers_and_a_reader_in_another_connection(inbox_at):
    """Many threads append while a reader follows with its own cursor: it sees each event once, in seq order."""
    path = inbox_at
    writers, per_writer = 8, 150
    inbox = Inbox(path)
    inbox.start()
    done = threading.Event()

    def write(w):
        for i in range(per_writer):
            _put(inbox, f"w{w}_{i}")

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    reader, cursor, seen = Inbox(path), 0, []
    # Bounded in time, not in reads: on a loaded machine the writers outlast any fixed number of quick reads.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        page = reader.read_after(cursor, limit=100)
        if page:
            assert [e.seq for e in page] == sorted(e.seq for e in page) and page[0].seq > cursor
            seen.extend(e.webhook_id for e in page)
            cursor = page[-1].seq
        elif done.is_set():
            break
        if not any(t.is_alive() for t in threads):
            done.set()
    for t in threads:
        t.join()
    inbox.close()
    assert len(seen) == len(set(seen)) == writers * per_writer
    assert reader.last_seq() == writers * per_writer


def test_async_append_from_many_tasks(inbox_at):
    async def main():
        inbox = Inbox(inbox_at)
        bodies = [event_body().decode() for _ in range(300)]
        results = await asyncio.gather(*(inbox.append(f"msg_{i}", b, json.loads(b)) for i, b in enumerate(bodies)))
        inbox.close()
        return results

    results = asyncio.run(main())
    assert sorted(r.seq for r in results) == list(range(1, 301))


def test_close_flushes_and_refuses_later_appends(inbox_at):
    inbox = Inbox(inbox_at)
    futures = []

    async def main():
        futures.extend(asyncio.ensure_future(inbox.append(f"m{i}", "{}", {})) for i in range(50))
        await asyncio.sleep(0)  # let every append reach the queue
        inbox.close()
        return await asyncio.gather(*futures)

    assert len(asyncio.run(main())) == 50
    assert Inbox(inbox_at).count() == 50
    with pytest.raises(InboxClosed):
        inbox.put("late", "{}")


def test_prunes_rows_older_than_retention_and_keeps_seq_monotonic(inbox_at):
    path = inbox_at
    old = (datetime.now(timezone.utc) - timedelta(hours=73)).isoformat(timespec="milliseconds")
    with Inbox(path) as inbox:
        inbox.put("old_1", "{}", received_at=old)
        inbox.put("old_2", "{}", received_at=old)
        inbox.put("new_1", "{}")
    with Inbox(path) as inbox:
        inbox.start()  # pruning runs at start and then on a schedule in the writer
        assert [e.webhook_id for e in inbox.read_after(0)] == ["new_1"]
        assert inbox.put("new_2", "{}").seq == 4  # never reuses a pruned seq
    # Everything pruned: the next seq still follows the highest ever handed out.
    with Inbox(path, retention_s=0) as inbox:
        inbox.start()
        assert inbox.count() == 0 and inbox.last_seq() == 4
        assert inbox.put("new_3", "{}").seq == 5


def test_scheduled_prune_in_the_writer(inbox_at):
    path = inbox_at
    old = (datetime.now(timezone.utc) - timedelta(hours=80)).isoformat(timespec="milliseconds")
    with Inbox(path, prune_interval_s=0.05) as inbox:
        inbox.put("fresh", "{}")
        inbox.put("stale", "{}", received_at=old)
        for _ in range(200):
            if inbox.count() == 1:
                break
            threading.Event().wait(0.02)
        assert [e.webhook_id for e in inbox.read_after(0)] == ["fresh"]


def test_file_is_in_wal_mode(home):
    path = home / "inbox.sqlite"
    with Inbox(path) as inbox:
        inbox.put("m", "{}")
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    finally:
        conn.close()


def test_applied_marks_and_the_events_not_yet_applied_per_organization(inbox_at):
    path = inbox_at
    reader = Inbox(path)
    if isinstance(path, Path):
        reader.mark_applied({"org_a": 1})  # no inbox file yet: nothing to mark, nothing created
        assert not path.exists()
    assert reader.applied_marks() == {} and reader.organizations() == []
    with Inbox(path) as inbox:
        for i, org in enumerate(["org_a", "org_b", "org_a", None, "org_b", "org_a"], 1):
            inbox.put(f"msg_{i}", json.dumps({"organization_id": org}) if org else "{}",
                      received_at=f"2026-11-28T00:00:0{i}.000+00:00")
    assert reader.organizations() == [None, "org_a", "org_b"]
    assert [e.seq for e in reader.read_organization("org_a", 1, 6)] == [3, 6]
    assert [e.seq for e in reader.read_organization("org_a", 0, 5)] == [1, 3]
    assert [e.seq for e in reader.read_organization(None, 0, 0)] == [4]

    reader.mark_applied({"org_a": 3, "quarantine": 4})
    reader.mark_applied({"org_a": 1})  # an older mark never moves one back
    assert reader.applied_marks() == {"org_a": 3, "quarantine": 4}
    first = reader.first_unapplied({"org_a": 3, "org_b": 0, None: 4}, up_to=5)
    assert first == {"org_b": (2, "2026-11-28T00:00:02.000+00:00")}  # org_a's seq 6 is past up_to
    assert reader.first_unapplied({"org_a": 3}, up_to=6) == {"org_a": (6, "2026-11-28T00:00:06.000+00:00")}
    # The receiver's writer keeps working beside the marks (another connection, another process in production).
    with Inbox(path) as inbox:
        assert inbox.put("msg_7", "{}").seq == 7
    assert reader.applied_marks() == {"org_a": 3, "quarantine": 4}
