from scim_pipeline.provisioning.role_mapping import GuardSettings, parse_role_mapping
from scim_pipeline.provisioning.change_sets import approve, compute_change_sets
from scim_pipeline.provisioning.derive import derive_memberships, derive_roles
from scim_pipeline.provisioning.ledger import ready_changes, record_failure, record_results

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
