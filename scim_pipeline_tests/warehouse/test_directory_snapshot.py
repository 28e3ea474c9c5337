"""Loading a directory snapshot is idempotent: the same listing loaded again changes no row."""

from datetime import datetime, timedelta

from scim_pipeline.scalekit.records import Page
from scim_pipeline.warehouse.connection import Warehouse
from scim_pipeline.warehouse.directory import Spool, load_snapshot


def user(i, groups):
    return {"user_id": f"diruser_{i}", "organization_id": "org_1", "directory_id": "dir_1", "email": f"u{i}@x.io",
            "given_name": "G", "family_name": "F", "preferred_username": f"u{i}", "active": True,
            "emails": [f"u{i}@x.io"], "groups": [{"id": g, "name": g} for g in groups], "updated_at": datetime(2026, 1, 1),
            "detail": {"active": True}}


def test_loading_the_same_snapshot_twice_changes_nothing(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    groups = [{"group_id": f"dirgroup_{g}", "organization_id": "org_1", "directory_id": "dir_1",
               "display_name": f"G{g}", "total_users": 1, "updated_at": datetime(2026, 1, 1), "detail": {}} for g in range(5)]
    users = [user(i, [f"dirgroup_{i % 5}", f"dirgroup_{(i + 1) % 5}"]) for i in range(300)]
    states = []
    for n in range(3):
        t = datetime(2026, 1, 2) + timedelta(hours=n)
        spool = Spool.create(tmp_path / "spool", "org_1", t)
        spool.add_groups(Page.of(groups))
        for k in range(0, 300, 30):
            spool.add_users(Page.of(users[k:k + 30]))
        with wh.write() as con:
            load_snapshot(con, spool, t)
        with wh.read() as con:
            states.append((
                con.execute("SELECT group_id, display_name, deleted_at FROM directory_groups ORDER BY 1").fetchall(),
                con.execute("SELECT * FROM directory_user_groups ORDER BY ALL").fetchall(),
                con.execute("SELECT user_id, email, deleted_at FROM directory_users ORDER BY 1").fetchall(),
            ))
    assert states[0] == states[1] == states[2]
    assert len(states[0][1]) == 600 and len(states[0][0]) == 5


def test_a_user_listed_twice_is_loaded_once_as_most_recently_updated(tmp_path):
    """A directory that changes while it is paged through can show an entry twice."""
    wh = Warehouse(tmp_path / "w.duckdb")
    group = {"group_id": "dirgroup_0", "organization_id": "org_1", "directory_id": "dir_1", "display_name": "G",
             "total_users": 1, "updated_at": datetime(2026, 1, 1), "detail": {}}
    older, newer = user(1, ["dirgroup_0"]), {**user(1, ["dirgroup_0"]), "email": "new@x.io",
                                             "updated_at": datetime(2026, 1, 2)}
    spool = Spool.create(tmp_path / "spool", "org_1", datetime(2026, 1, 3))
    spool.add_groups(Page.of([group, group]))
    spool.add_users(Page.of([newer, user(2, [])]))
    spool.add_users(Page.of([older]))
    with wh.write() as con:
        counts = load_snapshot(con, spool, datetime(2026, 1, 3))
    assert (counts.users, counts.users_new, counts.groups, counts.memberships) == (2, 2, 1, 1)
    with wh.read() as con:
        assert con.execute("SELECT user_id, email FROM directory_users ORDER BY 1").fetchall() == [
            ("diruser_1", "new@x.io"), ("diruser_2", "u2@x.io")]


def test_a_spool_is_made_only_for_an_organization_id_and_only_inside_its_root(tmp_path):
    import pytest

    from scim_pipeline.scalekit.ids import InvalidId

    root = tmp_path / "home" / "spool"
    canaries = [tmp_path / "home" / "canary", tmp_path / "canary"]
    for canary in canaries:
        canary.mkdir(parents=True)
        (canary / "keep").write_text("x")
    for org in ("../canary", "../../canary", "org_1/../../canary", "..", "", "org_1\n"):
        with pytest.raises(InvalidId):
            Spool.create(root, org, datetime(2026, 1, 1))
    # A folder of the spool that is a link elsewhere is neither emptied nor removed.
    root.mkdir(parents=True, exist_ok=True)
    (root / "org_2").symlink_to(canaries[1], target_is_directory=True)
    with pytest.raises(ValueError):
        Spool.create(root, "org_2", datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        Spool(root, "org_2", datetime(2026, 1, 1)).remove()
    Spool.create(root, "org_1", datetime(2026, 1, 1)).remove()
    assert not (root / "org_1").exists()
    assert all((canary / "keep").exists() for canary in canaries)


def test_a_spool_under_a_path_with_quotes_loads(tmp_path):
    wh = Warehouse(tmp_path / "w.duckdb")
    root = tmp_path / "it's \"home\"; SELECT 1; --" / "spool"
    spool = Spool.create(root, "org_1", datetime(2026, 1, 3))
    spool.add_users(Page.of([user(1, [])]))
    with wh.write() as con:
        counts = load_snapshot(con, spool, datetime(2026, 1, 3))
    assert (counts.users, counts.users_new) == (1, 1)
