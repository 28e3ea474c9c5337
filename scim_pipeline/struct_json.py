"""A protobuf ``Struct`` (a user's or group's SCIM detail) as compact JSON text, keys sorted.

Every listed user carries one, about 40 values deep and wide, and converting it was most of a full sync's CPU time:
walking it through the Python protobuf API builds a wrapper object for every value (about 80 us a user, and
``json.dumps`` of the result another 30). The C extension ``_struct_json`` reads the Struct's wire bytes instead
(about 10 us, serializing them included). ``struct_json_py`` is the same conversion in Python: the fallback where the
extension was not built, and the reference the tests hold the extension to.

Keys are sorted so that the text is canonical: a server may serialize a map in any order, and the warehouse compares
the text to count changed users.
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import struct_pb2

try:
    from scim_pipeline._struct_json import struct_json as _struct_json_c
except ImportError:  # installed without a C compiler: the same text, several times slower
    _struct_json_c = None

COMPILED = _struct_json_c is not None


def struct_json(struct: struct_pb2.Struct) -> str:
    if _struct_json_c is not None:
        return _struct_json_c(struct.SerializeToString())
    return struct_json_py(struct)


def struct_json_py(struct: struct_pb2.Struct) -> str:
    return json.dumps(plain(struct), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def plain(value: Any) -> Any:
    """A protobuf Struct, ListValue or Value as plain Python."""
    if isinstance(value, struct_pb2.Value):
        return _value(value)
    if isinstance(value, struct_pb2.Struct):
        return _struct(value)
    if isinstance(value, struct_pb2.ListValue):
        return _list(value)
    return value


# Reading the map and the oneof directly costs about half of the Struct's dict-like helpers (items(), __getitem__),
# which wrap each value once more.
def _struct(struct: struct_pb2.Struct) -> dict:
    return {k: _value(v) for k, v in struct.fields.items()}


def _list(values: struct_pb2.ListValue) -> list:
    return [_value(v) for v in values.values]


def _value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "struct_value":
        return _struct(value.struct_value)
    if kind == "list_value":
        return _list(value.list_value)
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        number = value.number_value
        return number if math.isfinite(number) else None  # JSON has no NaN or infinity: the warehouse would refuse it
    return None  # null_value, or no kind set
