"""Plain helpers that several packages share: the clock, the retry policy, serving an ASGI app. No Dagster."""
