"""Has the application converged to the directory? The oracle behind `demo`'s last line and the suite's end-to-end
assertions: the directory's truth (the emulator's ``/_emulator/state``) with the role mapping applied, computed here
in plain Python, independently of the warehouse's SQL, and compared with the application's ``GET /state``."""

from __future__ import annotations

import fnmatch

from scim_pipeline.provisioning.role_mapping import RoleMapping


def _matches(pattern: str, value: str) -> bool:
    return fnmatch.fnmatchcase(value.lower(), pattern.lower().replace("[", "[[]").replace("?", "[?]"))


def expected_state(truth: dict, mapping: RoleMapping) -> dict[str, set]:
    """Users, memberships and roles the application must hold, as sets of tuples."""
    users, memberships, roles = set(), set(), set()
    for org in truth["organizations"]:
        org_id = org["id"]
        directory_roles: dict[str, set[str]] = {}
        if mapping.use_directory_role_assignments:
            for d in org["directories"]:
                for a in d.get("role_assignments", []):
                    directory_roles.setdefault(a["group_id"], set()).add(a["role_name"])
        names = {g["id"]: g["display_name"] for g in org["groups"]}
        for u in org["users"]:
            users.add((org_id, u["id"], u["email"], u.get("given_name") or "", u.get("family_name") or "",
                       bool(u["active"])))
            granted: set[str] = set()
            for g in u["groups"]:
                if g["id"] not in names:
                    continue
                memberships.add((org_id, g["id"], u["id"]))
                granted |= directory_roles.get(g["id"], set())
                for rule in mapping.rules:
                    if rule.organization_id not in (None, org_id):
                        continue
                    if rule.group is not None and _matches(rule.group, names[g["id"]]):
                        granted.add(rule.role)
                    if rule.group_id is not None and _matches(rule.group_id, g["id"]):
                        granted.add(rule.role)
            if not granted and mapping.default_role and u["active"]:
                granted.add(mapping.default_role)
            roles |= {(org_id, u["id"], r) for r in granted}
    return {"users": users, "memberships": memberships, "roles": roles}


def actual_state(app_state: dict) -> dict[str, set]:
    return {
        "users": {(u["organization_id"], u["user_id"], u["email"], u.get("given_name") or "",
                   u.get("family_name") or "", bool(u["active"])) for u in app_state["users"]},
        "memberships": {(m["organization_id"], m["group_id"], m["user_id"]) for m in app_state["memberships"]},
        "roles": {(r["organization_id"], r["user_id"], r["role_name"]) for r in app_state["roles"]},
    }


def differences(app_state: dict, truth: dict, mapping: RoleMapping, limit: int = 5) -> list[str]:
    """Human-readable differences (empty when converged), at most ``limit`` examples per kind."""
    want, have = expected_state(truth, mapping), actual_state(app_state)
    out = []
    for kind in ("users", "memberships", "roles"):
        missing, extra = want[kind] - have[kind], have[kind] - want[kind]
        if missing:
            out.append(f"{kind}: {len(missing)} missing in the application, e.g. {sorted(missing)[:limit]}")
        if extra:
            out.append(f"{kind}: {len(extra)} unexpected in the application, e.g. {sorted(extra)[:limit]}")
    return out
