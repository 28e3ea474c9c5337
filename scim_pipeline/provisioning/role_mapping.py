"""The role-mapping file (README "Role mappings"): which directory groups give which application roles, and the
per-organization settings of the mass-deprovisioning guard.

Format (every key optional; unknown keys are errors)::

    use_directory_role_assignments: true   # count Scalekit's own group-to-role assignments (directories.role_assignments)
    default_role: member                   # for ACTIVE users that no rule or assignment gives a role; omit for none
    deprovision_guard:                     # hold deactivations/deletes (and removals/revocations) once more than
      threshold: 0.2                       #   this share of the organization's active users
      min_users: 10                        #   and more than this many users
      window_hours: 24                     #   lost access within this many hours (across runs)
    rules:                                 # a user gets the role of EVERY rule that matches one of their groups
      - group: "Engineering*"              # group display name; case-insensitive; * matches any run of characters
        role: developer
      - group_id: "dirgroup_123"           # or the group's id (same matching)
        organization: org_42               # only in this organization
        role: admin
    organizations:                         # per-organization overrides of the guard
      org_42:
        deprovision_threshold: 0.5
        deprovision_min_users: 5
        deprovision_window_hours: 72

A rule has exactly one of ``group`` / ``group_id`` and always a ``role``. Errors name the file and line:
``RoleMappingError("role_mappings.yaml:7: rule 2 names no role")``. The matching itself is SQL
(``scim_pipeline.provisioning.derive.derive_roles``); this module only reads and validates the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_THRESHOLD = 0.2
DEFAULT_MIN_USERS = 10
DEFAULT_WINDOW_HOURS = 24.0

_TOP_KEYS = {"use_directory_role_assignments", "default_role", "deprovision_guard", "rules", "organizations"}
_RULE_KEYS = {"group", "group_id", "organization", "role"}
_GUARD_KEYS = {"threshold", "min_users", "window_hours"}
_ORG_KEYS = {"deprovision_threshold", "deprovision_min_users", "deprovision_window_hours"}


class RoleMappingError(ValueError):
    """The role-mapping file is invalid; the message is ``"<file>:<line>: <what is wrong>"``."""


@dataclass(frozen=True)
class GuardSettings:
    """Deactivations/deletes are held when the users they deprovision within ``window_hours`` exceed ``threshold`` of
    the active users AND ``min_users`` users; membership removals and role revocations likewise, by the users who
    lose one."""

    threshold: float = DEFAULT_THRESHOLD
    min_users: int = DEFAULT_MIN_USERS
    window_hours: float = DEFAULT_WINDOW_HOURS


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in the file, part of the source recorded on each role assignment
    role: str
    group: str | None = None  # display-name pattern
    group_id: str | None = None  # id pattern
    organization_id: str | None = None
    line: int = 0

    @property
    def pattern(self) -> str:
        return self.group if self.group is not None else (self.group_id or "")

    @property
    def source(self) -> str:
        """How role_assignments.source names this rule: ``rule:<index>:<pattern>``."""
        return f"rule:{self.index}:{self.pattern}"


@dataclass(frozen=True)
class RoleMapping:
    rules: tuple[Rule, ...] = ()
    default_role: str | None = None
    use_directory_role_assignments: bool = True
    guard: GuardSettings = field(default_factory=GuardSettings)
    # (organization_id, settings) pairs: a tuple keeps the dataclass immutable
    organization_guards: tuple[tuple[str, GuardSettings], ...] = ()
    path: str | None = None

    def guard_for(self, organization_id: str) -> GuardSettings:
        return dict(self.organization_guards).get(organization_id, self.guard)


class _Reader:
    """Validates a composed YAML node tree, so that every complaint can name the line it is about."""

    def __init__(self, path: str, loader: yaml.SafeLoader):
        self.path = path
        self.loader = loader

    def fail(self, node: yaml.Node | None, message: str) -> RoleMappingError:
        line = node.start_mark.line + 1 if node is not None else 1
        return RoleMappingError(f"{self.path}:{line}: {message}")

    def mapping(self, node: yaml.Node, what: str, allowed: set[str]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.loader.construct_object(key_node)
            if not isinstance(key, str):
                raise self.fail(key_node, f"{what}: keys must be strings, got {key!r}")
            if key in items:
                raise self.fail(key_node, f"{what}: duplicate key '{key}'")
            if key not in allowed:
                raise self.fail(key_node, f"{what}: unknown key '{key}' (allowed: {', '.join(sorted(allowed))})")
            items[key] = (key_node, value_node)
        return items

    def scalar(self, node: yaml.Node, what: str, types: tuple[type, ...]) -> object:
        value = self.loader.construct_object(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) and bool not in types:
            value = None  # YAML's yes/no must not pass for a number
        if not isinstance(value, types):
            names = " or ".join(t.__name__ if t is not str else "text" for t in types)
            raise self.fail(node, f"{what} must be {names}")
        return value

    def name(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node, what, (str, int))
        text = str(value).strip()
        if not text:
            raise self.fail(node, f"{what} must not be empty")
        return text

    def threshold(self, node: yaml.Node, what: str) -> float:
        value = float(self.scalar(node, what, (int, float)))  # type: ignore[arg-type]
        if not 0.0 <= value <= 1.0:
            raise self.fail(node, f"{what} must be a share between 0 and 1, got {value}")
        return value

    def hours(self, node: yaml.Node, what: str) -> float:
        value = float(self.scalar(node, what, (int, float)))  # type: ignore[arg-type]
        if not value > 0:
            raise self.fail(node, f"{what} must be a positive number of hours, got {value:g}")
        return value

    def count(self, node: yaml.Node, what: str) -> int:
        value = self.scalar(node, what, (int,))
        if value < 0:  # type: ignore[operator]
            raise self.fail(node, f"{what} must not be negative")
        return value  # type: ignore[return-value]

    def rule(self, index: int, node: yaml.Node) -> Rule:
        what = f"rule {index}"
        items = self.mapping(node, what, _RULE_KEYS)
        if "role" not in items or self.loader.construct_object(items["role"][1]) in (None, ""):
            at = items["role"][1] if "role" in items else node
            raise self.fail(at, f"{what} names no role")
        role = self.name(items["role"][1], f"{what}: role")
        matchers = [k for k in ("group", "group_id") if k in items]
        if len(matchers) != 1:
            raise self.fail(node, f"{what} must name exactly one of 'group' (display name) or 'group_id'")
        pattern = self.name(items[matchers[0]][1], f"{what}: {matchers[0]}")
        organization = self.name(items["organization"][1], f"{what}: organization") if "organization" in items else None
        return Rule(
            index=index,
            role=role,
            group=pattern if matchers[0] == "group" else None,
            group_id=pattern if matchers[0] == "group_id" else None,
            organization_id=organization,
            line=node.start_mark.line + 1,
        )

    def document(self, root: yaml.Node | None) -> RoleMapping:
        if root is None or (isinstance(root, yaml.ScalarNode) and root.value == ""):
            return RoleMapping(path=self.path)  # an empty file: no rules, directory assignments on
        top = self.mapping(root, "role mapping", _TOP_KEYS)

        use_directory = True
        if "use_directory_role_assignments" in top:
            use_directory = bool(self.scalar(top["use_directory_role_assignments"][1], "use_directory_role_assignments", (bool,)))

        default_role = None
        if "default_role" in top and self.loader.construct_object(top["default_role"][1]) is not None:
            default_role = self.name(top["default_role"][1], "default_role")

        guard = GuardSettings()
        if "deprovision_guard" in top:
            items = self.mapping(top["deprovision_guard"][1], "deprovision_guard", _GUARD_KEYS)
            guard = GuardSettings(
                threshold=self.threshold(items["threshold"][1], "deprovision_guard.threshold")
                if "threshold" in items else DEFAULT_THRESHOLD,
                min_users=self.count(items["min_users"][1], "deprovision_guard.min_users")
                if "min_users" in items else DEFAULT_MIN_USERS,
                window_hours=self.hours(items["window_hours"][1], "deprovision_guard.window_hours")
                if "window_hours" in items else DEFAULT_WINDOW_HOURS,
            )

        rules: list[Rule] = []
        if "rules" in top:
            rules_node = top["rules"][1]
            if isinstance(rules_node, yaml.ScalarNode) and rules_node.value in ("", "~", "null"):
                pass
            elif not isinstance(rules_node, yaml.SequenceNode):
                raise self.fail(rules_node, "rules must be a list")
            else:
                rules = [self.rule(i, n) for i, n in enumerate(rules_node.value, start=1)]

        org_guards: list[tuple[str, GuardSettings]] = []
        if "organizations" in top:
            orgs_node = top["organizations"][1]
            if not isinstance(orgs_node, yaml.MappingNode):
                raise self.fail(orgs_node, "organizations must be a mapping of organization id to settings")
            for key_node, value_node in orgs_node.value:
                org_id = self.name(key_node, "organization id")
                items = self.mapping(value_node, f"organizations.{org_id}", _ORG_KEYS)
                org_guards.append((org_id, GuardSettings(
                    threshold=self.threshold(items["deprovision_threshold"][1], f"organizations.{org_id}.deprovision_threshold")
                    if "deprovision_threshold" in items else guard.threshold,
                    min_users=self.count(items["deprovision_min_users"][1], f"organizations.{org_id}.deprovision_min_users")
                    if "deprovision_min_users" in items else guard.min_users,
                    window_hours=self.hours(items["deprovision_window_hours"][1],
                                            f"organizations.{org_id}.deprovision_window_hours")
                    if "deprovision_window_hours" in items else guard.window_hours,
                )))

        return RoleMapping(
            rules=tuple(rules),
            default_role=default_role,
            use_directory_role_assignments=use_directory,
            guard=guard,
            organization_guards=tuple(org_guards),
            path=self.path,
        )


def parse_role_mapping(text: str, path: str = "role_mappings.yaml") -> RoleMapping:
    """Parse the file's text; ``path`` only names it in error messages."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            raise RoleMappingError(f"{path}:{line}: invalid YAML: {exc.problem or exc.context}") from None
        except yaml.YAMLError as exc:
            raise RoleMappingError(f"{path}:1: invalid YAML: {exc}") from None
        return _Reader(path, loader).document(root)
    finally:
        loader.dispose()


def load_role_mapping(path: str | Path) -> RoleMapping:
    """Read and validate the role-mapping file; raises ``RoleMappingError`` naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoleMappingError(f"{path}:0: cannot read the role-mapping file: {exc.strerror or exc}") from None
    return parse_role_mapping(text, str(path))
