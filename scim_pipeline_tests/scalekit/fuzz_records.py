"""Differential fuzzing of the C converter (``_records``) against the Python reference.

The extension parses Scalekit's wire bytes, untrusted network input, by hand. This drives it with mutated pages and
checks, for every input, that it does not crash and that it agrees with the reference: both raise ValueError, or both
give the same ``Page`` (``users_page`` against ``users_page_py``) or the same text (``struct_json`` against protobuf's
parser and ``struct_json_py``).

Inputs start from realistic pages built with the SDK's protobuf classes (nested details, lists, unicode, escapes, big
numbers, timestamps at the edges, nesting at protobuf's depth limit) and wire-level seeds (fields sent twice, unknown
fields of every wire type, groups), plus the files of ``fuzz_corpus/`` (inputs that once broke the extension). Each
case is mutated at the byte level (bit flips, insertions, deletions, truncation, splicing two inputs) and along the
message's own structure (a field deleted, repeated, renumbered, given another wire type or value, a length varint
corrupted, a group inserted), with the enclosing lengths fixed up so that deep mutations reach deep code.

When the extension was built with ``-fsanitize-coverage=trace-pc`` and ``fuzz_coverage.c`` (``make fuzz`` does), the
loop keeps each input that reaches new code, as coverage-guided fuzzers do; otherwise it mutates its seeds blindly.
Run it with ``make fuzz`` (AddressSanitizer and UBSan), or directly::

    python -m scim_pipeline_tests.scalekit.fuzz_records --seconds 60 [--iterations N] [--seed N] [--extension PATH]
        [--artifacts DIR]

It stops at the first disagreement (``--keep-going N`` collects N), shrinks it to a minimal input, prints it and
saves it under DIR/findings. A crash leaves the input that caused it in DIR/last-input; ``--replay FILE`` runs one
saved input again.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.machinery
import importlib.util
import json
import math
import mmap
import os
import random
import struct as pack
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from scalekit.v1.directories import directories_pb2 as pb

from scim_pipeline.scalekit import records

CORPUS = Path(__file__).with_name("fuzz_corpus")
MAX_INPUT = 1 << 16  # mutated inputs are cut here: big enough for a page of users, small enough to run fast


# --- the wire format ---------------------------------------------------------------------------------------------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64/int32 values are sent as their 64-bit two's complement
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return tag(number, 2) + varint(len(payload)) + payload


def vi(number: int, value: int) -> bytes:
    """A varint field."""
    return tag(number, 0) + varint(value)


def f64(number: int, value: float) -> bytes:
    return tag(number, 1) + pack.pack("<d", value)


def read_varint(data: bytes, i: int) -> tuple[int, int] | None:
    value = shift = 0
    while i < len(data) and shift < 70:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i
    return None


def parse_fields(data: bytes) -> list[tuple[int, int, bytes | int]] | None:
    """The fields of ``data`` if it reads as a message to its end (groups left out): (number, wire, value), the value
    an int for varints and bytes otherwise; None if it does not read as one."""
    fields, i = [], 0
    while i < len(data):
        read = read_varint(data, i)
        if read is None:
            return None
        key, i = read
        number, wire = key >> 3, key & 7
        if number == 0:
            return None
        if wire == 0:
            read = read_varint(data, i)
            if read is None:
                return None
            value, i = read
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if i + size > len(data):
                return None
            value, i = data[i:i + size], i + size
        elif wire == 2:
            read = read_varint(data, i)
            if read is None or read[1] + read[0] > len(data):
                return None
            value, i = data[read[1]:read[1] + read[0]], read[1] + read[0]
        else:
            return None
        fields.append((number, wire, value))
    return fields


def serialize(fields) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        if wire == -1:  # raw bytes, written as they are
            out += value
        elif wire == 0:
            out += vi(number, value)
        elif wire == 2:
            out += ld(number, value)
        else:
            out += tag(number, wire) + value
    return bytes(out)


# --- the two sides -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    kind: str  # "users" (a ListDirectoryUsersResponse) or "struct" (a google.protobuf.Struct)
    data: bytes
    organization_id: str = "org_1"
    directory_id: str = "dir_1"


def struct_json_reference(data: bytes) -> str:
    try:
        parsed = struct_pb2.Struct.FromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a google.protobuf.Struct: {exc}") from exc
    return records.struct_json_py(parsed)


class Buffers:
    """Exact-sized native copies of the inputs. A Python bytes object carries a trailing NUL and pymalloc rounds up,
    so a read one byte past the end of the input would go unseen by AddressSanitizer; malloc'd to the byte, it is
    reported."""

    def __init__(self):
        libc = ctypes.CDLL(None)
        self.malloc, self.free = libc.malloc, libc.free
        self.malloc.restype, self.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        self.free.argtypes = [ctypes.c_void_p]

    def call(self, function, data: bytes, *args):
        if not data:  # malloc(0) may be NULL
            return function(b"", *args)
        address = self.malloc(len(data))
        if not address:
            raise MemoryError
        try:
            ctypes.memmove(address, data, len(data))
            return function((ctypes.c_char * len(data)).from_address(address), *args)
        finally:
            self.free(address)


def _outcome(function, *args):
    """("value", result), ("ValueError", message) or ("raised", the traceback of anything else)."""
    try:
        return "value", function(*args)
    except ValueError as exc:
        return "ValueError", str(exc)
    except Exception:  # noqa: BLE001 - any other exception is a finding
        return "raised", traceback.format_exc()


def disagreement(extension, buffers: Buffers, case: Case) -> str | None:
    """None when the extension and the reference agree on ``case``; else what differs."""
    if case.kind == "users":
        got = _outcome(lambda: records.Page(*buffers.call(extension.users_page, case.data, case.organization_id,
                                                          case.directory_id)))
        want = _outcome(records.users_page_py, case.data, case.organization_id, case.directory_id)
    else:
        got = _outcome(buffers.call, extension.struct_json, case.data)
        want = _outcome(struct_json_reference, case.data)
    if got[0] == want[0] == "ValueError" or got == want:
        return None
    return f"extension: {got[0]}: {got[1]!r}\nreference: {want[0]}: {want[1]!r}"


# --- seeds -------------------------------------------------------------------------------------------------------

WORDS = ["", "a", "ada", "Zoë", "日本語", "🙂", "e\u0301", "\u2028\u2029", "\ufeff", "\U0010ffff", 'quote"d',
         "back\\slash", "tab\tnew\nline\r", "\x00\x01\x1f\x7f", "</script>", "a" * 300, "urn:ietf:params:scim:schemas"]
NUMBERS = [0, -0.0, 1, -1, 0.1, 1.5, 1e16, 1e-7, 2**53, 2**53 + 1, 2**63, -(2**63), 1e308, -1e308, 5e-324,
           2.2250738585072014e-308, 123456.789, math.nan, math.inf, -math.inf]
ACTIVE = [True, False, None, 0, 1, -0.0, 0.5, math.nan, math.inf, "", "false", {}, {"a": None}, [], [False]]
# (seconds, nanos): the ends of the years 1 to 9999, a nanosecond either side, negative nanos, int32/int64 extremes
TIMES = [(0, 0), (0, 1), (0, -1), (0, 999), (0, 1000), (-1, 0), (-1, 999999999), (1700000000, 123456789),
         (-62135596800, 0), (-62135596801, 999999999), (-62135596801, 0), (-62135596800, -1),
         (253402300799, 999999999), (253402300800, 0), (253402300800, -1000), (253402300801, -2**31),
         (-62135596803, 2**31 - 1), (-62135596802, 2**31 - 1), (2**63 - 1, 0), (-(2**63), 0), (0, 2**31 - 1),
         (0, -(2**31)), (1, -1)]


def scim_detail(rng: random.Random, i: int) -> dict:
    word = lambda: rng.choice(WORDS)  # noqa: E731
    detail = {
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
        "id": f"scim-{i}", "externalId": word(), "userName": f"user{i}{word()}@example.com",
        "name": {"givenName": word(), "familyName": word(), "formatted": word(), "middleName": None},
        "displayName": word(),
        "emails": [{"value": f"{word()}@x.io", "primary": rng.random() < 0.5, "type": "work"}
                   for _ in range(rng.randint(0, 3))],
        "phoneNumbers": [{"value": "+1 555 0100", "type": "mobile"}],
        "addresses": [{"streetAddress": "1 Main St\nApt 2", "locality": word(), "postalCode": "02134"}],
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
            "employeeNumber": str(i), "costCenter": word(), "manager": {"value": word(), "$ref": "../Users/1"}},
        "meta": {"resourceType": "User", "created": "2024-01-01T00:00:00Z", "version": 'W/"3694e05e9dff591"'},
        "numbers": [rng.choice(NUMBERS) for _ in range(rng.randint(0, 5))],
        "nested": {"l": [[], [{}], [[None, True, 0.0]], {"k": [word()]}]},
    }
    if rng.random() < 0.8:
        detail["active"] = rng.choice(ACTIVE)
    for _ in range(rng.randint(0, 3)):
        detail[word() + str(rng.randint(0, 9))] = rng.choice([word(), rng.choice(NUMBERS), None, True, [], {}])
    return detail


def user(rng: random.Random, i: int) -> pb.DirectoryUser:
    word = lambda: rng.choice(WORDS)  # noqa: E731
    u = pb.DirectoryUser(id=f"diruser_{i}{word()}", email=f"{word()}@example.com", preferred_username=word(),
                         given_name=word(), family_name=word(),
                         emails=[f"{word()}@x.io" for _ in range(rng.randint(0, 4))])
    for g in range(rng.randint(0, 3)):
        group = u.groups.add(id=f"dirgroup_{g}{word()}", display_name=word(), total_users=rng.randint(-1, 99))
        if rng.random() < 0.5:
            group.updated_at.seconds, group.updated_at.nanos = rng.choice(TIMES)
        if rng.random() < 0.5:
            group.group_detail.update({"displayName": word(), "members": [{"value": word()}]})
    if rng.random() < 0.9:
        u.updated_at.seconds, u.updated_at.nanos = rng.choice(TIMES)
    u.user_detail.update(scim_detail(rng, i))
    return u


def nested(levels: int, leaf: bytes, kinds: str = "s") -> bytes:
    """A Struct ``levels`` deep: each level a struct_value ("s") or a list_value ("l"), cycling through ``kinds``."""
    node = leaf  # a Value's bytes
    for depth in range(levels):
        if kinds[depth % len(kinds)] == "s":
            node = ld(5, ld(1, ld(1, b"n") + ld(2, node)))
        else:
            node = ld(6, ld(1, node))
    return ld(1, ld(1, b"root") + ld(2, node))


def group_nest(number: int, levels: int) -> bytes:
    return tag(number, 3) * levels + tag(number, 4) * levels


def wire_seeds() -> list[bytes]:
    """Values, as bytes: the tricky corners of the wire format."""
    str_value = lambda s: ld(3, s)  # noqa: E731
    return [
        b"", ld(3, "é".encode()), f64(2, -0.0), f64(2, math.nan), vi(4, 2), vi(1, 5), ld(5, b""), ld(6, b""),
        ld(5, ld(1, ld(1, b"a"))) + ld(5, ld(1, ld(1, b"b"))),  # struct_value twice: merged
        ld(6, ld(1, vi(4, 1))) + ld(6, ld(1, f64(2, 2.0))),  # list_value twice: merged
        ld(5, ld(1, ld(1, b"a"))) + str_value(b"x") + ld(5, ld(1, ld(1, b"b"))),  # another member between: reset
        str_value(b"\xff") + vi(4, 1),  # an invalid string, then replaced
        vi(1, 0) + f64(2, 1.0) + vi(4, 0),
        group_nest(9, 3) + vi(4, 1),
        tag(5, 0) + varint(1) + tag(6, 1) + bytes(8) + tag(3, 5) + bytes(4),  # members with other wire types
    ]


def struct_seeds() -> list[bytes]:
    out = []
    rng = random.Random(7)
    for i in range(6):
        s = struct_pb2.Struct()
        s.update(scim_detail(rng, i))
        out.append(s.SerializeToString(deterministic=True))
    for value in wire_seeds():
        entry = ld(1, b"k") + ld(2, value)
        out.append(ld(1, entry))
        out.append(ld(1, entry) + ld(1, ld(1, b"k") + ld(2, str_value_of("last"))))  # the key again: last wins
    out += [
        ld(1, ld(1, b"k") + ld(2, vi(4, 1)) + vi(3, 1)),  # a map entry with an unknown field
        ld(1, ld(1, b"k") + ld(2, vi(4, 1)) + ld(2, f64(2, 3.0))),  # the entry's value twice: merged
        ld(1, vi(1, 7) + ld(2, vi(4, 1))),  # the key as a varint
        ld(1, ld(1, b"k")),  # no value: null
        ld(1, ld(1, b"\xc3\xa9") + ld(2, b"")) + ld(1, ld(1, b"e") + ld(2, b"")),
        group_nest(3, 99), group_nest(3, 100), group_nest(3, 101),
        tag(7, 3) + vi(1, 1) + ld(2, b"x") + tag(8, 4),  # a group closed by another field's end tag
        tag(7, 4), tag(0, 0) + b"\x00", b"\x8a\x80\x80\x80\x10\x00",  # a stray end tag, field 0, a tag past 32 bits
    ]
    # protobuf's depth limit: a message 100 levels deep parses, 101 does not; a struct level is three messages (the
    # Struct, the map entry, the Value), a list level two (the ListValue, the Value)
    for levels in (32, 33, 34):
        for leaf in (b"", vi(4, 1), ld(5, b""), ld(5, ld(1, ld(1, b"k"))), ld(6, ld(1, b""))):
            out.append(nested(levels, leaf))
    for levels in (48, 49, 50):
        out.append(nested(levels, vi(4, 1), "l"))
    for levels in (38, 39, 40):
        out.append(nested(levels, b"", "sl"))
    return out


def str_value_of(text: str) -> bytes:
    return ld(3, text.encode())


def users_seeds() -> list[tuple[bytes, str, str]]:
    out = []
    rng = random.Random(11)
    for p in range(8):
        users = [user(rng, i) for i in range(rng.choice([0, 1, 2, 5, 12]))]
        page = pb.ListDirectoryUsersResponse(users=users, total_size=rng.randint(0, 2**32 - 1),
                                             next_page_token=rng.choice(["", "next", "é🙂"]),
                                             prev_page_token=rng.choice(["", "prev"]))
        out.append((page.SerializeToString(deterministic=True), rng.choice(["org_1", "org_é", 'o"\\\n']), f"dir_{p}"))
    for seconds, nanos in TIMES:
        u = pb.DirectoryUser(id="u")
        u.updated_at.seconds, u.updated_at.nanos = seconds, nanos
        out.append((pb.ListDirectoryUsersResponse(users=[u]).SerializeToString(deterministic=True), "org_1", "dir_1"))
    # wire-level corners of a user: fields twice, unknown fields, groups, members with other wire types
    first = pb.DirectoryUser(id="diruser_1", email="old@x.io", emails=["b@x.io"])
    first.user_detail.update({"active": True, "name": {"givenName": "Ada"}})
    first.updated_at.seconds = 1700000000
    second = pb.DirectoryUser(email="new@x.io", emails=["a@x.io"])
    second.user_detail.update({"active": False})
    second.updated_at.nanos = 5000
    corners = [
        first.SerializeToString(deterministic=True) + second.SerializeToString(deterministic=True),
        first.SerializeToString(deterministic=True) + vi(99, 7) + group_nest(40, 2) + tag(98, 5) + bytes(4)
        + tag(97, 1) + bytes(8),
        ld(1, b"\xff") + ld(1, b"u"),  # an invalid id, then replaced
        ld(6, vi(1, 1)) + ld(6, vi(2, 1000)),  # the timestamp in two parts
        ld(17, ld(1, b"g") + ld(2, b"G") + vi(3, 5) + ld(4, vi(1, 5)) + ld(5, ld(1, ld(1, b"k")))),
        ld(18, ld(1, ld(1, b"active") + ld(2, vi(4, 0)))) + ld(18, ld(1, ld(1, b"x") + ld(2, b""))),
        ld(18, ld(1, ld(1, b"active") + ld(2, vi(4, 0)) + vi(3, 1))),  # an "active" entry with an unknown field
        vi(2, 5) + ld(6, b"") + tag(16, 0) + b"\x01" + tag(18, 1) + bytes(8),
    ]
    for c in corners:
        out.append((ld(1, c) + ld(3, b"t") + ld(4, b"p") + vi(2, 1), "org_1", "dir_1"))
    out.append((ld(3, b"\xff") + ld(3, b"ok"), "o", "d"))
    out.append((ld(4, b"\xc0\x80"), "o", "d"))
    # the depth limit as the page sees it: the user's detail is at level 2, a group's detail at level 3
    for levels in (32, 33, 34):
        detail = nested(levels, b"")
        out.append((ld(1, ld(18, detail)), "o", "d"))
        out.append((ld(1, ld(17, ld(5, detail))), "o", "d"))
    out.append((ld(1, group_nest(20, 99)), "o", "d"))
    out.append((ld(1, group_nest(20, 100)), "o", "d"))
    return out


def seeds() -> list[Case]:
    cases = [Case("users", data, org, directory) for data, org, directory in users_seeds()]
    cases += [Case("struct", data) for data in struct_seeds()]
    for kind in ("users", "struct"):
        for path in sorted((CORPUS / kind).glob("*")) if (CORPUS / kind).is_dir() else []:
            cases.append(Case(kind, path.read_bytes()))
    return cases


# --- mutations ---------------------------------------------------------------------------------------------------

INTERESTING_BYTES = [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07, 0x08, 0x0A, 0x12, 0x7F, 0x80, 0x81, 0xC0, 0xED,
                     0xF4, 0xF5, 0xFF]
INTERESTING_INTS = [0, 1, 2, 127, 128, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**31,
                    -62135596801, 253402300800, 1 << 35]
BAD_UTF8 = [b"\xff", b"\x80", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xed\xbf\xbf",
            b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xe6\x97", b"\xf0\x9f\x99"]
GOOD_TEXT = [w.encode() for w in WORDS] + [b"active", b"\xf4\x8f\xbf\xbf", b"\xed\x9f\xbf", b"\xee\x80\x80"]
FIELD_NUMBERS = [1, 2, 3, 4, 5, 6, 7, 15, 16, 17, 18, 19, 0x1FFFFFFF]
SPECIAL_DOUBLES = [0.0, -0.0, 1.0, math.nan, math.inf, -math.inf, 5e-324, 1e308, 2**53 + 1.0, 0.1]


def _structured(rng: random.Random, data: bytes, donor: bytes) -> bytes | None:
    """A mutation of one field list somewhere in the message tree, the lengths above it fixed up."""
    fields = parse_fields(data)
    if fields is None:
        return None
    path = []
    while rng.random() < 0.75:
        inner = [(i, sub) for i, (_, wire, value) in enumerate(fields)
                 if wire == 2 and value and (sub := parse_fields(value)) is not None]
        if not inner:
            break
        i, sub = rng.choice(inner)
        path.append((fields, i))
        fields = sub
    _mutate_fields(rng, fields, donor)
    payload = serialize(fields)
    while path:
        parent, i = path.pop()
        number, wire, _ = parent[i]
        parent[i] = (number, wire, payload)
        payload = serialize(parent)
    return payload


def _mutate_fields(rng: random.Random, fields: list, donor: bytes) -> None:
    n = len(fields)
    op = rng.randrange(11)
    if n and op == 0:
        del fields[rng.randrange(n)]
    elif n and op == 1:  # the same field again, somewhere: a scalar's last wins, a message's parts merge
        fields.insert(rng.randrange(n + 1), fields[rng.randrange(n)])
    elif n > 1 and op == 2:
        i, j = rng.randrange(n), rng.randrange(n)
        fields[i], fields[j] = fields[j], fields[i]
    elif n and op == 3:  # renumbered: another known field, or an unknown one
        i = rng.randrange(n)
        fields[i] = (rng.choice(FIELD_NUMBERS), *fields[i][1:])
    elif n and op == 4:  # the same bytes under another wire type
        i = rng.randrange(n)
        number, wire, value = fields[i]
        raw = serialize([fields[i]])[len(tag(number, wire)):] if wire != -1 else value
        fields[i] = (-1, -1, tag(number, rng.choice([0, 1, 2, 3, 4, 5, 6, 7])) + raw)
    elif n and op == 5:  # a new value of the field's own kind
        i = rng.randrange(n)
        number, wire, value = fields[i]
        if wire == 0:
            value = rng.choice(INTERESTING_INTS)
        elif wire == 1:
            value = pack.pack("<d", rng.choice(SPECIAL_DOUBLES))
        elif wire == 2:
            value = rng.choice([rng.choice(BAD_UTF8), rng.choice(GOOD_TEXT),
                                rng.choice(GOOD_TEXT) + rng.choice(BAD_UTF8) + rng.choice(GOOD_TEXT), b"", donor])
        fields[i] = (number, wire, value)
    elif n and op == 6:  # a corrupt length: off by one or two, huge, or padded into a longer varint
        i = rng.randrange(n)
        number, wire, value = fields[i]
        if wire == 2:
            length = rng.choice([len(value) + 1, len(value) - 1, len(value) + 2, 2**31 - 1, 2**31, 2**32 + 1,
                                 2**63, 2**64 - 1, len(value)])
            encoded = varint(max(length, 0))
            if rng.random() < 0.3:  # the same length, padded: a varint may take more bytes than it needs
                encoded = bytes(b | 0x80 for b in encoded) + b"\x00"
            fields[i] = (-1, -1, tag(number, 2) + encoded + value)
    elif op == 7:  # a group: well formed, empty, unclosed, closed by another number, or a lone end tag
        number = rng.choice(FIELD_NUMBERS)
        body = rng.choice([b"", vi(1, 1), ld(2, b"x"), tag(number, 3) + tag(number, 4), tag(number + 1, 4)])
        ending = rng.choice([tag(number, 4), tag(number, 4), b"", tag(number + 1, 4)])
        start = rng.choice([tag(number, 3), tag(number, 3), b""])
        fields.insert(rng.randrange(n + 1), (-1, -1, start + body + ending))
    elif op == 8:  # a field of the donor's, or a whole donor message as a field
        donor_fields = parse_fields(donor) or []
        if donor_fields and rng.random() < 0.7:
            fields.insert(rng.randrange(n + 1), rng.choice(donor_fields))
        else:
            fields.insert(rng.randrange(n + 1), (rng.choice(FIELD_NUMBERS), 2, donor))
    elif op == 9:  # a scalar field of any kind
        number = rng.choice(FIELD_NUMBERS)
        fields.insert(rng.randrange(n + 1), rng.choice([
            (number, 0, rng.choice(INTERESTING_INTS)), (number, 1, pack.pack("<d", rng.choice(SPECIAL_DOUBLES))),
            (number, 5, bytes(4)), (number, 2, rng.choice(GOOD_TEXT + BAD_UTF8))]))
    elif n and op == 10 and len(serialize(fields)) < 4096:  # the whole list repeated: a message sent twice
        fields.extend(list(fields))


def _bytes(rng: random.Random, data: bytes, donor: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(8)
    if b and op == 0:
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    elif b and op == 1:
        b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES)
    elif op == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.choice(INTERESTING_BYTES) for _ in range(rng.randint(1, 4)))
    elif b and op == 3:
        i = rng.randrange(len(b))
        del b[i:i + rng.randint(1, 8)]
    elif b and op == 4:
        del b[rng.randrange(len(b)):]
    elif op == 5:  # splice: the head of one input, the tail of another
        b = b[:rng.randint(0, len(b))] + donor[rng.randint(0, len(donor)):]
    elif b and op == 6:  # a stretch repeated
        i = rng.randrange(len(b))
        j = rng.randint(i, min(len(b), i + 64))
        b[j:j] = b[i:j]
    elif b and op == 7:  # a varint byte made to continue: lengths and tags shift
        i = rng.randrange(len(b))
        b[i:i + 1] = bytes([b[i] | 0x80, 0x00])
    return bytes(b)


def mutate(rng: random.Random, case: Case, donor: Case) -> Case:
    data = case.data
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        if rng.random() < 0.6:
            data = _structured(rng, data, donor.data) or _bytes(rng, data, donor.data)
        else:
            data = _bytes(rng, data, donor.data)
    if rng.random() < 0.02:
        return replace(case, data=data[:MAX_INPUT], organization_id=rng.choice(WORDS), directory_id=rng.choice(WORDS))
    return replace(case, data=data[:MAX_INPUT])


# --- coverage, when the build has it -----------------------------------------------------------------------------

class Coverage:
    """The edge counts ``fuzz_coverage.c`` keeps, when the extension was built with it (``make fuzz``)."""

    def __init__(self, path: str):
        try:
            library = ctypes.CDLL(path)
            self._novel, self._features = library.scim_fuzz_novel, library.scim_fuzz_features
        except (OSError, AttributeError):
            self._novel = self._features = None

    @classmethod
    def none(cls) -> "Coverage":
        coverage = cls.__new__(cls)
        coverage._novel = coverage._features = None
        return coverage

    def novel(self) -> bool:
        """Whether the inputs run since the last call reached an edge, or an edge's count class, not seen before."""
        return bool(self._novel and self._novel())

    def features(self) -> int:
        return self._features() if self._features else 0


# --- the loop ----------------------------------------------------------------------------------------------------

def _smaller(data: bytes):
    """Smaller variants of a message, lengths kept right: a field removed, at any depth, or a payload shortened."""
    fields = parse_fields(data)
    if fields is None:
        return
    for i in range(len(fields)):
        yield serialize(fields[:i] + fields[i + 1:])
    for i, (number, wire, value) in enumerate(fields):
        if wire == 2 and value:
            shorter = [value[:len(value) // 2], value[len(value) // 2:]] + [value[:j] + value[j + 1:]
                                                                           for j in range(min(len(value), 16))]
            for inner in [*_smaller(value), *shorter]:
                yield serialize(fields[:i] + [(number, wire, inner)] + fields[i + 1:])


def minimize(extension, buffers: Buffers, case: Case) -> Case:
    """A smaller input that still disagrees: fields removed along the message's structure, then chunks of bytes
    (delta debugging)."""
    fails = lambda c: disagreement(extension, buffers, c) is not None  # noqa: E731
    if fails(replace(case, organization_id="o", directory_id="d")):
        case = replace(case, organization_id="o", directory_id="d")
    data = case.data
    shrunk = True
    while shrunk:
        shrunk = False
        for candidate in _smaller(data):
            if len(candidate) < len(data) and fails(replace(case, data=candidate)):
                data, shrunk = candidate, True
                break
    chunk = max(1, len(data) // 2)
    while chunk >= 1:
        i, shrunk = 0, False
        while i < len(data):
            candidate = data[:i] + data[i + chunk:]
            if fails(replace(case, data=candidate)):
                data, shrunk = candidate, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return replace(case, data=data)


@dataclass
class Report:
    runs: int = 0
    corpus: int = 0
    coverage: int = 0  # edges and count classes reached, when the build counts them
    findings: list = None


class LastInput:
    """The input being run, kept in a file that outlives a crash (AddressSanitizer aborts the process): a header of
    HEADER bytes (JSON: kind, organization, directory, length), then the input."""

    HEADER = 4096

    def __init__(self, directory: Path | None):
        self.map = None
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / "last-input", "w+b") as f:
                f.truncate(self.HEADER + MAX_INPUT)
                self.map = mmap.mmap(f.fileno(), self.HEADER + MAX_INPUT)

    def record(self, case: Case) -> None:
        if self.map is not None:
            header = json.dumps([case.kind, case.organization_id, case.directory_id, len(case.data)]).encode()
            self.map[:self.HEADER] = header[:self.HEADER].ljust(self.HEADER)
            self.map[self.HEADER:self.HEADER + len(case.data)] = case.data

    @classmethod
    def read(cls, data: bytes) -> Case:
        kind, organization_id, directory_id, length = json.loads(data[:cls.HEADER])
        return Case(kind, data[cls.HEADER:cls.HEADER + length], organization_id, directory_id)


def run(*, seed: int = 0, seconds: float | None = None, iterations: int | None = None, extension=None,
        extension_path: str | None = None, artifacts: Path | None = None, keep_going: int = 1,
        log=None) -> Report:
    """Fuzz until ``seconds`` pass or ``iterations`` inputs ran (whichever comes first), or ``keep_going``
    disagreements were found. Deterministic for a seed and an iteration bound when the build has no coverage map."""
    if extension is None:
        extension, extension_path = load_extension(extension_path)
    buffers, last = Buffers(), LastInput(artifacts)
    coverage = Coverage(extension_path) if extension_path else Coverage.none()
    rng = random.Random(seed)
    corpus = seeds()
    report = Report(findings=[])
    for case in corpus:  # the seeds themselves, first
        if len(report.findings) >= keep_going:
            return report
        last.record(case)
        if (why := disagreement(extension, buffers, case)) is not None:
            report.findings.append(_found(extension, buffers, case, why, artifacts, log))
        coverage.novel()
        report.runs += 1
    start = time.monotonic()
    next_log = start + 10
    while len(report.findings) < keep_going:
        if iterations is not None and report.runs >= iterations:
            break
        now = time.monotonic()
        if seconds is not None and now - start >= seconds:
            break
        if log and now >= next_log:
            log(f"{report.runs} runs, {report.runs / (now - start):.0f}/s, corpus {len(corpus)}, "
                f"coverage {coverage.features()}")
            next_log = now + 10
        # newer corpus entries (the ones that reached new code) are picked more often
        parent = corpus[min(len(corpus) - 1, int(len(corpus) * (1 - rng.random() ** 2)))]
        donor = rng.choice([c for c in (rng.choice(corpus), rng.choice(corpus)) if c.kind == parent.kind] or [parent])
        case = mutate(rng, parent, donor)
        last.record(case)
        why = disagreement(extension, buffers, case)
        report.runs += 1
        if why is not None:
            report.findings.append(_found(extension, buffers, case, why, artifacts, log))
        if coverage.novel():
            corpus.append(case)
    report.corpus, report.coverage = len(corpus), coverage.features()
    return report


def _found(extension, buffers, case: Case, why: str, artifacts: Path | None, log) -> tuple[Case, str]:
    small = minimize(extension, buffers, case)
    why = disagreement(extension, buffers, small) or why
    if log:
        log(f"DISAGREEMENT on {small.kind} {small.data!r} (organization {small.organization_id!r}, directory "
            f"{small.directory_id!r})\n{why}")
    if artifacts is not None:
        (artifacts / "findings").mkdir(parents=True, exist_ok=True)
        path = artifacts / "findings" / f"{small.kind}-{hashlib.sha1(small.data).hexdigest()[:16]}"
        path.write_bytes(small.data)
        if log:
            log(f"saved to {path}")
    return small, why


def load_extension(path: str | None):
    """The extension at ``path`` (a build of its own, such as the sanitized one), or the installed one."""
    if path is None:
        from scim_pipeline.scalekit import _records

        return _records, _records.__file__
    loader = importlib.machinery.ExtensionFileLoader("_records", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_records", path, loader=loader))
    loader.exec_module(module)
    return module, path


def replay(path: Path, kind: str, extension_path: str | None) -> int:
    """Run one saved input and print how the two sides took it."""
    data = path.read_bytes()
    case = Case(kind, data)
    if path.name == "last-input":
        case = LastInput.read(data)
    extension, _ = load_extension(extension_path)
    why = disagreement(extension, Buffers(), case)
    shown = repr(case.data) if len(case.data) <= 200 else f"{case.data[:200]!r}... ({len(case.data)} bytes)"
    print(f"{case.kind} {shown}: " + ("the extension and the reference agree" if why is None else why))
    return 0 if why is None else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)))
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--seed", type=int, default=None, help="default: a new one, printed")
    parser.add_argument("--extension", help="path of a build of _records to fuzz (default: the installed one)")
    parser.add_argument("--artifacts", type=Path, help="where the input being run and the findings are kept")
    parser.add_argument("--keep-going", type=int, default=1, help="stop after this many disagreements")
    parser.add_argument("--replay", type=Path, help="run one input: a last-input file, or raw bytes with --kind")
    parser.add_argument("--kind", choices=["users", "struct"], default="users", help="what --replay's raw bytes are")
    args = parser.parse_args(argv)
    if args.replay:
        return replay(args.replay, args.kind, args.extension)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    extension, path = load_extension(args.extension)
    log(f"fuzzing {path} (seed {seed}, {args.seconds:g} s"
        + (f", {args.iterations} runs" if args.iterations else "") + ")")
    report = run(seed=seed, seconds=args.seconds, iterations=args.iterations, extension=extension,
                 extension_path=path, artifacts=args.artifacts, keep_going=args.keep_going, log=log)
    log(f"{report.runs} runs, corpus {report.corpus}, coverage {report.coverage}, {len(report.findings)} disagreements")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
