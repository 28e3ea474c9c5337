"""Scalekit's messages as warehouse records: the C extension gives exactly the Python reference's bytes (protobuf's
parser, ``user_record``, orjson) for pages of users of every shape a directory sends, the SCIM detail's text is
protobuf's own JSON mapping of the Struct, and hostile bytes are a clear error."""

import json
import math
import random

import pytest
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import DecodeError
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
             b"\x92\x01\x04\x0a\x02\x08\x01")  # user_detail (18), a map entry whose key (1) is a varint
    data = user.SerializeToString() + wrong
    (line,) = converted_both_ways(b"\x0a" + _varint(len(data)) + data).records()
    assert (line["email"], line["updated_at"], line["active"]) == ("ada@x.io", None, False)
    assert line["detail"] == {"active": False, "n": 1.0}  # the entry with a varint key is unknown: not in the map
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


# --- found by fuzzing (fuzz_records.py): each input is the smallest that made the extension and the reference differ

def refused_both_ways(data: bytes) -> None:
    for convert in (records.users_page, records.users_page_py):
        with pytest.raises(ValueError, match="not a ListDirectoryUsersResponse"):
            convert(data, "org_1", "dir_1")


def struct_both_ways(data: bytes) -> str | None:
    """The text both sides give for a Struct's bytes, None when both refuse them."""
    try:
        reference = records.struct_json_py(struct_pb2.Struct.FromString(data))
    except DecodeError:
        with pytest.raises(ValueError, match="not a google.protobuf.Struct"):
            _records.struct_json(data)
        return None
    assert _records.struct_json(data) == reference
    return reference


def test_strings_are_checked_even_where_they_are_not_written():
    """protobuf refuses a string that is not UTF-8 wherever it is: one a later field replaces, the previous page's
    token, a group's, a Value member replaced by another."""
    refused_both_ways(b"\x0a\x06\x0a\x01\xff\x0a\x01u")  # a user's id, sent again
    refused_both_ways(b"\x1a\x01\xff\x1a\x02ok")  # next_page_token, sent again
    refused_both_ways(b'"\x02\xc0\x80')  # prev_page_token, never written
    refused_both_ways(b"\x0a\x0a\x8a\x01\x07\x0a\x01\xff\x0a\x02ok")  # a group's id, sent again
    assert struct_both_ways(b"\x0a\x0a\x0a\x01k\x12\x05\x1a\x01\xff\x20\x01") is None  # string_value, then bool_value
    assert struct_both_ways(b"\x0a\x08\x0a\x01k\x12\x03\x1a\x01\xff" + b"\x0a\x03\x0a\x01k") is None  # key sent again


def test_tags_and_lengths_protobuf_refuses_are_refused():
    refused_both_ways(b"\x00\x01")  # field number 0
    refused_both_ways(b"\x8a\x80\x80\x80\x10\x00")  # a tag past 32 bits: it was read as field 1
    refused_both_ways(b"\x8a\x80\x80\x80\x80\x00")  # a tag in 6 bytes
    refused_both_ways(b'"\x80\x80\x80\x80\x80\x00')  # a length in 6 bytes
    assert converted_both_ways(b'"\x80\x80\x80\x80\x00') == records.Page(b"", 0, "")  # in 5, it is one


def test_unknown_groups_are_skipped_as_protobuf_skips_them():
    """Wire types 3 and 4 (groups, long deprecated) were refused outright; protobuf skips an unknown group whole."""
    assert converted_both_ways(b"\x2b\x2c") == records.Page(b"", 0, "")  # field 5, a group
    assert converted_both_ways(b"\x1b\x1c") == records.Page(b"", 0, "")  # next_page_token (3) sent as a group
    assert struct_both_ways(b"KK\x00LLL") == "{}"  # field number 0 is let be inside a group
    assert struct_both_ways(b"\x3b\x08\x01\x3c\x0a\x03\x0a\x01k") == '{"k":null}'
    for broken in (b"\x2b", b"\x2c", b"\x2b\x34", b"\x2b\x00\x01\x2c"[:3]):  # unclosed, stray, closed by another
        refused_both_ways(broken)
    assert struct_both_ways(b"\x4b" * 100 + b"\x4c" * 100) == "{}"  # 100 deep: protobuf's limit
    assert struct_both_ways(b"\x4b" * 101 + b"\x4c" * 101) is None


def _nested(levels: int, leaf: bytes, kind: int = 5) -> bytes:
    """A Struct whose "root" holds ``levels`` nested struct_values (kind 5) or list_values (kind 6), then ``leaf``."""
    node = leaf
    for _ in range(levels):
        if kind == 5:  # struct_value { fields { key: "n", value: node } }
            node = b"\x2a" + _ld(b"\x0a" + _ld(b"\x0a\x01n\x12" + _ld(node)))
        else:  # list_value { values: node }
            node = b"\x32" + _ld(b"\x0a" + _ld(node))
    return b"\x0a" + _ld(b"\x0a\x04root\x12" + _ld(node))


def _ld(payload: bytes) -> bytes:
    return _varint(len(payload)) + payload


def test_the_depth_limit_is_protobufs_counted_in_messages():
    """protobuf parses a message 100 deep, not 101, and a Struct level is three messages (the Struct, the map entry,
    the Value); the extension counted Struct levels to 100."""
    assert struct_both_ways(_nested(32, b"\x20\x01")) is not None  # the innermost Value 98 deep
    assert struct_both_ways(_nested(32, b"\x2a\x04\x0a\x02\x0a\x00")) is not None  # a map entry 100 deep
    assert struct_both_ways(_nested(33, b"")) is None  # a Value 101 deep
    assert struct_both_ways(_nested(49, b"\x20\x01", kind=6)) is not None  # lists: two messages a level
    assert struct_both_ways(_nested(50, b"\x20\x01", kind=6)) is None
    # in a page, a user's detail starts 2 deep and a group's 3 deep
    detail = _nested(32, b"")
    assert converted_both_ways(b"\x0a" + _ld(b"\x92\x01" + _ld(detail))).count == 1
    refused_both_ways(b"\x0a" + _ld(b"\x8a\x01" + _ld(b"\x2a" + _ld(detail))))


def test_a_struct_or_list_member_sent_twice_is_the_two_merged():
    """A oneof's message member sent twice is merged, as any message field; another member in between starts over."""
    two_structs = b"\x0a\x13\x0a\x01k\x12\x0e*\x05\x0a\x03\x0a\x01a*\x05\x0a\x03\x0a\x01b"
    assert struct_both_ways(two_structs) == '{"k":{"a":null,"b":null}}'
    two_lists = b"\x0a\x18\x0a\x01k\x12\x132\x04\x0a\x02 \x012\x0b\x0a\x09\x11" + bytes(7) + b"@"
    assert struct_both_ways(two_lists) == '{"k":[true,2.0]}'
    value_twice = b"\x0a\x14\x0a\x01k\x12\x07*\x05\x0a\x03\x0a\x01a\x12\x06*\x04\x0a\x02\x0a\x00"  # the entry's value
    assert struct_both_ways(value_twice) == '{"k":{"":null,"a":null}}'
    switched = b"\x0a\x15\x0a\x01k\x12\x10*\x05\x0a\x03\x0a\x01a\x20\x01*\x05\x0a\x03\x0a\x01b"
    assert struct_both_ways(switched) == '{"k":{"b":null}}'


def test_each_part_of_a_message_sent_twice_is_parsed_on_its_own():
    """Merging parts is not reading their bytes end to end: a field cut short at the end of one part is an error, not
    a field that reads on into the next part."""
    refused_both_ways(b"\x0a\x06\x32\x01\x08\x32\x01\x05")  # updated_at in two parts, the first cut short
    refused_both_ways(b"\x0a\x08\x92\x01\x01\x0a\x92\x01\x01\x00")  # user_detail likewise


def test_a_map_entry_with_an_unknown_field_is_left_out_of_the_map():
    """protobuf keeps such an entry among the Struct's unknown fields: it is not in the map, so not in the detail, and
    an "active" entry of that kind does not make a user inactive."""
    assert struct_both_ways(b"\x0a\x09\x0a\x01k\x12\x02 \x01\x18\x01") == "{}"  # an unknown field 3
    assert struct_both_ways(b"\x0a\x06\x08\x07\x12\x02 \x01") == "{}"  # the key sent as a varint
    entry = b"\x0a\x06active\x12\x02\x20\x00\x18\x01"  # "active": false, and an unknown field
    (line,) = converted_both_ways(b"\x0a" + _ld(b"\x92\x01" + _ld(b"\x0a" + _ld(entry)))).records()
    assert (line["active"], line["detail"]) == (True, {})


def test_a_timestamp_whose_nanos_bring_it_back_within_the_years_1_to_9999_is_one():
    """nanos is an int32: up to 2.1 s either way. The extension refused any seconds past the range by more than one."""
    for (seconds, nanos), text in (((253402300801, -2**31), "9999-12-31T23:59:58.852516"),
                                   ((-62135596802, 2**31 - 1), "0001-01-01T00:00:00.147483")):
        user = pb.DirectoryUser(id="u")
        user.updated_at.seconds, user.updated_at.nanos = seconds, nanos
        (line,) = converted_both_ways(pb.ListDirectoryUsersResponse(users=[user]).SerializeToString()).records()
        assert line["updated_at"] == text


def test_the_reference_does_not_lean_on_the_extension_it_checks(monkeypatch):
    """users_page_py wrote the detail through struct_json, which is the extension when it is built: the reference
    then agreed with the extension by construction."""
    monkeypatch.setattr(records, "_records", None)
    user = pb.DirectoryUser(id="u")
    user.user_detail.update({"b": [1, {"x": None}], "a": "é"})
    data = pb.ListDirectoryUsersResponse(users=[user]).SerializeToString()
    monkeypatch.undo()
    with_extension = records.users_page_py(data, "org_1", "dir_1")
    monkeypatch.setattr(records, "_records", None)
    assert records.users_page_py(data, "org_1", "dir_1") == with_extension
    monkeypatch.setattr(records, "struct_json", lambda struct: pytest.fail("the reference used struct_json"))
    assert records.users_page_py(data, "org_1", "dir_1") == with_extension
