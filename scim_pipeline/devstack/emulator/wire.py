"""A direct protobuf wire encoder for ``google.protobuf.Struct`` from plain JSON-like Python values.

Building a Struct through the protobuf API (``Struct.update``) costs ~100 us per SCIM user resource here, most of the
cold cost of serving a large directory; encoding the same bytes directly is several times cheaper. The output
parses back to the same Struct (checked by the tests), so the SDK cannot tell the difference.
"""

from __future__ import annotations

import struct as _struct
from functools import lru_cache

# Field tags (field number << 3 | wire type) of struct.proto
_ENTRY = b"\x0a"        # Struct.fields (map entry), length-delimited
_KEY = b"\x0a"          # FieldsEntry.key
_VALUE = b"\x12"        # FieldsEntry.value
_NULL = b"\x08\x00"     # Value.null_value = NULL_VALUE
_NUMBER = b"\x11"       # Value.number_value, 64-bit
_STRING = b"\x1a"       # Value.string_value
_TRUE = b"\x20\x01"     # Value.bool_value
_FALSE = b"\x20\x00"
_STRUCT = b"\x2a"       # Value.struct_value
_LIST = b"\x32"         # Value.list_value
_LIST_ITEM = b"\x0a"    # ListValue.values


_BYTE = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_BYTE[n] if n < 0x80 else varint(n)) + payload


@lru_cache(maxsize=4096)
def _key(key: str) -> bytes:
    return length_delimited(_KEY, key.encode()) + _VALUE


def _string(v: str) -> bytes:
    b = v.encode()
    n = len(b)
    return _STRING + (_BYTE[n] if n < 0x80 else varint(n)) + b


def _bool(v: bool) -> bytes:
    return _TRUE if v else _FALSE


def _number(v) -> bytes:
    return _NUMBER + _struct.pack("<d", float(v))


def _null(v) -> bytes:
    return _NULL


def _struct_value(v: dict) -> bytes:
    return length_delimited(_STRUCT, struct_bytes(v))


def _list_value(v) -> bytes:
    return length_delimited(_LIST, b"".join([length_delimited(_LIST_ITEM, _ENCODERS[type(x)](x)) for x in v]))


# Dispatch on the exact type: one dict lookup instead of a chain of isinstance checks (this is a hot loop).
_ENCODERS = {str: _string, bool: _bool, int: _number, float: _number, type(None): _null, dict: _struct_value,
             list: _list_value, tuple: _list_value}


def value_bytes(v) -> bytes:
    """A ``google.protobuf.Value`` message."""
    try:
        return _ENCODERS[type(v)](v)
    except KeyError:
        raise TypeError(f"cannot encode {type(v).__name__} in a Struct") from None


def struct_bytes(d: dict) -> bytes:
    """A ``google.protobuf.Struct`` message with the entries of ``d``."""
    parts = []
    append = parts.append
    for k, v in d.items():
        vb = _ENCODERS[type(v)](v)
        n = len(vb)
        entry = _key(k) + (_BYTE[n] if n < 0x80 else varint(n)) + vb
        n = len(entry)
        append(_ENTRY + (_BYTE[n] if n < 0x80 else varint(n)) + entry)
    return b"".join(parts)


# --- hand-rolled pieces for hot, fixed shapes (see events.scim_user_bytes) --------------------------------------------

def string_entry(key_prefix: bytes, value: str) -> bytes:
    """A Struct entry ``key: "value"``; ``key_prefix`` is ``entry_key(key)``."""
    return message_entry(key_prefix, _STRING, value.encode())


@lru_cache(maxsize=65536)
def cached_string_entry(key_prefix: bytes, value: str) -> bytes:
    """``string_entry`` for values drawn from small pools (titles, names, locales...): encoded once."""
    return string_entry(key_prefix, value)


def message_entry(key_prefix: bytes, tag: bytes, payload: bytes) -> bytes:
    """A Struct entry whose value is a length-delimited Value field already encoded: a string (``string_entry``), a
    struct (``tag`` STRUCT_VALUE) or a list (LIST_VALUE)."""
    n = len(payload)
    vb = tag + (_BYTE[n] if n < 0x80 else varint(n)) + payload
    n = len(vb)
    entry = key_prefix + (_BYTE[n] if n < 0x80 else varint(n)) + vb
    n = len(entry)
    return _ENTRY + (_BYTE[n] if n < 0x80 else varint(n)) + entry


def list_item(value: bytes) -> bytes:
    """One ``ListValue.values`` element from an encoded Value."""
    n = len(value)
    return _LIST_ITEM + (_BYTE[n] if n < 0x80 else varint(n)) + value


def entry_key(key: str) -> bytes:
    return _key(key)


STRUCT_VALUE = _STRUCT
LIST_VALUE = _LIST
