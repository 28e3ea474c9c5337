"""The SCIM detail's Struct -> JSON conversion: the C extension gives exactly the Python reference's text, which is
protobuf's own JSON mapping of the Struct, for every shape a directory sends and for hostile bytes."""

import json
import math
import random

import pytest
from google.protobuf import json_format, struct_pb2

from scim_pipeline import struct_json as sj

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
    assert sj.COMPILED, "scim_pipeline._struct_json did not build: `make install` compiles it (needs a C compiler)"


@pytest.mark.parametrize("seed", range(5))
def test_the_extension_and_the_reference_give_the_same_text_which_is_protobufs_json_mapping(seed):
    rng = random.Random(seed)
    for _ in range(300):
        struct = to_struct(random_object(rng, 0))
        text = sj.struct_json(struct)
        assert text == sj.struct_json_py(struct)
        assert json.loads(text) == json_format.MessageToDict(struct)
        assert list(json.loads(text)) == sorted(json.loads(text))  # canonical: keys sorted


def test_the_text_is_canonical_whatever_order_the_server_wrote_the_map_in():
    forward = to_struct({"b": 1, "a": {"y": [1, {"d": 1, "c": 2}], "x": None}})
    entries = forward.SerializeToString()
    # Re-serialize the top-level map entries in the other order, as another server might.
    reversed_ = b"".join(reversed(_split_fields(entries)))
    assert sj.struct_json(struct_pb2.Struct.FromString(reversed_)) == sj.struct_json(forward)
    assert sj.struct_json(forward) == '{"a":{"x":null,"y":[1.0,{"c":2.0,"d":1.0}]},"b":1.0}'


def test_repeated_keys_and_unknown_fields_read_as_protobuf_reads_them():
    first = to_struct({"k": "first"}).SerializeToString()
    last = to_struct({"k": "last"}).SerializeToString()
    unknown = bytes([0x98, 0x06, 0x07])  # field 99, varint 7: not a Struct field
    data = first + unknown + last
    parsed = struct_pb2.Struct.FromString(data)
    assert sj._struct_json_c(data) == sj.struct_json_py(parsed) == '{"k":"last"}'


def test_non_finite_numbers_become_null_because_json_has_none():
    struct = to_struct({"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "x": 1})
    assert sj.struct_json(struct) == sj.struct_json_py(struct) == '{"inf":null,"nan":null,"ninf":null,"x":1.0}'


def test_bytes_that_are_not_a_struct_are_a_clear_error():
    data = to_struct({"userName": "ada", "emails": [{"value": "ada@example.com"}]}).SerializeToString()
    for broken in (data[:-1], data[:7], b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"):
        with pytest.raises(ValueError, match="not a google.protobuf.Struct"):
            sj._struct_json_c(broken)
    deep: dict = {}
    node = deep
    for _ in range(120):
        node["n"] = {}
        node = node["n"]
    with pytest.raises(ValueError, match="nested too deeply"):
        sj._struct_json_c(to_struct(deep).SerializeToString())
    assert sj._struct_json_c(b"") == "{}"


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
