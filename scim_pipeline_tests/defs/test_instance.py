"""The instance template that a new installation's DAGSTER_HOME is seeded with, loaded by Dagster itself."""

import os
from pathlib import Path

import dagster as dg
import psycopg2

from scim_pipeline.defs.instance import ensure_dagster_home, instance_yaml


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


def test_with_a_postgres_url_the_seeded_instance_keeps_runs_in_that_database(home, monkeypatch, postgres_url):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("SCIM_PIPELINE_POSTGRES_URL", postgres_url)
    ensure_dagster_home()
    assert postgres_url.split("@")[0].split(":")[-1] not in (home / "dagster" / "dagster.yaml").read_text()

    @dg.op
    def hello():
        return 1

    @dg.job
    def one_op():
        hello()

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        run_id = one_op.execute_in_process(instance=instance).run_id
    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchall() == [("SUCCESS",)]


def test_on_postgres_a_run_of_many_partitions_writes_its_materializations_in_batches(home, monkeypatch,
                                                                                    postgres_url):
    from scim_pipeline.defs.instance import EVENT_BATCH_VAR

    monkeypatch.setenv(EVENT_BATCH_VAR, "unset below, restored after")
    monkeypatch.delenv(EVENT_BATCH_VAR)
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.setenv("SCIM_PIPELINE_POSTGRES_URL", postgres_url)
    ensure_dagster_home()
    assert int(os.environ[EVENT_BATCH_VAR]) > 1
    orgs = dg.StaticPartitionsDefinition([f"org_{i}" for i in range(300)])

    @dg.multi_asset(specs=[dg.AssetSpec("users"), dg.AssetSpec("groups")], partitions_def=orgs,
                    backfill_policy=dg.BackfillPolicy.single_run())
    def snapshot(context):
        yield dg.MaterializeResult(asset_key="users")
        yield dg.MaterializeResult(asset_key="groups")

    with dg.DagsterInstance.get() as instance:
        assert dg.materialize([snapshot], instance=instance, tags={
            "dagster/asset_partition_range_start": "org_0", "dagster/asset_partition_range_end": "org_299"}).success
        # every partition's materialization is recorded, batched or not
        for key in ("users", "groups"):
            assert instance.get_materialized_partitions(dg.AssetKey(key)) == set(orgs.get_partition_keys())


def test_a_seeded_dagster_yaml_follows_the_setting_and_an_operators_own_is_kept(home, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    config = home / "dagster" / "dagster.yaml"
    ensure_dagster_home()
    assert config.read_text() == instance_yaml(postgres=False)
    monkeypatch.setenv("SCIM_PIPELINE_POSTGRES_URL", "postgresql://scim:pw@db:5432/scim")
    ensure_dagster_home()
    assert config.read_text() == instance_yaml(postgres=True)
    config.write_text(instance_yaml(postgres=True) + "# the operator's own\n")
    monkeypatch.delenv("SCIM_PIPELINE_POSTGRES_URL")
    ensure_dagster_home()
    assert config.read_text().endswith("# the operator's own\n")


def test_the_deploy_folders_dagster_yaml_is_the_one_an_installation_seeds_on_postgres():
    assert (Path(__file__).parents[2] / "deploy" / "dagster.yaml").read_text() == instance_yaml(postgres=True)


def test_an_operators_own_dagster_yaml_without_postgres_storage_is_named_when_the_setting_is_set(home, monkeypatch,
                                                                                                caplog):
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    (home / "dagster").mkdir()
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("SCIM_PIPELINE_POSTGRES_URL", "postgresql://scim:s3cret@db:5432/scim")
    ensure_dagster_home()
    assert (home / "dagster" / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n"  # kept
    assert "keeps Dagster's storage elsewhere" in caplog.text and "s3cret" not in caplog.text
