"""Delivery runs and the outbox index's leases, with a real Dagster run executed in this process."""

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.definitions import defs
from scim_pipeline.lib.clock import utcnow
from scim_pipeline.provisioning.outbox_index import DEFAULT_LEASE, OutboxIndex


def test_a_delivery_run_that_fails_leaves_its_organizations_to_come_due_again(home):
    outbox = OutboxIndex(settings().outbox_index_path)
    outbox.mark_ready(["org_a"], utcnow())
    # No application is configured in this home: the run fails after it claimed the organization.
    result = defs.resolve_job_def("deliver_changes").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    assert outbox.due(utcnow()) == []  # leased: a sensor tick now does not launch it again at once
    assert outbox.due(utcnow() + DEFAULT_LEASE) == ["org_a"]  # but it is not forgotten either
