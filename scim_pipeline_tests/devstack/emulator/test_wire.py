"""The hand-rolled protobuf encodings of the listing's hot path give exactly the messages the protobuf API builds."""

from google.protobuf import struct_pb2
from scalekit.v1.directories import directories_pb2 as dpb

from scim_pipeline.devstack.emulator import events, wire
from scim_pipeline.devstack.emulator.grpc_services import timestamp, user_entry
from scim_pipeline.devstack.emulator.synthetic import generate


def test_struct_encoding_matches_protobuf():
    value = {"s": "é ☃", "t": True, "f": False, "n": None, "i": 3, "x": 2.5, "l": [1, "a", {"k": []}],
             "d": {"nested": {"deeper": "x" * 300}}, "empty": {}}
    expected = struct_pb2.Struct()
    expected.update(value)
    assert struct_pb2.Struct.FromString(wire.struct_bytes(value)) == expected


def test_user_entries_match_the_protobuf_api():
    store, _ = generate(3, 2, 150, 5)
    for user in store.users.values():
        for detail in (False, True):
            parsed = dpb.ListDirectoryUsersResponse.FromString(user_entry(store, user, detail)).users
            expected = dpb.DirectoryUser(
                id=user.id, email=user.email, preferred_username=user.preferred_username,
                given_name=user.given_name, family_name=user.family_name, updated_at=timestamp(user.updated_at),
                emails=[v for v, _ in user.emails],
                groups=[dpb.DirectoryGroup(id=g, display_name=store.groups[g].display_name) for g in user.groups])
            if detail:
                expected.user_detail.update(events.scim_user(store, user))
            assert list(parsed) == [expected]
