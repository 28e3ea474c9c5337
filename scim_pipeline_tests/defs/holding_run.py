"""A real run that takes the warehouse pool's slot and keeps it until its process is killed, for the reaper's tests:

    python -m scim_pipeline_tests.defs.holding_run [--lines N] [--untracked]

It logs ``N`` lines first (a sync logs one per organization), then prints ``holding <run_id>`` and sleeps. Like a
run worker it records its process when the warehouse resource starts; ``--untracked`` leaves the resource out, as a
run from before that record existed."""

import argparse
import time

import dagster as dg

from scim_pipeline.defs.partitions import WAREHOUSE_POOL
from scim_pipeline.defs.resources import WarehouseResource


def _hold(context: dg.OpExecutionContext):
    for n in range(context.op_config["lines"]):
        context.log.info(f"progress {n}")
    print(f"holding {context.run_id}", flush=True)
    time.sleep(600)


hold_tracked = dg.op(name="hold", pool=WAREHOUSE_POOL, config_schema={"lines": int},
                     required_resource_keys={"warehouse"})(_hold)
hold_untracked = dg.op(name="hold", pool=WAREHOUSE_POOL, config_schema={"lines": int})(_hold)


@dg.job(executor_def=dg.in_process_executor, resource_defs={"warehouse": WarehouseResource()})
def tracked():
    hold_tracked()


@dg.job(executor_def=dg.in_process_executor)
def untracked():
    hold_untracked()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=0)
    parser.add_argument("--untracked", action="store_true")
    args = parser.parse_args()
    job = untracked if args.untracked else tracked
    with dg.DagsterInstance.get() as instance:
        job.execute_in_process(instance=instance, run_config={"ops": {"hold": {"config": {"lines": args.lines}}}})
