"""Connections to the installation's PostgreSQL database (``SCIM_PIPELINE_POSTGRES_URL``), and how to speak of it
without its password."""

from __future__ import annotations

import re

CONNECT_TIMEOUT_S = 5


def _password(url: str) -> str | None:
    """The password of ``scheme://user:password@host...`` (up to the last ``@``: a password may hold one)."""
    rest = url.partition("://")[2]
    userinfo = rest[:rest.rfind("@")] if "@" in rest else ""
    return userinfo.partition(":")[2] or None


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``: fit for a message or a log."""
    password = _password(url)
    if not password:
        return url
    scheme, _, rest = url.partition("://")
    at = rest.rfind("@")
    return f"{scheme}://{rest[:at - len(password)]}***{rest[at:]}"


def reason(exc: BaseException, url: str | None = None) -> str:
    """One line saying why the database refused, from a driver error (which can span lines), never the password."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else exc.__class__.__name__
    # 'connection to server at "h", port 5432 failed: FATAL:  password authentication failed ...': the why
    text = re.sub(r"^(connection failed:\s*)?connection to server .*? failed:\s*", "", text)
    text = re.sub(r"^(FATAL|ERROR):\s+", "", text)
    password = _password(url) if url else None
    if password:
        text = text.replace(password, "***")
    return text


def connect(url: str, timeout_s: float = CONNECT_TIMEOUT_S, **options):
    """A psycopg2 connection (autocommit off), failing within ``timeout_s`` when the server does not answer."""
    import psycopg2

    return psycopg2.connect(url, connect_timeout=max(1, int(timeout_s)), **options)
