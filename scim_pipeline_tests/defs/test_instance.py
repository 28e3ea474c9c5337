"""The instance template that a new installation's DAGSTER_HOME is seeded with, loaded by Dagster itself."""

import dagster as dg

from scim_pipeline.defs.instance import ensure_dagster_home


def test_the_template_turns_on_dagsters_run_monitoring_and_the_daemon_runs_it(home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    ensure_dagster_home()
    with dg.DagsterInstance.get() as instance:
        assert instance.run_monitoring_enabled
        assert 0 < instance.run_monitoring_start_timeout_seconds <= 600
        assert 0 < instance.run_monitoring_cancel_timeout_seconds <= 600
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        assert "MONITORING" in instance.get_required_daemon_types()
        # The pool the warehouse writers share keeps one slot.
        assert instance.event_log_storage.get_pool_config().default_pool_limit == 1
