from scim_pipeline.provisioning.derive import derive_memberships, derive_roles, update_user_history
from scim_pipeline.provisioning.role_mapping import parse_role_mapping

from .conftest import add_group, add_member, add_user, at

MAPPING = parse_role_mapping("default_role: member\nrules:\n  - group: 'Eng*'\n    role: developer\n")


def step(con, now):
    derive_memberships(con, "org_a")
    derive_roles(con, "org_a", MAPPING)
    return update_user_history(con, "org_a", now)


def history(con, user_id):
    return con.execute(
        "SELECT valid_from, valid_to, family_name, active, deleted, roles FROM directory_users_history"
        " WHERE user_id = ? ORDER BY valid_from", [user_id]
    ).fetchall()


def test_intervals_after_a_rename_a_role_change_and_a_deactivation(con):
    add_user(con, "u1", family="Smith")
    add_user(con, "u2")
    assert step(con, at(0)) == {"closed": 0, "opened": 2}
    assert step(con, at(1)) == {"closed": 0, "opened": 0}  # nothing changed: nothing written

    add_user(con, "u1", family="Jones")  # rename
    assert step(con, at(2)) == {"closed": 1, "opened": 1}
    add_group(con, "g", "Engineering")
    add_member(con, "g", "u1")  # roles change
    step(con, at(3))
    add_user(con, "u1", family="Jones", active=False)  # deactivation
    step(con, at(4))
    add_user(con, "u1", family="Jones", active=False, deleted=True)
    step(con, at(5))

    assert history(con, "u1") == [
        (at(0), at(2), "Smith", True, False, ["member"]),
        (at(2), at(3), "Jones", True, False, ["member"]),
        (at(3), at(4), "Jones", True, False, ["developer"]),
        (at(4), at(5), "Jones", False, False, ["developer"]),
        (at(5), None, "Jones", False, True, []),
    ]
    assert history(con, "u2") == [(at(0), None, "F", True, False, ["member"])]
