"""Scalekit's id shapes: the one check an id passes before it names a partition, a run key, a path or SQL."""

import pytest

from scim_pipeline.scalekit import ids


@pytest.mark.parametrize("kind, value", [
    (ids.ORGANIZATION, "org_59615193906282635"), (ids.ORGANIZATION, "org_a"), (ids.ORGANIZATION, "org_" + "9" * 28),
    (ids.DIRECTORY, "dir_121312434123312"), (ids.USER, "diruser_121312434123312"), (ids.USER, "diruser_" + "1" * 28),
    (ids.GROUP, "dirgroup_121312434123312"), (ids.GROUP, "dirgroup_AbC09"),
])
def test_scalekit_ids_pass(kind, value):
    assert kind.matches(value)
    assert kind.check(value) == value


@pytest.mark.parametrize("kind, value", [
    (ids.ORGANIZATION, "../canary"), (ids.ORGANIZATION, "org_../../canary"), (ids.ORGANIZATION, "org_"),
    (ids.ORGANIZATION, "org_1\n"), (ids.ORGANIZATION, "org_a\nb"), (ids.ORGANIZATION, "..."),
    (ids.ORGANIZATION, "org_" + "9" * 29), (ids.ORGANIZATION, "org_1'; DROP TABLE users; --"),
    (ids.ORGANIZATION, "org_１"), (ids.ORGANIZATION, "ORG_1"), (ids.ORGANIZATION, " org_1"), (ids.ORGANIZATION, ""),
    (ids.ORGANIZATION, None), (ids.ORGANIZATION, 12345), (ids.ORGANIZATION, ["org_1"]), (ids.ORGANIZATION, b"org_1"),
    (ids.ORGANIZATION, "dir_1"), (ids.DIRECTORY, "org_1"), (ids.DIRECTORY, "dir_1/2"),
    (ids.USER, "dirusr_1"), (ids.USER, "diruser_" + "1" * 29), (ids.USER, "diruser_1.2"),
    (ids.GROUP, "diruser_1"), (ids.GROUP, "dirgroup_" + "1" * 28), (ids.GROUP, {"id": "dirgroup_1"}),
])
def test_anything_else_is_refused_with_a_reason_that_cannot_break_a_log_line(kind, value):
    assert not kind.matches(value)
    with pytest.raises(ids.InvalidId) as raised:
        kind.check(value)
    message = str(raised.value)
    assert kind.name in message and "\n" not in message and len(message) < 200


def test_an_invalid_id_is_a_value_error():
    assert issubclass(ids.InvalidId, ValueError)
