"""The installation on PostgreSQL (SCIM_PIPELINE_POSTGRES_URL), every part real: Dagster's runs, event logs and
sensor state, and the webhook inbox, in a database of the session's PostgreSQL server; the emulator sends signed
webhooks to the receiver, the daemon's sensor reads them from the database and runs deliver to the application.
Then everything of the installation is restarted, the database server too."""

import os
import signal
import subprocess

import dagster as dg
import psycopg2
from dagster._core.scheduler.instigation import InstigatorType

from scim_pipeline.commands import run_sync
from scim_pipeline.config import settings
from scim_pipeline_tests.pipeline import test_webhooks_e2e

stack = test_webhooks_e2e.stack  # the fixture: a Stack in the test's home, stopped after it
wait_for = test_webhooks_e2e.wait_for

SENSOR = "webhook_events_sensor"


def _runs_in_database(url: str) -> set[str]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_id FROM runs")
        return {row[0] for row in cur.fetchall()}


def _sensor_cursor(instance: dg.DagsterInstance) -> int:
    states = [s for s in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR) if s.name == SENSOR]
    return int(states[0].instigator_data.cursor or 0) if states and states[0].instigator_data else 0


def _leaver_reaches_the_application(stack) -> None:
    org = stack.truth()["organizations"][0]
    shown = {u["user_id"]: u["active"] for u in stack.app_state()["users"]}
    leaver = next(u for u in org["users"] if u["active"] and shown.get(u["id"]))
    stack.mutate([{"op": "deactivate_user", "user_id": leaver["id"]}])
    wait_for(lambda: any(u["user_id"] == leaver["id"] and not u["active"] for u in stack.app_state()["users"]), 120)


def _stop_daemon(stack) -> None:
    os.killpg(stack.dagster.pid, signal.SIGTERM)
    try:
        stack.dagster.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(stack.dagster.pid, signal.SIGKILL)
        stack.dagster.wait()


def test_runs_inbox_and_sensor_cursors_live_in_postgres_and_survive_a_restart_of_everything(
        stack, home, postgres_server, postgres_url, monkeypatch):
    monkeypatch.setenv("SCIM_PIPELINE_POSTGRES_URL", postgres_url)
    stack.start_emulator("--seed", "5", "--orgs", "2", "--users-per-org", "15", "--groups-per-org", "3",
                         "--retry-time-scale", "60")
    stack.start_receiver()
    stack.start_app()
    run_sync(say=lambda _: None)
    instance = dg.DagsterInstance.get()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    synced = {r.run_id for r in instance.get_runs()}
    assert synced and synced == _runs_in_database(postgres_url)  # the sync's runs are the database's rows

    stack.start_daemon()
    _leaver_reaches_the_application(stack)
    wait_for(lambda: _sensor_cursor(instance) > 0, 30)
    before = {r.run_id for r in instance.get_runs()}
    assert before > synced and before == _runs_in_database(postgres_url)
    cursor = _sensor_cursor(instance)
    # The inbox is the database's, read by the daemon's sensor: no SQLite inbox, no Dagster SQLite storage.
    assert not settings().inbox_path.exists() and not (home / "dagster" / "history").exists()

    # Restart everything of the installation: the daemon, the receiver, and the database server itself.
    _stop_daemon(stack)
    stack.receiver.stop()
    postgres_server.restart()
    stack.start_receiver()
    stack.start_daemon()

    after_restart = dg.DagsterInstance.get()
    assert {r.run_id for r in after_restart.get_runs()} >= before  # run history kept
    assert _sensor_cursor(after_restart) >= cursor  # the sensor goes on from its cursor, not from 0
    _leaver_reaches_the_application(stack)
    new_runs = [r for r in after_restart.get_runs(dg.RunsFilter(job_name="directory_events"))
                if r.run_id not in before]
    assert new_runs
    for run in new_runs:  # only events received after the cursor asked for runs: nothing was read twice
        key = run.tags.get("dagster/run_key", "")
        assert key.startswith("retry:") or int(key.rsplit(":", 1)[1]) > cursor, key
