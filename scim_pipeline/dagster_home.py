"""The Dagster instance home of an installation: ``$DAGSTER_HOME``, else ``SCIM_PIPELINE_HOME/dagster``, seeded
with the project's ``dagster.yaml`` (warehouse pool of one, fast run dequeue, threaded sensors)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scim_pipeline.config import home

TEMPLATE = Path(__file__).with_name("dagster.yaml")


def ensure_dagster_home() -> Path:
    path = Path(os.environ.get("DAGSTER_HOME") or home() / "dagster").resolve()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():  # never overwrite an operator's own instance config (e.g. Postgres storage)
        shutil.copyfile(TEMPLATE, config)
    os.environ["DAGSTER_HOME"] = str(path)
    return path
