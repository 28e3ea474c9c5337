"""Scalekit's Directory API through the official SDK: paging, backoff, and pages as warehouse records (``records``).
Plain Python without Dagster (the Dagster resource is ``defs/resources.py``).

The SDK's ``list_directory_users``/``list_directory_groups`` wrappers break on any non-empty page, so pages are read
through the SDK's own execution path, ``core_client.grpc_exec``, which keeps its authentication (re-login after
``UNAUTHENTICATED``) and its exceptions. Pages of users and groups are asked for on the SDK's channel through a
method that leaves the reply as bytes: ``records`` converts those bytes directly, which costs a fraction of building
the Python objects first. Rate limits surface at once from the SDK; backing off is ours (the package's
``RetryPolicy``). UNAVAILABLE is retried here too (``retry_on_unavailable=False`` stops the SDK's own fixed 1-2 s
sleeps from stacking under ours).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Callable, Iterator

from scim_pipeline.config import ScalekitSettings
from scim_pipeline.lib.retry import RetryPolicy
from scim_pipeline.scalekit import records
from scim_pipeline.scalekit.records import Page

PAGE_SIZE = 30  # Scalekit's maximum for users and groups


def _sdk():
    """The SDK's modules, imported on first use: it takes a second to import, and every Dagster run process loads
    this module whether or not the run talks to Scalekit."""
    import scalekit
    from scalekit.common import exceptions
    from scalekit.v1.directories import directories_pb2
    from scalekit.v1.organizations import organizations_pb2

    return scalekit, exceptions, directories_pb2, organizations_pb2


class ScalekitError(Exception):
    """Scalekit could not be read: unreachable, refused our credentials, or kept failing past the retry budget."""


class NotFound(ScalekitError):
    """Scalekit answered that what the call names does not exist (``NOT_FOUND``): deleted, or never there."""


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


class DirectoryAPI:
    """Reads organizations, directories, users and groups; safe to share between threads (one gRPC channel)."""

    def __init__(self, config: ScalekitSettings, retry: RetryPolicy = RetryPolicy(), sleep: Callable = time.sleep):
        self.config = config
        self.retry = retry
        self.sleep = sleep
        self._client = None  # the SDK client, made on first use
        self._lock = threading.Lock()
        self._raw_methods: dict[str, Callable] = {}
        self.calls = 0
        self.retries = 0

    @property
    def client(self):
        scalekit, errors, _, _ = _sdk()
        with self._lock:
            if self._client is None:
                try:
                    self._client = scalekit.ScalekitClient(
                        self.config.environment_url, self.config.client_id, self.config.client_secret
                    )
                except errors.ScalekitUnauthorizedException as exc:
                    raise ScalekitError(
                        f"Scalekit at {self.config.environment_url} refused the client credentials "
                        "(SCALEKIT_CLIENT_ID / SCALEKIT_CLIENT_SECRET)"
                    ) from exc
                except errors.ScalekitException as exc:
                    raise ScalekitError(
                        f"Scalekit at {self.config.environment_url} is unreachable: {_reason(exc)}"
                    ) from exc
            return self._client

    def call(self, method_name: str, service: str, request, raw: bool = False):
        """One API call through the SDK's execution path, retried with jitter on rate limits and unavailability;
        with ``raw`` the reply is its serialized bytes."""
        _, errors, _, _ = _sdk()
        retryable = (errors.ScalekitTooManyRequestsException, errors.ScalekitServiceUnavailableException)
        client = self.client
        if raw:
            method = self._raw_method(method_name, request)
        elif service == "directory":
            method = getattr(client.directory.directory_service, method_name).with_call
        else:
            method = getattr(client.organization.organization_service, method_name).with_call

        def attempt():
            self.calls += 1
            response, _call = client.core_client.grpc_exec(method, request, retry_on_unavailable=False)
            return response

        def count_retry(exc: BaseException, delay: float) -> None:
            self.retries += 1

        try:
            return self.retry.call(attempt, retry_if=lambda exc: isinstance(exc, retryable), on_retry=count_retry,
                                   sleep=self.sleep)
        except retryable as exc:
            raise ScalekitError(
                f"Scalekit kept failing {method_name} after {self.retry.attempts} attempts: {_reason(exc)}"
            ) from exc
        except errors.ScalekitNotFoundException as exc:
            raise NotFound(f"Scalekit answered {method_name}: not found ({_reason(exc)})") from exc
        except errors.ScalekitServerException as exc:
            raise ScalekitError(f"Scalekit refused {method_name}: {_reason(exc)}") from exc
        except errors.ScalekitException as exc:
            raise ScalekitError(f"Scalekit call {method_name} failed: {_reason(exc)}") from exc

    def _raw_method(self, method_name: str, request):
        """The directory service's method on the SDK's own channel, with the reply left as bytes."""
        if (method := self._raw_methods.get(method_name)) is None:  # two threads may both make it: harmless
            service = _sdk()[2].DESCRIPTOR.services_by_name["DirectoryService"]
            method = self._raw_methods[method_name] = self.client.core_client.grpc_secure_channel.unary_unary(
                f"/{service.full_name}/{method_name}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=None,
            ).with_call
        return method

    def organizations(self) -> Iterator[dict]:
        orgs_pb2 = _sdk()[3]
        token = ""
        while True:
            page = self.call("ListOrganization", "organization", orgs_pb2.ListOrganizationsRequest(page_size=100, page_token=token))
            for org in page.organizations:
                yield {"organization_id": org.id, "display_name": org.display_name, "external_id": org.external_id}
            token = page.next_page_token
            if not token or not page.organizations:
                return

    def directories(self, organization_id: str) -> list[dict]:
        """The organization's directories; ``NotFound`` when the organization does not exist (any more)."""
        pb2 = _sdk()[2]
        page = self.call("ListDirectories", "directory", pb2.ListDirectoriesRequest(organization_id=organization_id))
        return [
            {
                "directory_id": d.id,
                "organization_id": organization_id,
                "name": d.name,
                "provider": _enum_name(pb2.DirectoryProvider, d.directory_provider),
                "directory_type": _enum_name(pb2.DirectoryType, d.directory_type),
                "enabled": d.enabled,
                "role_assignments": [
                    {"group_id": a.group_id, "role_name": a.role_name} for a in d.role_assignments.assignments
                ],
                "total_users": d.total_users,
                "total_groups": d.total_groups,
            }
            for d in page.directories
        ]

    def user_pages(self, organization_id: str, directory_id: str,
                   updated_after: datetime | None = None) -> Iterator[Page]:
        """Every user of a directory, one page (up to 30) at a time, as warehouse records."""
        request = _sdk()[2].ListDirectoryUsersRequest(
            organization_id=organization_id, directory_id=directory_id, page_size=PAGE_SIZE, include_detail=True
        )
        if updated_after is not None:
            request.updated_after.FromDatetime(updated_after.replace(tzinfo=timezone.utc))
        return self._pages("ListDirectoryUsers", request,
                           lambda data: records.users_page(data, organization_id, directory_id))

    def group_pages(self, organization_id: str, directory_id: str) -> Iterator[Page]:
        """Every group of a directory, one page at a time, as warehouse records."""
        request = _sdk()[2].ListDirectoryGroupsRequest(
            organization_id=organization_id, directory_id=directory_id, page_size=PAGE_SIZE, include_detail=True
        )
        return self._pages("ListDirectoryGroups", request,
                           lambda data: records.groups_page(data, organization_id, directory_id))

    def _pages(self, method_name: str, request, convert: Callable[[bytes], Page]) -> Iterator[Page]:
        """Each page of a directory listing, following its opaque page tokens."""
        while True:
            data = self.call(method_name, "directory", request, raw=True)
            try:
                page = convert(data)
            except ValueError as exc:  # the listing fails clearly; the organization's rows are left as they were
                raise ScalekitError(f"Scalekit sent a {method_name} page that could not be read: {exc}") from exc
            yield page
            if not page.next_page_token or not page.count:
                return
            request.page_token = page.next_page_token


def _reason(exc: Exception) -> str:
    """The SDK's message without anything that could carry a credential."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
