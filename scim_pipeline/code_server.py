"""``scim-pipeline code-server``: Dagster's code server (``dagster api grpc``, with the same arguments; the code
location ``-m scim_pipeline.definitions`` unless they name another) whose runs start as forks of a process that has
already imported the code location, instead of fresh Python processes.

Dagster's default run launcher asks the code server to start each run, and the server starts a new interpreter for
it (multiprocessing's "spawn"), which imports Dagster and the code location again before the run begins: about 2 s
of CPU for every webhook run, more while a reconciliation shares the cores. Here the server starts its run
processes through Python's fork server ("forkserver"), which imports the code location once, at the server's start:
a run's process is a fork of it, up in milliseconds. Forking the gRPC server itself would be unsafe (its threads);
the fork server has no thread and no connection, which is what the start method is for. Everything else is
Dagster's own. If a future Dagster starts runs differently, the server warns and starts them its own way.
"""

from __future__ import annotations

import logging
import multiprocessing
from multiprocessing import forkserver

log = logging.getLogger(__name__)

CODE_LOCATION = "scim_pipeline.definitions"
# Imported once, in the fork server: the code location; the module of the function a run process starts in; what a
# run process imports to open Dagster's instance (its storage, run coordinator and launcher: 0.8 s of the 1 s that
# opening it took); the libraries the run's steps import on first use. A name that cannot be imported (PostgreSQL's
# storage, not installed) is skipped.
RUN_IMPORTS = [
    CODE_LOCATION, "dagster._grpc.impl",
    "dagster._core.instance.factory", "dagster._core.storage.root", "dagster._core.storage.sqlite_storage",
    "dagster._core.storage.runs.sqlite", "dagster._core.storage.event_log.sqlite",
    "dagster._core.storage.schedules.sqlite", "dagster._core.storage.local_compute_log_manager",
    "dagster._core.run_coordinator", "dagster._core.launcher", "dagster_postgres", "upath",
    "pandas", "httpx", "scalekit",
]
TARGET_OPTIONS = {"-m", "--module-name", "-f", "--python-file", "--package-name", "--autoload-defs-module-name",
                  "--empty-working-directory"}


def fork_run_workers(preload: list[str]) -> None:
    """Make Dagster's code servers in this process start runs from a fork server that imported ``preload``; with a
    warning, they start them their own way when this Dagster's server has no start method to replace."""
    from dagster._grpc import server

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)
    api_server = server.DagsterApiServer
    original = api_server.__init__

    def __init__(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        if isinstance(getattr(self, "_mp_ctx", None), multiprocessing.context.BaseContext):
            self._mp_ctx = context
            forkserver.ensure_running()  # the imports now, not in the first run's time
        else:
            log.warning("this Dagster version starts runs in a way scim-pipeline code-server does not know: each "
                        "run starts in a new Python process")

    api_server.__init__ = __init__


def code_server_from_cli(args) -> int:
    from dagster._cli.api import grpc_command

    dagster_args = list(args.dagster_args)
    if not TARGET_OPTIONS.intersection(a.split("=", 1)[0] for a in dagster_args):
        dagster_args += ["-m", CODE_LOCATION]
    fork_run_workers(RUN_IMPORTS)
    return grpc_command.main(args=dagster_args, prog_name="scim-pipeline code-server", standalone_mode=True)
