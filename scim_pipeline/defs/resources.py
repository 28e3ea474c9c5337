"""The Dagster resources: configuration over the plain objects that do the work.

``WarehouseResource`` hands the step the plain ``Warehouse`` itself (``create_resource``), since opening the file is
the warehouse's own business. ``ScalekitResource`` and ``ApplicationResource`` hand out their client on demand
(``api()``, ``client()``): reading the settings can fail (an unset variable), and that must fail the step that talks
to Scalekit or the application, not every step of a run that merely has the resource.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.defs import run_process
from scim_pipeline.lib.retry import RetryPolicy
from scim_pipeline.provisioning.changes_protocol import ApplicationClient, DeliveryClient
from scim_pipeline.scalekit.directory_api import DirectoryAPI
from scim_pipeline.warehouse.connection import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """DuckDB at ``SCIM_PIPELINE_HOME/warehouse.duckdb`` unless ``path`` is given."""

    path: Optional[str] = None
    lock_timeout_s: float = 120.0

    def create_resource(self, context: dg.InitResourceContext) -> Warehouse:
        # Resources are initialized as the run starts, before any step claims the warehouse pool's slot: the run's
        # process records itself here, so that a run holding the slot can always be traced to its process.
        if context.run is not None and context.instance is not None:
            run_process.record(context.instance, context.run)
        # A step waiting for the file says so in the run's own log.
        return Warehouse(self.path or settings().warehouse_path, self.lock_timeout_s,
                         on_wait=context.log.warning if context.log is not None else None)


class ScalekitResource(dg.ConfigurableResource):
    """The Scalekit environment named by SCALEKIT_ENVIRONMENT_URL / SCALEKIT_CLIENT_ID / SCALEKIT_CLIENT_SECRET."""

    max_attempts: int = 8
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0

    def api(self) -> DirectoryAPI:
        retry = RetryPolicy(attempts=self.max_attempts, base_s=self.backoff_base_s, max_delay_s=self.backoff_max_s)
        return DirectoryAPI(settings().scalekit(), retry)


class ApplicationResource(dg.ConfigurableResource):
    """The application the pipeline delivers to, over the protocol SCIM_PIPELINE_APP_PROTOCOL names: ``changes``
    (SCIM_PIPELINE_APP_URL, SCIM_PIPELINE_APP_SECRET, or the demo application's app.env) or ``scim2`` (a SCIM 2.0
    service provider: SCIM_PIPELINE_APP_URL, SCIM_PIPELINE_APP_TOKEN, SCIM_PIPELINE_APP_TENANTS). Unset fields come
    from the settings."""

    url: Optional[str] = None
    timeout_s: Optional[float] = None
    max_attempts: Optional[int] = None

    def client(self) -> DeliveryClient:
        cfg = settings()
        if cfg.app_protocol() == "scim2":
            # Imported here: its SCIM models take a third of a second to import, in every run worker of the webhook
            # path, where most installations deliver with the ``changes`` protocol.
            from scim_pipeline.provisioning.scim2_protocol import Scim2Client

            scim2 = cfg.scim2()
            if self.url:
                scim2 = dataclasses.replace(scim2, url=self.url)
            return Scim2Client(scim2, timeout=self.timeout_s or 10.0, max_attempts=self.max_attempts or 5)
        return ApplicationClient(
            self.url or cfg.app_url(),
            cfg.app_secret(),
            timeout=self.timeout_s or 10.0,
            max_attempts=self.max_attempts or 5,
        )
