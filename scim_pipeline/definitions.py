"""The code location: one Definitions with every asset, check, sensor, schedule and resource."""

import dagster as dg

defs = dg.Definitions(assets=[])
