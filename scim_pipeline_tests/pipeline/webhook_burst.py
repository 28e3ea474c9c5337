"""Incremental (webhook) runs back to back, as a storm of webhooks would launch them, until a file appears:

    python -m scim_pipeline_tests.pipeline.webhook_burst STOP_FILE ORG [ORG ...]

Each run applies its organization's waiting events (none is fine: it still takes the warehouse for each write).
Prints ``ran N failed M`` at the end. A separate process: Dagster runs do not execute in threads of one process."""

import sys
from pathlib import Path

from scim_pipeline.definitions import defs
from scim_pipeline.defs.instance import dagster_instance
from scim_pipeline.defs.webhooks.sensor import events_run_config

if __name__ == "__main__":
    stop, orgs = Path(sys.argv[1]), sys.argv[2:]
    job, instance = defs.resolve_job_def("directory_events"), dagster_instance()
    ran = failed = 0
    while not stop.exists():
        result = job.execute_in_process(instance=instance, partition_key=orgs[ran % len(orgs)],
                                        run_config=events_run_config(0, 0), raise_on_error=False)
        ran += 1
        failed += not result.success
        print(f"run {ran} {'ok' if result.success else 'FAILED'}", flush=True)
    print(f"ran {ran} failed {failed}", flush=True)
