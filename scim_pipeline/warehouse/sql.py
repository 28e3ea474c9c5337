"""Small helpers the warehouse's SQL modules share: scoping a statement to one organization, several, or all."""

from __future__ import annotations

from typing import Any, Sequence

import duckdb

Organizations = str | Sequence[str] | None  # one organization, several, or None for every organization


def org_scope(org_id: Organizations, column: str = "organization_id") -> str:
    """A filter on the organization(s) in $org, or none when ``org_id`` is None (every organization)."""
    if org_id is None:
        return "true"
    return f"{column} = $org" if isinstance(org_id, str) else f"list_contains($org, {column})"


def org_params(org_id: Organizations, **extra: Any) -> dict[str, Any]:
    if org_id is None:
        return extra
    return {"org": org_id if isinstance(org_id, str) else list(org_id)} | extra


def first_int(result: duckdb.DuckDBPyConnection) -> int:
    rows = result.fetchall()  # to the end: DuckDB refuses new work while a result is unfinished
    return int(rows[0][0]) if rows else 0


