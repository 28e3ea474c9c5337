"""The one clock of the package: the warehouse stores naive UTC timestamps (DuckDB ``TIMESTAMP``), so every
"now" is a naive datetime in UTC; text timestamps (the webhook inbox) are ISO-8601 with their ``+00:00`` offset."""

from __future__ import annotations

from datetime import datetime, timezone


def utcnow() -> datetime:
    """Now, as a naive UTC datetime (what the warehouse's ``TIMESTAMP`` columns hold)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def utc_iso(when: datetime | None = None) -> str:
    """``when`` (default now; a naive value is taken as UTC) as ISO-8601 text with milliseconds and ``+00:00``,
    which sorts as text."""
    when = utcnow() if when is None else when
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds")
