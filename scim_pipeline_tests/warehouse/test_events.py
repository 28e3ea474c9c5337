"""Webhook events applied to a real warehouse file from a real inbox: each event is applied or recorded invalid on its
own, so a malformed event never keeps a well-formed one from being applied."""

import copy
import json
import random
from datetime import datetime
from pathlib import Path

from scim_pipeline.receiver.inbox import Inbox
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.events import apply_events, event_from_body, event_from_inbox

ORG = "org_1"
USER_UPDATED = "organization.directory.user_updated"
GROUP_UPDATED = "organization.directory.group_updated"
DIRECTORY_DISABLED = "organization.directory_disabled"


def user_event(n: int, type_: str = USER_UPDATED, given_name: str | None = None) -> dict:
    data = {"id": f"diruser_{n}", "organization_id": ORG, "directory_id": "dir_1", "email": f"u{n}@x.io",
            "given_name": given_name or f"G{n}", "family_name": "F", "preferred_username": f"u{n}", "active": True,
            "emails": [f"u{n}@x.io"], "groups": [{"id": "dirgroup_1", "name": "Group"}], "title": "t"}
    return {"spec_version": "1", "id": f"evt_{n}", "type": type_, "occurred_at": "2026-11-28T10:00:00.123456789Z",
            "environment_id": "env_1", "organization_id": ORG, "object": "DirectoryUser", "data": data}


def group_event(n: int) -> dict:
    return {"spec_version": "1", "id": f"evt_g{n}", "type": GROUP_UPDATED, "occurred_at": "2026-11-28T10:00:00Z",
            "environment_id": "env_1", "organization_id": ORG, "object": "DirectoryGroup",
            "data": {"id": f"dirgroup_{n}", "organization_id": ORG, "directory_id": "dir_1", "display_name": "G"}}


def directory_event() -> dict:
    return {"spec_version": "1", "id": "evt_d1", "type": DIRECTORY_DISABLED, "occurred_at": "2026-11-28T10:00:00Z",
            "environment_id": "env_1", "organization_id": ORG, "object": "Directory",
            "data": {"id": "dir_1", "organization_id": ORG, "enabled": False}}


# (path, value): each makes an otherwise well-formed user event invalid.
MALFORMED = [
    (("occurred_at",), 12345), (("occurred_at",), None), (("occurred_at",), ""), (("occurred_at",), "yesterday"),
    (("occurred_at",), "2026-13-45T00:00:00Z"), (("occurred_at",), "2026-11-28T10:00:00"),
    (("occurred_at",), ["2026-11-28T10:00:00Z"]), (("occurred_at",), True), (("occurred_at",), {"at": 1}),
    (("occurred_at",), "2026-11-28T10:00:00.1234567891Z"), (("occurred_at",), "2026-11-28T25:00:00Z"),
    (("occurred_at",), "２０２６-11-28T10:00:00Z"), (("occurred_at",), 1.5e300),
    (("id",), 12345), (("id",), None), (("id",), ""), (("id",), {"x": 1}), (("id",), "evt 1"), (("id",), "e" * 300),
    (("type",), 5), (("type",), None), (("type",), [USER_UPDATED]), (("type",), {"type": USER_UPDATED}),
    (("object",), 5), (("object",), "DirectoryGroup"), (("spec_version",), 1), (("environment_id",), ["env_1"]),
    (("data",), None), (("data",), "x"), (("data",), [1]), (("data",), 5), (("data",), True),
    (("data", "id"), {"x": 1}), (("data", "id"), [1]), (("data", "id"), 5), (("data", "id"), None),
    (("data", "id"), ""), (("data", "id"), "dirgroup_1"), (("data", "id"), "diruser_1\n"),
    (("data", "id"), "diruser_../x"), (("data", "id"), 10 ** 30),
    (("data", "organization_id"), "org_2"), (("data", "organization_id"), 5),
    (("data", "directory_id"), 5), (("data", "directory_id"), "../x"), (("data", "directory_id"), ["dir_1"]),
    (("data", "active"), "yes"), (("data", "active"), 1), (("data", "active"), {"x": True}),
    (("data", "email"), 5), (("data", "email"), ["a@x.io"]), (("data", "given_name"), {"x": 1}),
    (("data", "family_name"), 7.5), (("data", "preferred_username"), [None]),
    (("data", "emails"), "a@x.io"), (("data", "emails"), [1, 2]), (("data", "emails"), {"x": 1}),
    (("data", "groups"), "dirgroup_1"), (("data", "groups"), {"id": "dirgroup_1"}), (("data", "groups"), [1]),
    (("data", "groups"), [{"id": 5}]), (("data", "groups"), [{"id": "../x"}]), (("data", "groups"), [{"name": "x"}]),
    (("data", "groups"), [{"id": "dirgroup_1", "name": 5}]), (("data", "groups"), [["dirgroup_1"]]),
    (("data", "title"), float("inf")), (("data", "title"), float("nan")), (("data", "given_name"), "\ud800"),
]
# Bodies that are not a readable event at all (the inbox's columns still route them to the organization).
UNREADABLE = ["not json", "[1, 2]", '"evt"', "null", '{"id": "evt_x", "data": ' + "[" * 50_000 + "]" * 50_000 + "}",
              '{"id": "evt_y", "occurred_at": "2026-11-28T10:00:00Z", "data": {"id": 1e999}}']


def put(inbox: Inbox, webhook_id: str, event: dict | str) -> None:
    body = event if isinstance(event, str) else json.dumps(event)
    inbox.put(webhook_id, body, payload={"organization_id": ORG})


def set_path(event: dict, path: tuple, value) -> dict:
    event = copy.deepcopy(event)
    target = event
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return event


def apply_inbox(wh: Warehouse, inbox_path) -> dict:
    """What the incremental run does for one organization: its inbox events, applied in one transaction."""
    events = [event_from_inbox(item) for item in Inbox(inbox_path).read_range(0) if item.organization_id == ORG]
    with wh.write() as con:
        return apply_events(con, events, datetime(2026, 11, 28, 12))


def seed(wh: Warehouse) -> None:
    with wh.write() as con:
        con.execute("INSERT INTO directories (directory_id, organization_id, enabled) VALUES ('dir_1', $o, true)",
                    {"o": ORG})
        con.execute("INSERT INTO directories (directory_id, organization_id, enabled) VALUES ('dir_2', 'org_2', true)")
        con.execute("INSERT INTO directory_users (user_id, organization_id, email)"
                    " VALUES ('diruser_999', 'org_2', 'o@x')")


def test_every_malformed_shape_is_recorded_invalid_and_its_neighbours_are_applied(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed(wh)
    valid, malformed = {}, {}
    with Inbox(tmp_path / "inbox.sqlite") as inbox:
        n = 0
        shapes = [set_path(user_event(0), path, value) for path, value in MALFORMED] + UNREADABLE + [
            set_path(group_event(0), ("data", "display_name"), 5),
            set_path(group_event(0), ("data", "id"), "diruser_1"),
            set_path(directory_event(), ("data", "id"), "diruser_1"),
            set_path(directory_event(), ("object",), "DirectoryUser"),
            set_path(user_event(999), ("id",), "evt_other_org"),  # a user of another organization
        ]
        for i, shape in enumerate(shapes):
            if isinstance(shape, dict) and shape.get("id") == "evt_0":
                shape = {**shape, "id": f"evt_bad_{i}"}
            put(inbox, f"msg_bad_{i}", shape)
            malformed[f"msg_bad_{i}"] = shape
            n += 1
            put(inbox, f"msg_ok_{n}", user_event(n, given_name=f"Valid{n}"))
            valid[f"diruser_{n}"] = f"Valid{n}"
    counts = apply_inbox(wh, tmp_path / "inbox.sqlite")
    assert counts["applied"] == len(valid) and counts["invalid"] == len(malformed)

    with wh.read() as con:
        users = dict(con.execute("SELECT user_id, given_name FROM directory_users WHERE organization_id = $o",
                                 {"o": ORG}).fetchall())
        recorded = {w: (outcome, reason) for w, outcome, reason in con.execute(
            "SELECT webhook_id, outcome, reason FROM webhook_events").fetchall()}
        other = con.execute("SELECT email FROM directory_users WHERE user_id = 'diruser_999'").fetchone()
    assert users == valid
    assert other == ("o@x",)
    for webhook_id, shape in malformed.items():
        outcome, reason = recorded[webhook_id]
        assert outcome == "invalid" and reason, (shape if isinstance(shape, str) else json.dumps(shape)[:200])
        assert "\n" not in reason and len(reason) <= 300


def test_random_malformations_never_block_a_valid_event(tmp_path):
    rng = random.Random(20261128)
    junk = [None, True, 0, -1, 1.5, 10 ** 40, "", " ", "x" * 5000, "\n", "\u0000", "\ud800", [], [None], {},
            {"id": None}, float("nan"), float("-inf"), "../../etc", "org_1", "diruser_1", "dirgroup_1", "dir_1"]
    paths = [path for path, _ in MALFORMED] + [("data", "raw_attributes"), ("data", "roles"), ("data", "name")]
    types = [USER_UPDATED, "organization.directory.user_created", "organization.directory.user_deleted"]
    wh = Warehouse(tmp_path / "w.duckdb")
    seed(wh)
    expected = {}
    with Inbox(tmp_path / "inbox.sqlite") as inbox:
        for i in range(400):
            if i % 4 == 0:
                expected[f"diruser_{5000 + i}"] = f"Valid{i}"
                put(inbox, f"msg_{i}", user_event(5000 + i, given_name=f"Valid{i}"))
                continue
            event = user_event(rng.randrange(6000, 6400), type_=rng.choice(types))
            event["id"] = f"evt_fuzz_{i}"
            for _ in range(rng.randint(1, 3)):
                event = set_path(event, rng.choice(paths), rng.choice(junk)) if isinstance(event.get("data"), dict) \
                    else set_path(event, ("type",), rng.choice(junk))
            put(inbox, f"msg_{i}", event)
    counts = apply_inbox(wh, tmp_path / "inbox.sqlite")
    assert sum(counts.values()) == 400
    with wh.read() as con:
        live = dict(con.execute("SELECT user_id, given_name FROM directory_users WHERE list_contains($ids, user_id)",
                                {"ids": list(expected)}).fetchall())
        # every event has its outcome recorded, but for a copy of an event id already seen (a junk id twice)
        assert con.execute("SELECT count(*) FROM webhook_events").fetchone()[0] == 400 - counts["duplicate"]
        assert con.execute("SELECT count(*) FROM webhook_events WHERE outcome = 'invalid' AND reason IS NULL"
                           ).fetchone()[0] == 0
        bad_rows = con.execute("SELECT count(*) FROM directory_users WHERE typeof(active) <> 'BOOLEAN'").fetchone()[0]
    assert live == expected and bad_rows == 0


# --- ordering: by the full-precision occurred_at, a delete winning a tie, then the inbox's arrival order ---------

T = "2024-09-25T02:26:39.036398"  # Scalekit's occurred_at has nanoseconds: T + "577Z"


def at(nanos: str) -> str:
    return f"{T}{nanos}Z"


def apply(wh: Warehouse, *events: tuple[int, dict]) -> dict:
    """One incremental run's batch: (inbox seq, envelope) pairs."""
    with wh.write() as con:
        return apply_events(con, [event_from_body(f"msg_{seq}", json.dumps(e), seq, datetime(2026, 1, 1))
                                  for seq, e in events], datetime(2026, 1, 1))


def user_at(type_: str, occurred_at: str, given_name: str = "G", n: int = 1) -> dict:
    event = user_event(n, type_, given_name)
    event["id"] = f"evt_{n}_{type_[-7:]}_{occurred_at}_{given_name}"
    event["occurred_at"] = occurred_at
    if type_ == "organization.directory.user_deleted":
        event["data"] = {"id": event["data"]["id"], "organization_id": ORG, "email": event["data"]["email"]}
    return event


def user_row(wh: Warehouse, n: int = 1) -> tuple:
    with wh.read() as con:
        return con.execute("SELECT given_name, deleted_at IS NOT NULL FROM directory_users WHERE user_id = $u",
                           {"u": f"diruser_{n}"}).fetchone()


CREATED = "organization.directory.user_created"
DELETED = "organization.directory.user_deleted"


def test_a_delete_wins_an_occurred_at_tie_in_one_batch_and_across_batches(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed(wh)
    apply(wh, (1, user_at(CREATED, at("000"), "Born", n=1)), (2, user_at(CREATED, at("000"), "Born", n=2)),
          (3, user_at(CREATED, at("000"), "Born", n=3)))
    # One batch: the update arrived after the delete, at the same instant.
    apply(wh, (10, user_at(DELETED, at("577"), n=1)), (11, user_at(USER_UPDATED, at("577"), "Back", n=1)))
    assert user_row(wh, 1) == ("Born", True)
    # Across batches, either way round.
    apply(wh, (20, user_at(USER_UPDATED, at("577"), "Updated", n=2)))
    apply(wh, (21, user_at(DELETED, at("577"), n=2)))
    assert user_row(wh, 2) == ("Updated", True)
    apply(wh, (30, user_at(DELETED, at("577"), n=3)))
    apply(wh, (31, user_at(USER_UPDATED, at("577"), "Back", n=3)))
    assert user_row(wh, 3) == ("Born", True)


def test_events_nanoseconds_apart_keep_their_order(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed(wh)
    apply(wh, *[(n, user_at(CREATED, at("000"), "Born", n=n)) for n in (1, 2, 3)])
    apply(wh, (10, user_at(USER_UPDATED, at("577"), "Older", n=1)))
    apply(wh, (11, user_at(USER_UPDATED, at("578"), "Newer", n=1)))
    assert user_row(wh, 1) == ("Newer", False)
    # Arrived the other way round: in one batch, and across batches.
    apply(wh, (20, user_at(USER_UPDATED, at("578"), "Newer", n=2)),
          (21, user_at(USER_UPDATED, at("577"), "Older", n=2)))
    assert user_row(wh, 2) == ("Newer", False)
    apply(wh, (30, user_at(USER_UPDATED, at("578"), "Newer", n=3)))
    counts = apply(wh, (31, user_at(USER_UPDATED, at("577"), "Older", n=3)))
    assert user_row(wh, 3) == ("Newer", False) and counts["stale"] == 1
    # A delete a nanosecond older than an update does not win.
    apply(wh, (40, user_at(USER_UPDATED, at("579"), "Kept", n=1)), (41, user_at(DELETED, at("578"), n=1)))
    assert user_row(wh, 1) == ("Kept", False)


def test_two_updates_at_the_same_instant_keep_the_inbox_arrival_order(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed(wh)
    apply(wh, (1, user_at(CREATED, at("000"), "Born")))
    apply(wh, (10, user_at(USER_UPDATED, at("577"), "First")), (11, user_at(USER_UPDATED, at("577"), "Second")))
    assert user_row(wh) == ("Second", False)
    apply(wh, (12, user_at(USER_UPDATED, at("577"), "Third")))
    assert user_row(wh) == ("Third", False)


def directory_at(type_: str, occurred_at: str) -> dict:
    event = directory_event()
    event.update(type=type_, occurred_at=occurred_at, id=f"evt_{type_[-8:]}_{occurred_at}")
    return event


def enabled(wh: Warehouse) -> bool:
    with wh.read() as con:
        return con.execute("SELECT enabled FROM directories WHERE directory_id = 'dir_1'").fetchone()[0]


def test_a_stale_directory_event_or_listing_never_flips_the_directory_back(tmp_path):
    from scim_pipeline.warehouse.directory import upsert_directories

    wh = Warehouse(tmp_path / "w.duckdb")
    seed(wh)
    ENABLED = "organization.directory_enabled"
    listing = {"directory_id": "dir_1", "organization_id": ORG, "name": "D", "provider": "OKTA",
               "directory_type": "SCIM", "role_assignments": [], "total_users": 1, "total_groups": 1}

    def list_catalogue(is_enabled: bool, listed_at: datetime) -> None:
        with wh.write() as con:
            upsert_directories(con, [{**listing, "enabled": is_enabled}], datetime(2026, 1, 1), listed_at)

    list_catalogue(True, datetime(2024, 9, 25, 2, 0))
    apply(wh, (1, directory_at(DIRECTORY_DISABLED, "2024-09-25T02:26:39.000000002Z")))
    counts = apply(wh, (2, directory_at(ENABLED, "2024-09-25T02:26:39.000000001Z")))  # older, arrived later
    assert not enabled(wh) and counts["stale"] == 1
    apply(wh, (3, directory_at(ENABLED, "2024-09-25T02:26:40Z")),
          (4, directory_at(DIRECTORY_DISABLED, "2024-09-25T02:26:39.5Z")))
    assert enabled(wh)
    # A listing that began before the last event cannot know it; one that began after it can.
    list_catalogue(False, datetime(2024, 9, 25, 2, 26, 39, 900000))
    assert enabled(wh)
    list_catalogue(False, datetime(2024, 9, 25, 2, 27))
    assert not enabled(wh)
    counts = apply(wh, (5, directory_at(ENABLED, "2024-09-25T02:26:59Z")))  # older than that listing
    assert not enabled(wh) and counts["stale"] == 1
    apply(wh, (6, directory_at(ENABLED, "2024-09-25T02:27:01Z")))
    assert enabled(wh)


# --- Scalekit's documented payloads: no directory_id or emails on a user, groups not promised, deletions of
# users never seen -------------------------------------------------------------------------------------------------

FIXTURES = Path(__file__).parents[1] / "fixtures" / "scalekit_webhooks"


def documented(name: str, user: str, *, occurred_at: str = "2025-01-06T18:44:25.153954001Z", **data) -> dict:
    """Scalekit's documented example of ``name`` for ``user`` of ORG, with ``data`` changed (None removes a key)."""
    event = json.loads((FIXTURES / f"{name}.json").read_text())
    event.update(id=f"evt_{name}_{user}_{occurred_at}", organization_id=ORG, occurred_at=occurred_at)
    event["data"].update(id=user, organization_id=ORG)
    for key, value in data.items():
        if value is None:
            event["data"].pop(key, None)
        else:
            event["data"][key] = value
    return event


def seed_two_directories(wh: Warehouse) -> None:
    """ORG with dir_1 and dir_2, a group in each, and diruser_1 known (from a snapshot) in dir_2 with two
    addresses and a membership."""
    with wh.write() as con:
        con.execute("INSERT INTO directories (directory_id, organization_id, enabled) VALUES ('dir_1', $o, true),"
                    " ('dir_2', $o, true)", {"o": ORG})
        con.execute("INSERT INTO directory_groups (group_id, organization_id, directory_id, display_name) VALUES"
                    " ('dirgroup_1', $o, 'dir_1', 'One'), ('dirgroup_2', $o, 'dir_2', 'Two')", {"o": ORG})
        con.execute("INSERT INTO directory_users (user_id, organization_id, directory_id, email, emails, active,"
                    " updated_at) VALUES ('diruser_1', $o, 'dir_2', 'a@x.io', '[\"a@x.io\", \"b@x.io\"]', true,"
                    " '2025-01-01')", {"o": ORG})
        con.execute("INSERT INTO directory_user_groups VALUES ($o, 'diruser_1', 'dirgroup_2')", {"o": ORG})


def users(wh: Warehouse) -> dict:
    with wh.read() as con:
        return {u: (d, json.loads(e) if e else None, deleted) for u, d, e, deleted in con.execute(
            "SELECT user_id, directory_id, emails, deleted_at IS NOT NULL FROM directory_users").fetchall()}


def memberships(wh: Warehouse, user: str) -> list[str]:
    with wh.read() as con:
        return [g for (g,) in con.execute("SELECT group_id FROM directory_user_groups WHERE user_id = $u ORDER BY 1",
                                          {"u": user}).fetchall()]


def test_the_documented_payloads_apply_as_they_are(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed_two_directories(wh)
    counts = apply(wh, (1, documented("user_created", "diruser_5", groups=[{"id": "dirgroup_1", "name": "One"}])),
                   (2, documented("group_updated", "dirgroup_2", directory_id="dir_2")))
    assert counts["applied"] == 2 and counts["invalid"] == 0
    assert users(wh)["diruser_5"] == ("dir_1", ["flavio@runolfsdottir.co.duk"], False)


def test_a_user_without_directory_id_is_placed_from_what_the_warehouse_knows(tmp_path):
    from scim_pipeline.warehouse.events import unplaced_organizations

    wh = Warehouse(tmp_path / "w.duckdb")
    seed_two_directories(wh)
    no_groups = {"groups": []}
    apply(wh,
          (1, documented("user_updated", "diruser_1", groups=[{"id": "dirgroup_1", "name": "One"}])),  # known user
          (2, documented("user_created", "diruser_2", groups=[{"id": "dirgroup_2", "name": "Two"}])),  # its groups
          (3, documented("user_created", "diruser_3", **no_groups)))  # two enabled directories: cannot tell
    placed = users(wh)
    assert placed["diruser_1"][0] == "dir_2" and placed["diruser_2"][0] == "dir_2"
    assert placed["diruser_3"][0] is None
    with wh.read() as con:
        assert unplaced_organizations(con, [ORG, "org_2"]) == [ORG]  # the incremental run then syncs ORG in full
    with wh.write() as con:
        con.execute("UPDATE directories SET enabled = false WHERE directory_id = 'dir_1'")
    # With one enabled directory left (a disabled one sends no events), a new user can only be from it; a later
    # event of a user the warehouse could not place places it.
    apply(wh, (4, documented("user_created", "diruser_4", **no_groups)),
          (5, documented("user_updated", "diruser_3", occurred_at="2025-01-06T18:44:26Z", **no_groups)))
    placed = users(wh)
    assert placed["diruser_4"][0] == "dir_2" and placed["diruser_3"][0] == "dir_2"
    with wh.read() as con:
        assert unplaced_organizations(con, [ORG]) == []


def test_a_user_event_without_emails_keeps_the_other_addresses(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed_two_directories(wh)
    apply(wh, (1, documented("user_updated", "diruser_1", email="a@x.io")))
    assert users(wh)["diruser_1"][1] == ["a@x.io", "b@x.io"]  # not flipped to the primary alone
    apply(wh, (2, documented("user_updated", "diruser_1", email="c@x.io", occurred_at="2025-01-07T00:00:00Z")))
    assert users(wh)["diruser_1"][1] == ["c@x.io", "b@x.io"]  # a new primary replaces the old one
    apply(wh, (3, documented("user_updated", "diruser_1", emails=["d@x.io"], occurred_at="2025-01-08T00:00:00Z")))
    assert users(wh)["diruser_1"][1] == ["d@x.io"]  # a list, where one is sent, is the list


def test_a_user_event_without_groups_keeps_the_memberships(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed_two_directories(wh)
    apply(wh, (1, documented("user_updated", "diruser_1", groups=None)))
    assert memberships(wh, "diruser_1") == ["dirgroup_2"]
    apply(wh, (2, documented("user_updated", "diruser_1", groups=[], occurred_at="2025-01-07T00:00:00Z")))
    assert memberships(wh, "diruser_1") == []  # an empty list is a user in no group


def test_a_deletion_of_a_user_never_seen_leaves_a_tombstone_that_a_late_create_cannot_undo(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    seed_two_directories(wh)
    apply(wh, (1, documented("user_deleted", "diruser_7", occurred_at="2025-01-06T18:44:25.153954002Z")))
    assert users(wh)["diruser_7"][2] is True
    # Scalekit retries a webhook for about a day: the create, older than the deletion, arrives after it.
    counts = apply(wh, (2, documented("user_created", "diruser_7", occurred_at="2025-01-06T18:44:25.153954001Z")))
    assert counts["stale"] == 1 and users(wh)["diruser_7"][2] is True
    with wh.read() as con:
        assert con.execute("SELECT count(*) FROM directory_users WHERE deleted_at IS NULL AND user_id = 'diruser_7'"
                           ).fetchone()[0] == 0
