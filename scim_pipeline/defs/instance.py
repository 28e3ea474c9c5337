"""The Dagster instance of an installation: ``$DAGSTER_HOME``, else ``SCIM_PIPELINE_HOME/dagster``, seeded with
the project's ``dagster.yaml`` beside this file (warehouse pool of one, fast run dequeue, threaded sensors), and,
when ``SCIM_PIPELINE_POSTGRES_URL`` is set, with Dagster's storage (runs, event logs, schedules and sensor state) in
that database (``dagster-postgres``), so that a webserver, a daemon and a code server on other hosts share it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from scim_pipeline.config import POSTGRES_URL_VAR, home, postgres_url

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("dagster.yaml")
# Read from the environment by each Dagster process, so the password is written in no file.
POSTGRES_STORAGE = f"""
# {POSTGRES_URL_VAR} is set: runs, event logs, schedules and sensor state live in that database, which every
# host of the installation shares.
storage:
  postgres:
    postgres_url:
      env: {POSTGRES_URL_VAR}
"""


def instance_yaml(postgres: bool) -> str:
    """The ``dagster.yaml`` an installation is seeded with: embedded (SQLite in DAGSTER_HOME), or on PostgreSQL."""
    return TEMPLATE.read_text() + (POSTGRES_STORAGE if postgres else "")
# A run over many organizations records one "planned" event per asset, not one per asset and organization: a
# reconciliation of a thousand organizations would write six thousand events to the run log before it starts.
# Dagster's trade: a run that fails marks itself failed, not each of its partitions.
PLANNED_EVENTS_VAR = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"
# On PostgreSQL, a run's materializations of many partitions are written in batches: 2,000 of them (1,000
# organizations, two assets) took 60 s one by one and 1.3 s in batches, measured. On SQLite batches gain nothing.
EVENT_BATCH_VAR, EVENT_BATCH_SIZE = "DAGSTER_EVENT_BATCH_SIZE", "1000"


def ensure_dagster_home() -> Path:
    path = Path(os.environ.get("DAGSTER_HOME") or home() / "dagster").resolve()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    wanted = instance_yaml(postgres_url() is not None)
    # A file that is one of the two seeds is ours, and follows the setting; any other is an operator's own
    # instance config, never overwritten.
    if not config.exists() or (config.read_text() != wanted and config.read_text() in (instance_yaml(False),
                                                                                         instance_yaml(True))):
        tmp = config.with_suffix(".yaml.tmp")
        tmp.write_text(wanted)
        tmp.replace(config)
    elif postgres_url() and "postgres" not in ((yaml.safe_load(config.read_text()) or {}).get("storage") or {}):
        # The inbox would be shared while the runs and sensor cursors stay on this host's disk: say so.
        log.warning("%s is set, but %s (an operator's own) keeps Dagster's storage elsewhere: add its storage block "
                    "from %s", POSTGRES_URL_VAR, config, "deploy/dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(path)
    os.environ.setdefault(PLANNED_EVENTS_VAR, "true")  # inherited by the daemon and webserver this process starts
    if postgres_url():
        os.environ.setdefault(EVENT_BATCH_VAR, EVENT_BATCH_SIZE)
    return path


_instances: dict = {}


def dagster_instance():
    """The installation's Dagster instance, one per process: resolved definitions keep a reference to the instance
    they were first loaded with, so a second instance object for the same home would leave them dangling."""
    import dagster as dg

    path = str(ensure_dagster_home())
    if path not in _instances:
        _instances[path] = dg.DagsterInstance.get()
    # Entering makes it the instance that definitions are resolved against (a context variable of Dagster's).
    return _instances[path].__enter__()
