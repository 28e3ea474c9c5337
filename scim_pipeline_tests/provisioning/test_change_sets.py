from scim_pipeline.provisioning.change_sets import approve, compute_change_sets
from scim_pipeline.provisioning.derive import derive_memberships, derive_roles
from scim_pipeline.provisioning.ledger import (
    ready_changes,
    record_failure,
    record_results,
    rederive_in_doubt,
    revive_dead,
)
from scim_pipeline.provisioning.role_mapping import GuardSettings, parse_role_mapping

from .conftest import T0, add_group, add_member, add_user, at

MAPPING = parse_role_mapping("default_role: member\nrules:\n  - group: 'Eng*'\n    role: developer\n")


def derive(con, org="org_a", mapping=MAPPING):
    derive_memberships(con, org)
    derive_roles(con, org, mapping)


def deliver_all(con, org="org_a", now=None):
    """Play a perfect application: apply every ready change."""
    now = now or at(1)
    changes = ready_changes(con, org, now, max_attempts=5)
    record_results(con, [{"change_id": c["change_id"], "status": "applied"} for c in changes], now)
    return changes


def ledger(con, status=None):
    return sorted(con.execute(
        "SELECT entity, op, entity_key, status FROM change_sets WHERE status = coalesce(?, status)", [status]
    ).fetchall())


def delivered(con):
    return {
        "users": con.execute("SELECT user_id, email, active FROM delivered_users ORDER BY ALL").fetchall(),
        "memberships": con.execute("SELECT group_id, user_id FROM delivered_memberships ORDER BY ALL").fetchall(),
        "roles": con.execute("SELECT user_id, role_name FROM delivered_roles ORDER BY ALL").fetchall(),
    }


def sync(con, now, guard=None):
    derive(con)
    return compute_change_sets(con, "org_a", now, guard)


def baseline(con):
    add_user(con, "u1")
    add_user(con, "u2")
    add_group(con, "g_eng", "Engineering")
    add_group(con, "g_ops", "Ops")
    add_member(con, "g_eng", "u1")
    counts = sync(con, T0)
    assert counts["user.create"] == 2 and counts["membership.add"] == 1 and counts["role.grant"] == 2
    deliver_all(con)
    assert sync(con, at(2))["total"] == 0


def test_create_then_nothing_and_delivery_order(con):
    add_user(con, "u1")
    add_group(con, "g_eng", "Engineering")
    add_member(con, "g_eng", "u1")
    sync(con, T0)
    changes = ready_changes(con, "org_a", at(1), max_attempts=5)
    assert [(c["entity"], c["op"]) for c in changes] == [("user", "create"), ("membership", "add"), ("role", "grant")]
    assert changes[0]["data"] == {"user_id": "u1", "email": "u1@example.com", "given_name": "G", "family_name": "F",
                                  "preferred_username": "u1", "active": True}
    assert changes[1]["key"] == "g_eng/u1"
    assert changes[1]["data"] == {"group_id": "g_eng", "user_id": "u1", "group_name": "Engineering"}
    assert changes[2]["key"] == "u1/developer" and changes[2]["data"] == {"user_id": "u1", "role_name": "developer"}
    record_results(con, [{"change_id": c["change_id"], "status": "applied"} for c in changes], at(1))
    assert delivered(con) == {"users": [("u1", "u1@example.com", True)], "memberships": [("g_eng", "u1")],
                              "roles": [("u1", "developer")]}
    assert sync(con, at(2))["total"] == 0


def test_every_op(con):
    baseline(con)
    add_user(con, "u1", email="new@example.com")  # update
    add_user(con, "u2", username="u2")  # unchanged mapped fields
    con.execute("UPDATE directory_users SET detail = '{\"title\": \"x\"}' WHERE user_id = 'u2'")  # unmapped: no update
    add_user(con, "u3")  # create
    add_member(con, "g_ops", "u2")  # add
    con.execute("DELETE FROM directory_user_groups WHERE user_id = 'u1'")  # remove + revoke developer, grant member
    counts = sync(con, at(3))
    assert {k: v for k, v in counts.items() if "." in k} == {
        "user.update": 1, "user.create": 1, "membership.add": 1, "membership.remove": 1,
        "role.grant": 2, "role.revoke": 1,
    }
    deliver_all(con, now=at(4))
    add_user(con, "u1", email="new@example.com", active=False)  # deactivate (also loses the default role)
    add_user(con, "u2", deleted=True)  # delete (and its membership and role go)
    counts = sync(con, at(5))
    assert {k: v for k, v in counts.items() if "." in k} == {
        "user.deactivate": 1, "user.delete": 1, "membership.remove": 1, "role.revoke": 2,
    }
    changes = deliver_all(con, now=at(6))
    assert [c["op"] for c in changes] == ["remove", "revoke", "revoke", "deactivate", "delete"]
    assert [c for c in changes if c["op"] == "delete"][0]["data"] == {"user_id": "u2"}
    add_user(con, "u1", email="new@example.com", active=True)  # reactivate
    counts = sync(con, at(7))
    assert {k: v for k, v in counts.items() if "." in k} == {"user.reactivate": 1, "role.grant": 1}
    deliver_all(con, now=at(8))
    assert delivered(con) == {
        "users": [("u1", "new@example.com", True), ("u3", "u3@example.com", True)],
        "memberships": [], "roles": [("u1", "member"), ("u3", "member")],
    }


def test_change_ids_are_stable_and_a_recurring_change_gets_a_new_id(con):
    baseline(con)
    add_user(con, "u1", active=False)
    first = sync(con, at(3))
    ids = con.execute("SELECT change_id FROM change_sets WHERE status = 'pending' ORDER BY 1").fetchall()
    again = sync(con, at(4))
    assert again["inserted"] == 0 and first["total"] == again["total"]
    assert con.execute("SELECT change_id FROM change_sets WHERE status = 'pending' ORDER BY 1").fetchall() == ids
    deliver_all(con, now=at(5))
    add_user(con, "u1", active=True)
    sync(con, at(6))
    deliver_all(con, now=at(7))
    add_user(con, "u1", active=False)  # the same deactivation again, after the application applied its opposite
    assert sync(con, at(8))["inserted"] == 1  # u1 keeps its group role: only the deactivation
    assert len(deliver_all(con, now=at(9))) == 1
    assert delivered(con)["users"][0] == ("u1", "u1@example.com", False)


def test_superseded_changes_are_never_sent_and_come_back(con):
    baseline(con)
    add_user(con, "u1", email="a@example.com")
    sync(con, at(3))
    add_user(con, "u1", email="b@example.com")  # newer payload: the first update is superseded
    counts = sync(con, at(4))
    assert counts["superseded"] == 1 and counts["inserted"] == 1
    sent = ready_changes(con, "org_a", at(5), max_attempts=5)
    assert [c["data"]["email"] for c in sent] == ["b@example.com"]
    add_user(con, "u1")  # the directory goes back: nothing to do, the pending update is superseded
    assert sync(con, at(6))["superseded"] == 1
    assert ready_changes(con, "org_a", at(7), max_attempts=5) == []
    add_user(con, "u1", email="a@example.com")  # and forth again: the same change is pending again, not duplicated
    counts = sync(con, at(8))
    assert counts["inserted"] == 0
    assert [c["data"]["email"] for c in ready_changes(con, "org_a", at(9), max_attempts=5)] == ["a@example.com"]


def org_of(con, n_users):
    for i in range(n_users):
        add_user(con, f"u{i:03}")
    sync(con, T0)
    deliver_all(con)


def test_guard_holds_a_mass_deactivation_until_approved(con):
    org_of(con, 100)
    con.execute("UPDATE directory_users SET active = false WHERE user_id < 'u040'")
    counts = sync(con, at(2), GuardSettings())
    assert counts["guard_tripped"] == ["org_a"]
    assert counts["user.deactivate"] == 40 and counts["held"] == 80  # 40 deactivations + 40 default-role revokes
    assert ready_changes(con, "org_a", at(3), max_attempts=5) == []
    assert sync(con, at(4), GuardSettings())["held"] == 80  # still held on the next run
    assert approve(con, "org_a", at(5)) == 80
    counts = sync(con, at(6), GuardSettings())  # the approved changes stay released
    assert counts["held"] == 0 and counts["inserted"] == 0
    sent = deliver_all(con, now=at(7))
    assert len(sent) == 80 and sum(1 for u in delivered(con)["users"] if not u[2]) == 40


def test_guard_lets_small_changes_through_and_reads_thresholds(con):
    org_of(con, 100)
    con.execute("UPDATE directory_users SET active = false WHERE user_id < 'u005'")
    assert sync(con, at(2), GuardSettings())["held"] == 0
    assert len(ready_changes(con, "org_a", at(3), max_attempts=5)) == 10
    con.execute("UPDATE directory_users SET deleted_at = ? WHERE user_id BETWEEN 'u005' AND 'u030'", [T0])
    assert sync(con, at(4), GuardSettings(0.5, 10))["held"] == 0  # 31 of 100: over 20% but within 50%
    mapping = parse_role_mapping("organizations:\n  org_a: {deprovision_threshold: 0.25}\n")
    assert sync(con, at(5), mapping)["guard_tripped"] == ["org_a"]
    con.execute("INSERT INTO organization_settings (organization_id, deprovision_threshold) VALUES ('org_a', 0.5)")
    assert sync(con, at(6), mapping)["held"] == 0  # the run-time setting wins and releases them


def test_record_results_applies_only_acknowledged_changes(con):
    add_user(con, "u1")
    add_user(con, "u2")
    sync(con, T0)
    c1, c2 = ready_changes(con, "org_a", at(1), max_attempts=5)[:2]
    out = record_results(con, [{"change_id": c1["change_id"], "status": "applied"},
                               {"change_id": c2["change_id"], "status": "rejected", "error": "email taken"}], at(1))
    assert out == {"applied": 1, "rejected": 1}
    assert [u[0] for u in delivered(con)["users"]] == [c1["key"]]
    row = con.execute("SELECT status, attempts, last_error, next_attempt_at > ? FROM change_sets WHERE change_id = ?",
                      [at(1), c2["change_id"]]).fetchall()[0]
    assert row == ("failed", 1, "rejected: email taken", True)
    # recording the same answers again changes nothing
    assert record_results(con, [{"change_id": c1["change_id"], "status": "applied"}], at(2)) == {"applied": 0, "rejected": 0}
    assert con.execute("SELECT attempts FROM change_sets WHERE change_id = ?", [c1["change_id"]]).fetchall()[0] == (1,)


def test_failure_backoff_and_dead_after_max_attempts(con):
    add_user(con, "u1")
    sync(con, T0, GuardSettings())
    (change,) = [c for c in ready_changes(con, "org_a", T0, max_attempts=3) if c["entity"] == "user"]
    cid = change["change_id"]
    waits = []
    for attempt in range(1, 4):
        now = at(attempt * 100)
        assert cid in [c["change_id"] for c in ready_changes(con, "org_a", now, max_attempts=3)]
        result = record_failure(con, [cid], "503 Service Unavailable", now, max_attempts=3, backoff_s=10)
        status, attempts, next_at, error = con.execute(
            "SELECT status, attempts, next_attempt_at, last_error FROM change_sets WHERE change_id = ?", [cid]
        ).fetchall()[0]
        assert attempts == attempt and error == "503 Service Unavailable"
        waits.append((next_at - now).total_seconds())
        if attempt < 3:
            assert status == "failed" and result == {"failed": 1, "dead": 0}
            assert cid not in [c["change_id"] for c in ready_changes(con, "org_a", now, max_attempts=3)]
        else:
            assert status == "dead" and result == {"failed": 0, "dead": 1}
    assert 5 <= waits[0] <= 10 and 10 <= waits[1] <= 20  # exponential, with jitter in [50%, 100%]
    assert ready_changes(con, "org_a", at(10_000), max_attempts=3) == [] or all(
        c["change_id"] != cid for c in ready_changes(con, "org_a", at(10_000), max_attempts=3))
    assert sync(con, at(10_001), GuardSettings())["inserted"] == 0  # a dead change is not re-created


def test_a_change_in_doubt_is_retried_unless_replaced(con):
    baseline(con)
    add_member(con, "g_ops", "u2")
    sync(con, at(3))
    (add,) = [c for c in ready_changes(con, "org_a", at(3), max_attempts=5) if c["op"] == "add"]
    record_failure(con, [add["change_id"]], "timeout", at(3), max_attempts=5, backoff_s=1)
    con.execute("DELETE FROM directory_user_groups WHERE user_id = 'u2'")  # the directory goes back
    sync(con, at(4))
    # the application may have applied the add: it is retried, not dropped, so the next diff can undo it
    assert con.execute("SELECT status FROM change_sets WHERE change_id = ?", [add["change_id"]]).fetchall()[0] == ("failed",)
    deliver_all(con, now=at(10))
    assert sync(con, at(11))["membership.remove"] == 1


def test_all_organizations_in_one_pass_equals_one_call_each(tmp_path):
    from scim_pipeline.warehouse.connection import Warehouse

    def run(name, per_org):
        with Warehouse(tmp_path / name).write() as con:
            for org in ("org_a", "org_b"):
                add_group(con, f"g_{org}", "Engineering", org=org)
                for i in range(3):
                    add_user(con, f"u_{org}_{i}", org=org, active=i != 2)
                    add_member(con, f"g_{org}", f"u_{org}_{i}", org=org)
                derive(con, org)
            if per_org == "each":
                for org in ("org_a", "org_b"):
                    compute_change_sets(con, org, T0)
            else:
                orgs = None if per_org == "all" else ["org_a", "org_b"]
                assert compute_change_sets(con, orgs, T0)["user.create"] == 6
            return con.execute("SELECT change_id, organization_id, op, entity_key, payload::VARCHAR, status "
                                "FROM change_sets ORDER BY ALL").fetchall()

    each = run("each.duckdb", per_org="each")
    assert run("all.duckdb", per_org="all") == each
    assert run("listed.duckdb", per_org="listed") == each


def hold_reasons(con):
    return dict(con.execute("SELECT hold_reason, count(*) FROM change_sets WHERE status = 'held' GROUP BY 1").fetchall())


def test_guard_counts_deprovisions_across_runs_within_the_window(con):
    org_of(con, 100)  # threshold 20% of 100 active users, and more than 10
    deleted = []
    for run in range(6):  # six runs of 10 deletions each, each delivered before the next
        batch = [f"u{i:03}" for i in range(run * 10, run * 10 + 10)]
        deleted += batch
        con.execute("UPDATE directory_users SET deleted_at = ? WHERE list_contains(?, user_id)", [T0, batch])
        sync(con, at(60 * (run + 1)), GuardSettings())
        deliver_all(con, now=at(60 * (run + 1) + 1))
    gone = {u for u, _, _ in delivered(con)["users"]} ^ {f"u{i:03}" for i in range(100)}
    assert len(gone) == 20  # two runs fit in 20% of 100; the third trips the guard for the rest
    assert con.execute("SELECT count(*) FROM change_sets WHERE status = 'held' AND op = 'delete'").fetchall()[0][0] == 40
    assert hold_reasons(con) == {"mass deprovisioning guard": 80}  # the deletes and the default-role revocations
    # The deletions that tripped it keep counting while their successors wait: nothing is released by time passing.
    assert sync(con, at(60 * 24 * 3), GuardSettings())["held"] == 80
    assert approve(con, "org_a", at(60 * 24 * 3 + 1)) == 80
    assert len(deliver_all(con, now=at(60 * 24 * 3 + 2))) == 80
    # Approved deprovisions no longer count: the next small one goes through.
    con.execute("UPDATE directory_users SET deleted_at = ? WHERE user_id IN ('u070', 'u071')", [T0])
    assert sync(con, at(60 * 24 * 3 + 3), GuardSettings())["held"] == 0


def test_guard_window_forgets_deprovisions_older_than_its_hours(con):
    org_of(con, 100)
    con.execute("UPDATE directory_users SET active = false WHERE user_id < 'u015'")
    assert sync(con, at(1), GuardSettings())["held"] == 0
    deliver_all(con, now=at(2))
    con.execute("UPDATE directory_users SET active = false WHERE user_id BETWEEN 'u015' AND 'u024'")
    mapping = parse_role_mapping("deprovision_guard: {window_hours: 2}\n")
    assert sync(con, at(3 * 60), mapping)["held"] == 0  # the first 15 left the 2-hour window
    con.execute("UPDATE directory_users SET active = false WHERE user_id BETWEEN 'u025' AND 'u034'")
    assert sync(con, at(3 * 60 + 1), mapping)["guard_tripped"] == ["org_a"]  # 20 pending + 10 new within 2 hours


def test_guard_holds_a_group_rename_that_strips_a_role_from_every_member(con):
    add_group(con, "g_eng", "Engineering")
    for i in range(30):
        add_user(con, f"u{i:02}")
        add_member(con, "g_eng", f"u{i:02}")
    sync(con, T0)
    deliver_all(con)
    con.execute("UPDATE directory_groups SET display_name = 'Platform' WHERE group_id = 'g_eng'")
    counts = sync(con, at(2), GuardSettings())
    assert counts["role.revoke"] == 30 and counts["role.grant"] == 30  # developer goes, the default role comes
    assert counts["guard_tripped"] == ["org_a"]
    assert ledger(con, "held") == [("role", "revoke", f"u{i:02}/developer", "held") for i in range(30)]
    assert {c["op"] for c in ready_changes(con, "org_a", at(3), max_attempts=5)} == {"grant"}
    assert approve(con, "org_a", at(4)) == 30
    assert len(deliver_all(con, now=at(5))) == 60


def test_guard_counts_membership_removals_across_runs(con):
    add_group(con, "g_ops", "Ops")
    for i in range(100):
        add_user(con, f"u{i:03}")
        add_member(con, "g_ops", f"u{i:03}")
    sync(con, T0)
    deliver_all(con)
    for run in range(3):  # 8 users leave the group per run: 16 within 20% of 100, 24 over it
        con.execute("DELETE FROM directory_user_groups WHERE user_id BETWEEN ? AND ?",
                    [f"u{run * 8:03}", f"u{run * 8 + 7:03}"])
        counts = sync(con, at(10 * (run + 1)), GuardSettings())
        deliver_all(con, now=at(10 * (run + 1) + 1))
    assert counts["guard_tripped"] == ["org_a"] and counts["held"] == 8
    assert len(delivered(con)["memberships"]) == 100 - 16


def test_changes_of_a_disabled_directory_are_held_until_it_is_enabled(con):
    con.execute("INSERT INTO directories (directory_id, organization_id, enabled) VALUES ('dir_1', 'org_a', true)")
    baseline(con)
    con.execute("UPDATE directories SET enabled = false")
    add_user(con, "u1", active=False)
    assert sync(con, at(3))["held"] == 1
    assert hold_reasons(con) == {"directory disabled": 1}
    assert ready_changes(con, "org_a", at(4), max_attempts=5) == []
    assert approve(con, "org_a", at(5)) == 0  # approval is the guard's; the directory's hold is not released by it
    assert hold_reasons(con) == {"directory disabled": 1}
    con.execute("UPDATE directories SET enabled = true")
    assert sync(con, at(6))["held"] == 0
    assert [c["op"] for c in ready_changes(con, "org_a", at(7), max_attempts=5)] == ["deactivate"]


def kill(con, change_id, when, max_attempts=3, error="503 Service Unavailable"):
    """Fail a change until it is dead (transport failures: in doubt)."""
    for _ in range(max_attempts):
        record_failure(con, [change_id], error, when, max_attempts=max_attempts, backoff_s=1)
    return con.execute("SELECT status, attempts, dead_at FROM change_sets WHERE change_id = ?", [change_id]).fetchall()[0]


def user_change(con, user_id, now, max_attempts=3):
    (change,) = [c for c in ready_changes(con, "org_a", now, max_attempts=max_attempts) if c["key"] == user_id]
    return change


def test_a_full_sync_revives_dead_changes_still_wanted_with_fresh_attempts(con):
    baseline(con)
    add_user(con, "u1", active=False)
    sync(con, at(3))
    cid = user_change(con, "u1", at(3))["change_id"]
    assert kill(con, cid, at(4)) == ("dead", 3, at(4))
    assert sync(con, at(5))["revived"] == 0  # an incremental run leaves it dead
    derive(con)
    counts = compute_change_sets(con, "org_a", at(6), full=True)
    assert counts["revived"] == 1 and counts["inserted"] == 0  # the same change, the same id
    change = user_change(con, "u1", at(6))
    assert change["change_id"] == cid and change["attempts"] == 3  # attempts keep counting: a new request each time
    assert kill(con, cid, at(7))[:2] == ("dead", 6)  # a fresh round of 3
    record_results(con, [{"change_id": cid, "status": "applied"}], at(8))
    assert delivered(con)["users"][0] == ("u1", "u1@example.com", False)


def test_dead_changes_no_longer_wanted_are_superseded_not_revived(con):
    baseline(con)
    add_member(con, "g_ops", "u2")
    sync(con, at(3))
    (add,) = [c for c in ready_changes(con, "org_a", at(3), max_attempts=3) if c["op"] == "add"]
    for _ in range(3):  # rejected every time: known not applied
        record_results(con, [{"change_id": add["change_id"], "status": "rejected", "error": "no"}], at(3), max_attempts=3)
    assert con.execute("SELECT status FROM change_sets WHERE change_id = ?", [add["change_id"]]).fetchall()[0] == ("dead",)
    con.execute("DELETE FROM directory_user_groups WHERE user_id = 'u2'")
    derive(con)
    counts = compute_change_sets(con, "org_a", at(4), full=True)
    assert counts["revived"] == 0 and counts["superseded"] == 1


def test_revive_dead_after_a_cool_down_once_the_organization_was_delivered_to_again(con):
    baseline(con)
    add_user(con, "u1", active=False)
    sync(con, at(3))
    cid = user_change(con, "u1", at(3))["change_id"]
    kill(con, cid, at(10))
    assert revive_dead(con, "org_a", at(30), died_before=at(15), delivered_since=True) == {}  # nothing delivered since
    add_user(con, "u3")
    sync(con, at(20))
    deliver_all(con, now=at(21))  # the application answers again
    assert revive_dead(con, "org_a", at(22), died_before=at(22 - 15), delivered_since=True) == {}  # cooling down
    assert revive_dead(con, "org_a", at(26), died_before=at(26 - 15), delivered_since=True) == {"org_a": 1}
    assert user_change(con, "u1", at(26))["change_id"] == cid


def test_an_in_doubt_change_the_directory_undid_is_replaced_by_the_current_record(con):
    baseline(con)
    add_user(con, "u2", active=False)
    sync(con, at(3))
    stale = user_change(con, "u2", at(3), max_attempts=5)
    record_failure(con, [stale["change_id"]], "timed out", at(3), max_attempts=5, backoff_s=1)
    add_user(con, "u2", active=True)  # the directory changed its mind
    sync(con, at(4))  # the diff against what was acknowledged is empty for u2: the in-doubt change stays
    assert rederive_in_doubt(con, "org_a", at(5)) == {"kept": 0, "replaced": 1,
                                                      "replaced_by_organization": {"org_a": 1}}
    sent = deliver_all(con, now=at(6))
    assert stale["change_id"] not in [c["change_id"] for c in sent]
    (reassert,) = [c for c in sent if c["key"] == "u2"]
    assert reassert["op"] == "reactivate" and reassert["data"]["active"] is True
    assert con.execute("SELECT status FROM change_sets WHERE change_id = ?", [stale["change_id"]]).fetchall()[0] == (
        "superseded",)
    assert con.execute("SELECT replaces FROM change_sets WHERE change_id = ?", [reassert["change_id"]]).fetchall()[0] == (
        stale["change_id"],)
    assert sync(con, at(7))["total"] == 0


def test_an_in_doubt_change_still_wanted_is_sent_as_is(con):
    baseline(con)
    add_user(con, "u2", active=False)
    add_member(con, "g_ops", "u1")
    sync(con, at(3))
    ready = ready_changes(con, "org_a", at(3), max_attempts=5)
    record_failure(con, [c["change_id"] for c in ready], "timed out", at(3), max_attempts=5, backoff_s=1)
    assert rederive_in_doubt(con, "org_a", at(4)) == {"kept": len(ready), "replaced": 0,
                                                      "replaced_by_organization": {}}
    assert sorted(c["change_id"] for c in deliver_all(con, now=at(10))) == sorted(c["change_id"] for c in ready)


def test_an_in_doubt_delete_undone_recreates_the_user_with_memberships_and_roles(con):
    baseline(con)
    add_user(con, "u1", deleted=True)
    sync(con, at(3))
    doubtful = [c["change_id"] for c in ready_changes(con, "org_a", at(3), max_attempts=5)]
    record_failure(con, doubtful, "timed out", at(3), max_attempts=5, backoff_s=1)  # remove, revoke, delete
    add_user(con, "u1")  # back
    sync(con, at(4))
    assert rederive_in_doubt(con, "org_a", at(5)) == {"kept": 0, "replaced": 3,
                                                      "replaced_by_organization": {"org_a": 3}}
    sent = deliver_all(con, now=at(6))
    assert sorted((c["entity"], c["op"]) for c in sent) == [("membership", "add"), ("role", "grant"), ("user", "create")]
    # The application may have deleted u1's memberships and roles with it: the next diff sends them again.
    assert sync(con, at(7))["total"] == 0 or delivered(con)["memberships"] == [("g_eng", "u1")]
    deliver_all(con, now=at(8))
    assert delivered(con) == {"users": [("u1", "u1@example.com", True), ("u2", "u2@example.com", True)],
                              "memberships": [("g_eng", "u1")], "roles": [("u1", "developer"), ("u2", "member")]}


def test_changes_never_sent_wait_without_spending_an_attempt_and_a_named_retry_time_is_kept(con):
    add_user(con, "u1")
    add_user(con, "u2")
    sync(con, T0)
    c1, c2 = [c["change_id"] for c in ready_changes(con, "org_a", T0, max_attempts=5) if c["entity"] == "user"]
    record_failure(con, [c1], "HTTP 429: slow down", T0, in_doubt=False, retry_at=at(60))
    record_failure(con, [c2], "not sent: an earlier batch was not delivered", T0, retry_at=at(60), attempted=False)
    rows = con.execute("SELECT change_id, status, attempts, next_attempt_at, in_doubt FROM change_sets "
                       "WHERE change_id IN (?, ?) ORDER BY change_id = ?", [c1, c2, c2]).fetchall()
    assert rows == [(c1, "failed", 1, at(60), False), (c2, "failed", 0, at(60), False)]
    users = lambda now: [c for c in ready_changes(con, "org_a", now, max_attempts=5) if c["entity"] == "user"]  # noqa: E731
    assert users(at(59)) == [] and len(users(at(60))) == 2


def test_guard_does_not_count_deleting_users_deactivated_long_ago(con):
    org_of(con, 100)
    con.execute("UPDATE directory_users SET active = false WHERE user_id < 'u015'")
    sync(con, at(1), GuardSettings())
    deliver_all(con, now=at(2))
    # A month later the directory deletes those leavers and 10 active users: 10 deprovisions, not 25.
    con.execute("UPDATE directory_users SET deleted_at = ? WHERE user_id < 'u025'", [T0])
    counts = sync(con, at(60 * 24 * 30), GuardSettings())
    assert counts["user.delete"] == 25 and counts["guard_tripped"] == []
