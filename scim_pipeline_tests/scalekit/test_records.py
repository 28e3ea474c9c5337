"""Scalekit's messages as warehouse records: the C extension gives exactly the Python reference's bytes (protobuf's
parser, ``user_record``, orjson) for pages of users of every shape a directory sends, the SCIM detail's text is
protobuf's own JSON mapping of the Struct, and hostile bytes are a clear error."""

import json
import math
import random

import orjson
import pytest
from google.protobuf import json_format, struct_pb2
from scalekit.v1.directories import directories_pb2 as pb

from scim_pipeline.scalekit import _records, records

WORDS = ["", "a", "userName", "é", "日本", "🙂", 'quote"d', "back\\slash", "tab\tnew\nline", "\x00\x01\x1f\x7f", "/"]


def random_value(rng: random.Random, depth: int):
    kind = rng.choice(["str", "num", "bool", "null"] + (["dict", "list"] if depth < 4 else []))
    if kind == "str":
        return rng.choice(WORDS) + str(rng.randint(0, 9)) * rng.randint(0, 2)
    if kind == "num":
        return rng.choice([0, -1, 2**53, 1e-7, 1.5, 123456.789, -0.0, 1e300, rng.uniform(-1e6, 1e6), rng.randint(-99, 99)])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return random_object(rng, depth + 1)


def random_object(rng: random.Random, depth: int) -> dict:
    return {rng.choice(WORDS) + str(i): random_value(rng, depth) for i in range(rng.randint(0, 6))}


def to_struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def test_the_extension_is_built():
    assert records.COMPILED, "scim_pipeline.scalekit._records did not build: `make install` compiles it (needs a C compiler)"


@pytest.mark.parametrize("seed", range(5))
def test_the_extension_and_the_reference_give_the_same_text_which_is_protobufs_json_mapping(seed):
    rng = random.Random(seed)
    for _ in range(300):
        struct = to_struct(random_object(rng, 0))
        text = records.struct_json(struct)
        assert text == records.struct_json_py(struct)
        assert json.loads(text) == json_format.MessageToDict(struct)
        assert list(json.loads(text)) == sorted(json.loads(text))  # canonical: keys sorted


def test_the_text_is_canonical_whatever_order_the_server_wrote_the_map_in():
    forward = to_struct({"b": 1, "a": {"y": [1, {"d": 1, "c": 2}], "x": None}})
    entries = forward.SerializeToString()
    # Re-serialize the top-level map entries in the other order, as another server might.
    reversed_ = b"".join(reversed(_split_fields(entries)))
    assert records.struct_json(struct_pb2.Struct.FromString(reversed_)) == records.struct_json(forward)
    assert records.struct_json(forward) == '{"a":{"x":null,"y":[1.0,{"c":2.0,"d":1.0}]},"b":1.0}'


def test_repeated_keys_and_unknown_fields_read_as_protobuf_reads_them():
    first = to_struct({"k": "first"}).SerializeToString()
    last = to_struct({"k": "last"}).SerializeToString()
    unknown = bytes([0x98, 0x06, 0x07])  # field 99, varint 7: not a Struct field
    data = first + unknown + last
    parsed = struct_pb2.Struct.FromString(data)
    assert _records.struct_json(data) == records.struct_json_py(parsed) == '{"k":"last"}'


def test_non_finite_numbers_become_null_because_json_has_none():
    struct = to_struct({"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "x": 1})
    expected = '{"inf":null,"nan":null,"ninf":null,"x":1.0}'
    assert records.struct_json(struct) == records.struct_json_py(struct) == expected


def test_bytes_that_are_not_a_struct_are_a_clear_error():
    data = to_struct({"userName": "ada", "emails": [{"value": "ada@example.com"}]}).SerializeToString()
    for broken in (data[:-1], data[:7], b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"):
        with pytest.raises(ValueError, match="not a google.protobuf.Struct"):
            _records.struct_json(broken)
    deep: dict = {}
    node = deep
    for _ in range(120):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(ValueError, match="nested too deeply"):
        _records.struct_json(to_struct(deep).SerializeToString())
    assert _records.struct_json(b"") == "{}"


def _split_fields(data: bytes) -> list[bytes]:
    """The top-level length-delimited fields of a message, as raw bytes each."""
    fields, i = [], 0
    while i < len(data):
        start = i
        i += 1  # a one-byte tag (field 1, length-delimited)
        length, shift = 0, 0
        while True:
            b = data[i]
            i += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        i += length
        fields.append(data[start:i])
    return fields


# --- pages of users --------------------------------------------------------------------------------------------------

ACTIVE = [True, False, None, 0, 1.5, -0.0, math.nan, math.inf, "", "no", {}, {"a": 1}, [], [0]]
TIMES = [(0, 0), (0, 5000), (1700000000, 123456789), (1700000000, 999), (-1, 0), (-86400 * 365 * 1000, 999999999),
         (-62135596800, 0), (253402300799, 999999999), (1, -1)]


def random_user(rng: random.Random, i: int) -> pb.DirectoryUser:
    user = pb.DirectoryUser(
        id=f"diruser_{i}{rng.choice(WORDS)}", email=rng.choice(WORDS) + "@example.com", given_name=rng.choice(WORDS),
        family_name=rng.choice(WORDS), preferred_username=rng.choice(WORDS),
        emails=[rng.choice(WORDS) + "@x.io" for _ in range(rng.randint(0, 3))],  # any order, maybe repeated
    )
    for g in range(rng.randint(0, 3)):
        user.groups.add(id=f"dirgroup_{g}{rng.choice(WORDS)}", display_name=rng.choice(WORDS),
                        total_users=rng.randint(-2, 9))
    if rng.random() < 0.9:
        user.updated_at.seconds, user.updated_at.nanos = rng.choice(TIMES)
    detail = random_object(rng, 1)
    if rng.random() < 0.7:
        detail["active"] = rng.choice(ACTIVE)
    user.user_detail.update(detail)
    return user


def converted_both_ways(data: bytes, organization_id: str = "org_1", directory_id: str = "dir_1") -> records.Page:
    page = records.Page(*_records.users_page(data, organization_id, directory_id))
    assert page == records.users_page_py(data, organization_id, directory_id)
    return page


@pytest.mark.parametrize("seed", range(4))
def test_a_page_of_users_converted_in_c_is_byte_for_byte_the_reference(seed):
    rng = random.Random(seed)
    for p in range(40):
        users = [random_user(rng, i) for i in range(rng.randint(0, 30))]
        token = rng.choice(["", "next", "é🙂"])
        data = pb.ListDirectoryUsersResponse(users=users, next_page_token=token, total_size=99).SerializeToString()
        page = converted_both_ways(data, f"org_{rng.choice(WORDS)}", f"dir_{p}")
        assert (page.count, page.next_page_token) == (len(users), token)
        lines = page.records()
        assert [r["user_id"] for r in lines] == [u.id for u in users]
        assert [r["detail"] for r in lines] == [json.loads(records.struct_json_py(u.user_detail)) for u in users]


def test_a_user_line_reads_as_the_warehouse_expects():
    user = pb.DirectoryUser(id="diruser_1", email="ada@x.io", given_name="Ada", family_name="Lovelace",
                            preferred_username="ada", emails=["b@x.io", "ada@x.io"])
    user.updated_at.seconds, user.updated_at.nanos = 1700000000, 123456789
    user.groups.add(id="dirgroup_1", display_name="Admins")
    user.user_detail.update({"userName": "ada", "active": False})
    page = converted_both_ways(pb.ListDirectoryUsersResponse(users=[user], next_page_token="t2").SerializeToString())
    assert page.lines == (
        b'{"user_id":"diruser_1","organization_id":"org_1","directory_id":"dir_1","email":"ada@x.io",'
        b'"given_name":"Ada","family_name":"Lovelace","preferred_username":"ada","active":false,'
        b'"emails":["ada@x.io","b@x.io"],"groups":[{"id":"dirgroup_1","name":"Admins"}],'
        b'"updated_at":"2023-11-14T22:13:20.123456","detail":{"active":false,"userName":"ada"}}\n'
    )
    assert (page.count, page.next_page_token) == (1, "t2")
    assert converted_both_ways(b"") == records.Page(b"", 0, "")


def test_fields_sent_twice_read_as_protobuf_reads_them():
    """The last of a scalar wins; a message field sent twice (the detail, the timestamp) is the two merged."""
    first = pb.DirectoryUser(id="diruser_1", email="old@x.io", emails=["a@x.io"])
    first.user_detail.update({"active": True, "title": "first", "name": {"givenName": "Ada"}})
    first.updated_at.seconds = 1700000000
    second = pb.DirectoryUser(email="new@x.io", emails=["b@x.io"])
    second.user_detail.update({"active": False, "department": "R&D"})
    second.updated_at.nanos = 5000
    unknown = bytes([0x98, 0x06, 0x07])  # field 99, varint 7: unknown to DirectoryUser
    user = first.SerializeToString() + unknown + second.SerializeToString()
    data = b"\x0a" + _varint(len(user)) + user + b"\x1a\x01x\x1a\x01y"  # and next_page_token twice
    (line,) = converted_both_ways(data).records()
    assert (line["email"], line["emails"], line["active"], line["updated_at"]) == (
        "new@x.io", ["a@x.io", "b@x.io"], False, "2023-11-14T22:13:20.000005")
    assert line["detail"] == {"active": False, "department": "R&D", "name": {"givenName": "Ada"}, "title": "first"}
    assert converted_both_ways(data).next_page_token == "y"


def test_known_fields_sent_with_another_wire_type_are_skipped_as_protobuf_skips_them():
    user = pb.DirectoryUser(id="diruser_1", email="ada@x.io")
    user.user_detail.update({"active": False, "n": 1})
    wrong = (b"\x10\x07"                      # email (2) as a varint
             b"\x31" + bytes(8) +              # updated_at (6) as a fixed64
             b"\x92\x01\x04\x0a\x02\x08\x01")  # user_detail (18) with a map entry's key (1) as a varint
    data = user.SerializeToString() + wrong
    (line,) = converted_both_ways(b"\x0a" + _varint(len(data)) + data).records()
    assert (line["email"], line["updated_at"], line["active"]) == ("ada@x.io", None, False)
    assert line["detail"] == {"": None, "active": False, "n": 1.0}
    value = struct_pb2.Value(string_value="kept").SerializeToString() + b"\x1d" + bytes(4)  # string_value as fixed32
    entry = b"\x0a\x01k\x12" + _varint(len(value)) + value
    struct = b"\x0a" + _varint(len(entry)) + entry + b"\x08\x01"  # and a map entry as a varint
    reference = records.struct_json_py(struct_pb2.Struct.FromString(struct))
    assert _records.struct_json(struct) == reference == '{"k":"kept"}'


def test_a_page_that_is_not_one_is_a_clear_error_from_both():
    good = pb.ListDirectoryUsersResponse(users=[random_user(random.Random(1), 1)]).SerializeToString()
    bad_utf8 = b"\x0a\x03\x12\x01\xff"  # a user whose email is the byte 0xff
    for year, seconds in ((0, -62135596801), (10000, 253402300800)):
        user = pb.DirectoryUser(id="u")
        user.updated_at.seconds = seconds
        too_far = pb.ListDirectoryUsersResponse(users=[user]).SerializeToString()
        for convert in (records.users_page, records.users_page_py):
            with pytest.raises(ValueError, match="not a ListDirectoryUsersResponse"):
                convert(too_far, "org_1", "dir_1")
    for broken in (good[:-1], good[:5], bad_utf8, b"\x0b", b"\x0a\x06\x92\x01\x03\x0a\x01\xff"):
        for convert in (records.users_page, records.users_page_py):
            with pytest.raises(ValueError, match="not a ListDirectoryUsersResponse"):
                convert(broken, "org_1", "dir_1")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))
