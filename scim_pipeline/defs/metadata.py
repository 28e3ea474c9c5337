"""Metadata that makes the Dagster UI worth opening: row counts and small markdown previews."""

from __future__ import annotations

import dagster as dg
import duckdb


def preview(con: duckdb.DuckDBPyConnection, query: str, params: dict | None = None, limit: int = 10) -> dg.MetadataValue:
    """The first rows of a query as a markdown table."""
    result = con.execute(f"SELECT * FROM ({query}) LIMIT {limit}", params or {})
    columns = [d[0] for d in result.description]
    rows = result.fetchall()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v).replace("|", "\\|")[:60] for v in row) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def count(con: duckdb.DuckDBPyConnection, query: str, params: dict | None = None) -> int:
    return int(con.execute(f"SELECT count(*) FROM ({query})", params or {}).fetchone()[0])
