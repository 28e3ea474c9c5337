import json
from pathlib import Path

import pytest

from scim_pipeline.provisioning.derive import derive_memberships, derive_roles, like_pattern
from scim_pipeline.provisioning.role_mapping import (
    GuardSettings,
    RoleMappingError,
    load_role_mapping,
    parse_role_mapping,
)

from .conftest import add_group, add_member, add_user

PACKAGED = Path(__file__).resolve().parents[2] / "scim_pipeline" / "provisioning" / "role_mappings.yaml"


def write(tmp_path, text):
    path = tmp_path / "role_mappings.yaml"
    path.write_text(text)
    return path


def test_packaged_example_loads():
    mapping = load_role_mapping(PACKAGED)
    assert mapping.default_role == "member"
    assert mapping.use_directory_role_assignments is True
    assert [(r.pattern, r.role) for r in mapping.rules][:2] == [("Engineering*", "developer"), ("*admin*", "admin")]
    assert any(r.organization_id for r in mapping.rules)
    assert mapping.guard == GuardSettings(0.2, 10)


def test_good_file_with_guard_overrides(tmp_path):
    mapping = load_role_mapping(write(tmp_path, """
use_directory_role_assignments: false
default_role: viewer
deprovision_guard: {threshold: 0.3, min_users: 4}
rules:
  - group_id: dirgroup_1
    role: owner
    organization: org_a
organizations:
  org_b: {deprovision_threshold: 0.5}
"""))
    assert mapping.rules[0].group_id == "dirgroup_1" and mapping.rules[0].source == "rule:1:dirgroup_1"
    assert mapping.rules[0].line == 6
    assert mapping.guard_for("org_b") == GuardSettings(0.5, 4)
    assert mapping.guard_for("org_c") == GuardSettings(0.3, 4)


def test_unknown_key_names_its_line(tmp_path):
    path = write(tmp_path, "default_role: member\nrules:\n  - group: Eng*\n    role: dev\n    colour: blue\n")
    with pytest.raises(RoleMappingError, match=r"role_mappings.yaml:5: rule 1: unknown key 'colour'"):
        load_role_mapping(path)
    with pytest.raises(RoleMappingError, match=r":2: role mapping: unknown key 'rule'"):
        parse_role_mapping("default_role: member\nrule: []\n")


def test_rule_without_role_names_its_line(tmp_path):
    path = write(tmp_path, "rules:\n  - group: A\n    role: a\n  - group: B\n    organization: org_a\n")
    with pytest.raises(RoleMappingError, match=r"role_mappings.yaml:4: rule 2 names no role"):
        load_role_mapping(path)
    with pytest.raises(RoleMappingError, match=r":3: rule 1 names no role"):
        parse_role_mapping("rules:\n  - group: A\n    role:\n")


def test_bad_yaml_names_its_line(tmp_path):
    path = write(tmp_path, "default_role: member\nrules:\n  - group: [unclosed\n    role: x\n")
    with pytest.raises(RoleMappingError, match=r"role_mappings.yaml:\d+: invalid YAML") as info:
        load_role_mapping(path)
    assert int(str(info.value).split(":")[1]) >= 3


def test_other_errors():
    with pytest.raises(RoleMappingError, match=r":1: .*exactly one of"):
        parse_role_mapping("rules: [{group: a, group_id: b, role: r}]")
    with pytest.raises(RoleMappingError, match=r":2: deprovision_guard.threshold must be a share"):
        parse_role_mapping("deprovision_guard:\n  threshold: 2\n")
    with pytest.raises(RoleMappingError, match=r":1: role mapping must be a mapping"):
        parse_role_mapping("- a\n")
    assert parse_role_mapping("").rules == ()


def test_like_pattern_escapes_sql_wildcards():
    assert like_pattern("Eng*") == "Eng%"
    assert like_pattern("100%_ok*") == "100\\%\\_ok%"


def roles_of(con, org="org_a"):
    return sorted(con.execute(
        "SELECT user_id, role_name, source FROM role_assignments WHERE organization_id = ?", [org]).fetchall())


def setup_directory(con):
    add_user(con, "u_eng")
    add_user(con, "u_admin")
    add_user(con, "u_none")
    add_user(con, "u_off", active=False)
    add_user(con, "u_gone", deleted=True)
    add_user(con, "u_b", org="org_b")
    add_group(con, "g_eng", "engineering - Platform")
    add_group(con, "g_adm", "IT Admins")
    add_group(con, "g_pct", "100% club")
    add_group(con, "g_b", "Engineering", org="org_b")
    add_member(con, "g_eng", "u_eng")
    add_member(con, "g_adm", "u_admin")
    add_member(con, "g_eng", "u_off")
    add_member(con, "g_eng", "u_gone")
    add_member(con, "g_b", "u_b", org="org_b")
    con.execute(
        "INSERT INTO directories (directory_id, organization_id, role_assignments) VALUES ('dir_1', 'org_a', ?)",
        [json.dumps([{"group_id": "g_adm", "role_name": "owner"}])],
    )
    for org in ("org_a", "org_b"):
        derive_memberships(con, org)


MAPPING = """
default_role: member
rules:
  - group: "Engineering*"
    role: developer
  - group: "*ADMIN*"
    role: admin
  - group: "Engineering"
    organization: org_b
    role: lead
  - group: "100_ club"
    role: never
"""


def test_wildcard_case_insensitive_org_scoped_and_directory_assignments(con):
    setup_directory(con)
    derive_roles(con, "org_a", parse_role_mapping(MAPPING))
    assert roles_of(con) == [
        ("u_admin", "admin", "rule:2:*ADMIN*"),
        ("u_admin", "owner", "directory:g_adm"),
        ("u_eng", "developer", "rule:1:Engineering*"),
        ("u_none", "member", "default"),
        # deactivated: keeps group roles, no default; deleted: nothing
        ("u_off", "developer", "rule:1:Engineering*"),
    ]
    derive_roles(con, "org_b", parse_role_mapping(MAPPING))
    assert roles_of(con, "org_b") == [("u_b", "developer", "rule:1:Engineering*"), ("u_b", "lead", "rule:3:Engineering")]


def test_directory_assignments_off_and_rerun_is_idempotent(con):
    setup_directory(con)
    mapping = parse_role_mapping(MAPPING.replace("default_role: member", "use_directory_role_assignments: false"))
    assert derive_roles(con, "org_a", mapping) == 3
    assert derive_roles(con, "org_a", mapping) == 3
    assert ("u_admin", "owner", "directory:g_adm") not in roles_of(con)
    assert not any(role == "member" for _, role, _ in roles_of(con))


def test_memberships_only_for_live_users_and_groups(con):
    setup_directory(con)
    add_group(con, "g_old", "Old", deleted=True)
    add_member(con, "g_old", "u_eng")
    assert derive_memberships(con, "org_a") == 3
    rows = con.execute("SELECT group_id, user_id, group_name FROM group_memberships WHERE organization_id = 'org_a'"
                       " ORDER BY ALL").fetchall()
    assert rows == [("g_adm", "u_admin", "IT Admins"), ("g_eng", "u_eng", "engineering - Platform"),
                    ("g_eng", "u_off", "engineering - Platform")]
    assert con.execute("SELECT count(*) FROM group_memberships WHERE organization_id = 'org_b'").fetchall()[0] == (1,)


def test_guard_window_settings_and_their_errors(tmp_path):
    mapping = load_role_mapping(write(tmp_path, """
deprovision_guard: {threshold: 0.3, min_users: 4, window_hours: 12}
organizations:
  org_b: {deprovision_window_hours: 48}
  org_c: {deprovision_threshold: 0.5}
"""))
    assert mapping.guard == GuardSettings(0.3, 4, 12.0)
    assert mapping.guard_for("org_b") == GuardSettings(0.3, 4, 48.0)
    assert mapping.guard_for("org_c") == GuardSettings(0.5, 4, 12.0)
    assert parse_role_mapping("default_role: x\n").guard.window_hours == 24.0
    with pytest.raises(RoleMappingError, match=r":3: deprovision_guard.window_hours must be a positive number"):
        parse_role_mapping("deprovision_guard:\n  threshold: 0.2\n  window_hours: 0\n")
    with pytest.raises(RoleMappingError, match=r":2: deprovision_guard: unknown key 'window'"):
        parse_role_mapping("deprovision_guard:\n  window: 3\n")
    with pytest.raises(RoleMappingError, match=r":3: organizations.org_a: unknown key 'window_hours'"):
        parse_role_mapping("organizations:\n  org_a:\n    window_hours: 3\n")
