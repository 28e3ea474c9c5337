"""One organization is one partition, added by the discovery sensor (or a sync) as organizations appear."""

import dagster as dg

organizations_partitions = dg.DynamicPartitionsDefinition(name="organizations")

WAREHOUSE_POOL = "warehouse"  # DuckDB admits one writing process: every asset that writes it takes this pool
