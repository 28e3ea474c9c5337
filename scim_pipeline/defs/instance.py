"""The Dagster instance of an installation: ``$DAGSTER_HOME``, else ``SCIM_PIPELINE_HOME/dagster``, seeded with
the project's ``dagster.yaml`` beside this file (warehouse pool of one, fast run dequeue, threaded sensors)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scim_pipeline.config import home

TEMPLATE = Path(__file__).with_name("dagster.yaml")
# A run over many organizations records one "planned" event per asset, not one per asset and organization: a
# reconciliation of a thousand organizations would write six thousand events to the run log before it starts.
# Dagster's trade: a run that fails marks itself failed, not each of its partitions.
PLANNED_EVENTS_VAR = "DAGSTER_EMIT_PARTITION_SUBSET_IN_PLANNED_EVENTS"


def ensure_dagster_home() -> Path:
    path = Path(os.environ.get("DAGSTER_HOME") or home() / "dagster").resolve()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():  # never overwrite an operator's own instance config (e.g. Postgres storage)
        shutil.copyfile(TEMPLATE, config)
    os.environ["DAGSTER_HOME"] = str(path)
    os.environ.setdefault(PLANNED_EVENTS_VAR, "true")  # inherited by the daemon and webserver this process starts
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
