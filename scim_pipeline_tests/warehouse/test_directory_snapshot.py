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


def member(org: str, i: int, groups: list[str]) -> dict:
    return {**user(i, groups), "user_id": f"diruser_{org}_{i}", "organization_id": org, "directory_id": f"dir_{org}"}


def group(org: str, g: int) -> dict:
    return {"group_id": f"dirgroup_{org}_{g}", "organization_id": org, "directory_id": f"dir_{org}",
            "display_name": f"G{g}", "total_users": 1, "updated_at": datetime(2026, 1, 1), "detail": {}}


def spool_of(root, org: str, listed_at: datetime, users: list[dict], groups: list[dict]) -> Spool:
    spool = Spool.create(root, org, listed_at)
    spool.add_users(Page.of(users))
    spool.add_groups(Page.of(groups))
    return spool


def test_organizations_loaded_together_end_as_if_each_was_loaded_alone(tmp_path):
    """A batch of small organizations is one set of statements: each keeps its own counts, its own tombstones and
    its own listing time (an event newer than its listing survives, one older is overwritten), and an organization
    whose spool is empty (deleted in Scalekit) is tombstoned without touching the others."""
    from scim_pipeline.warehouse.directory import load_snapshots

    orgs = ["org_a", "org_b", "org_c"]
    first = datetime(2026, 1, 2)
    states = {}
    for together in (False, True):
        wh = Warehouse(tmp_path / f"w{together}.duckdb")
        root = tmp_path / f"spool{together}"
        with wh.write() as con:
            for org in orgs:
                load_snapshot(con, spool_of(root, org, first, [member(org, i, [f"dirgroup_{org}_0"]) for i in range(4)],
                                            [group(org, 0), group(org, 1)]), first)
            # Webhook events after the first load: org_a's user 0 renamed at 12:00, org_b's user 0 at 12:00.
            con.execute("UPDATE directory_users SET email = 'event@x.io', event_at = $t WHERE user_id IN "
                        "('diruser_org_a_0', 'diruser_org_b_0')", {"t": datetime(2026, 1, 3, 12)})
        # The second listing: org_a listed before its event (the event stands), org_b after it (the listing wins);
        # org_a lost user 3 and group 1, org_b changed user 1's name, org_c is gone from Scalekit.
        spools = [
            spool_of(root, "org_a", datetime(2026, 1, 3, 11), [member("org_a", i, []) for i in range(3)],
                     [group("org_a", 0)]),
            spool_of(root, "org_b", datetime(2026, 1, 3, 13),
                     [member("org_b", i, [f"dirgroup_org_b_{i % 2}"]) | ({"given_name": "New"} if i == 1 else {})
                      for i in range(4)], [group("org_b", 0), group("org_b", 1)]),
            spool_of(root, "org_c", datetime(2026, 1, 3, 13), [], []),
        ]
        synced = datetime(2026, 1, 4)
        with wh.write() as con:
            if together:
                counts = load_snapshots(con, spools, synced)
            else:
                counts = {spool.organization_id: load_snapshot(con, spool, synced) for spool in spools}
        with wh.read() as con:
            states[together] = (
                counts,
                con.execute("SELECT user_id, email, given_name, deleted_at, synced_at, event_at FROM directory_users "
                            "ORDER BY 1").fetchall(),
                con.execute("SELECT group_id, deleted_at, event_at FROM directory_groups ORDER BY 1").fetchall(),
                con.execute("SELECT * FROM directory_user_groups ORDER BY ALL").fetchall(),
            )
    assert states[True] == states[False]
    counts, users, _, _ = states[True]
    assert (counts["org_a"].users, counts["org_a"].users_deleted, counts["org_a"].groups_deleted) == (3, 1, 1)
    assert (counts["org_b"].users_changed, counts["org_b"].users_deleted, counts["org_b"].memberships) == (2, 0, 4)
    assert (counts["org_c"].users, counts["org_c"].users_deleted, counts["org_c"].groups_deleted) == (0, 4, 2)
    emails = {row[0]: row[1] for row in users}
    assert emails["diruser_org_a_0"] == "event@x.io"  # newer than org_a's listing
    assert emails["diruser_org_b_0"] == "u0@x.io"  # older than org_b's listing
