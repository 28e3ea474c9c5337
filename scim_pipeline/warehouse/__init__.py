"""The DuckDB warehouse: its schema and the SQL that fills it. Plain functions over a DuckDB connection."""
