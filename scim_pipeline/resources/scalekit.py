"""Scalekit as a Dagster resource: the retry budget as configuration over ``DirectoryAPI``."""

from __future__ import annotations

import dagster as dg

from scim_pipeline.config import settings
from scim_pipeline.directory_api import Backoff, DirectoryAPI


class ScalekitResource(dg.ConfigurableResource):
    """The Scalekit environment named by SCALEKIT_ENVIRONMENT_URL / SCALEKIT_CLIENT_ID / SCALEKIT_CLIENT_SECRET."""

    max_attempts: int = 8
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0

    def api(self) -> DirectoryAPI:
        return DirectoryAPI(settings().scalekit(), Backoff(self.max_attempts, self.backoff_base_s, self.backoff_max_s))
