"""Scalekit's id shapes, and the one check every id from Scalekit or a webhook passes before it is used.

An organization's id names a Dagster partition, run keys and a spool folder under ``SCIM_PIPELINE_HOME``; ids of
directories, users and groups end up in SQL and in what the application receives. Refusing every other shape here
is simpler and safer than escaping each id wherever it is used.

The shapes are Scalekit's own (its API's field rules, in the SDK's protobufs): a kind's prefix, then letters and
digits, at most 32 characters for organizations and directories, 36 for users and groups. Scalekit's ids are a
prefix and a number (``org_59615193906282635``); letters are admitted since the API allows them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class InvalidId(ValueError):
    """A value that is not an id of the kind asked for."""


def shown(value: Any, limit: int = 60) -> str:
    """A value as it may appear in a message or a log line: its repr (so a newline shows as ``\\n``), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class IdKind:
    name: str
    prefix: str
    max_length: int
    _pattern: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # ASCII classes and fullmatch: no Unicode digits, and no trailing newline slipping past a "$".
        body = self.max_length - len(self.prefix)
        object.__setattr__(self, "_pattern", re.compile(rf"{re.escape(self.prefix)}[A-Za-z0-9]{{1,{body}}}"))

    def matches(self, value: Any) -> bool:
        return isinstance(value, str) and self._pattern.fullmatch(value) is not None

    def check(self, value: Any) -> str:
        """``value`` itself if it is an id of this kind; else InvalidId saying why, safe to log."""
        if self.matches(value):
            return value
        raise InvalidId(f"{shown(value)} is not a Scalekit {self.name} id ({self.prefix} then up to "
                        f"{self.max_length - len(self.prefix)} letters or digits)")


ORGANIZATION = IdKind("organization", "org_", 32)
DIRECTORY = IdKind("directory", "dir_", 32)
USER = IdKind("user", "diruser_", 36)
GROUP = IdKind("group", "dirgroup_", 36)
