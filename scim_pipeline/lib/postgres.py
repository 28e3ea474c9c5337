"""Connections to the installation's PostgreSQL database (``SCIM_PIPELINE_POSTGRES_URL``), and how to speak of it
without its password."""

from __future__ import annotations

import re

CONNECT_TIMEOUT_S = 5


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``: fit for a message or a log."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^:/@]*):[^@]*@", r"\1:***@", url, flags=re.IGNORECASE)


def reason(exc: BaseException, url: str | None = None) -> str:
    """One line saying why the database refused, from a driver error (which can span lines), never the password."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else exc.__class__.__name__
    # 'connection to server at "h", port 5432 failed: FATAL:  password authentication failed ...': the why
    text = re.sub(r"^(connection failed:\s*)?connection to server .*? failed:\s*", "", text)
    text = re.sub(r"^(FATAL|ERROR):\s+", "", text)
    if url:
        password = re.match(r"^[a-z][a-z0-9+.-]*://[^:/@]*:([^@]*)@", url, flags=re.IGNORECASE)
        if password and password.group(1):
            text = text.replace(password.group(1), "***")
    return text


def connect(url: str, timeout_s: float = CONNECT_TIMEOUT_S, **options):
    """A psycopg2 connection (autocommit off), failing within ``timeout_s`` when the server does not answer."""
    import psycopg2

    return psycopg2.connect(url, connect_timeout=max(1, int(timeout_s)), **options)
