"""``scim-pipeline code-server``: Dagster's code server, its run processes forked from a fork server that imported
the code location once (runs through it, under the stack, are checked in pipeline/test_webhooks_e2e.py)."""

import os
import subprocess
import sys
from pathlib import Path

SERVER = """
import logging, sys, threading
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._grpc.server import DagsterApiServer
from scim_pipeline.code_server import RUN_IMPORTS, fork_run_workers
from scim_pipeline_tests.test_code_server import report_modules

fork_run_workers(RUN_IMPORTS)
from concurrent.futures import ThreadPoolExecutor
server = DagsterApiServer(server_termination_event=threading.Event(), logger=logging.getLogger(),
                          server_threadpool_executor=ThreadPoolExecutor(2),
                          loadable_target_origin=LoadableTargetOrigin(executable_path=sys.executable,
                                                                      module_name="scim_pipeline.definitions"))
# A process started the way the server starts a run's.
results = server._mp_ctx.Queue()
child = server._mp_ctx.Process(target=report_modules, args=(results,))
child.start()
print(server._mp_ctx.get_start_method(), results.get(timeout=60))
child.join(30)
"""


def report_modules(results) -> None:
    """In the run's process, before it imports anything: is the code location there already?"""
    results.put("preloaded" if "scim_pipeline.definitions" in sys.modules else "imported-again")


def test_a_run_process_is_a_fork_of_a_process_that_imported_the_code_location(tmp_path):
    done = subprocess.run([sys.executable, "-c", SERVER], capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env=_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["forkserver", "preloaded"], done.stderr[-3000:]


def test_without_a_target_it_serves_the_code_location_and_takes_dagsters_arguments(tmp_path):
    from scim_pipeline.code_server import CODE_LOCATION, TARGET_OPTIONS

    assert CODE_LOCATION == "scim_pipeline.definitions" and "-m" in TARGET_OPTIONS
    # Dagster's own usage text: every argument, --help included, is Dagster's.
    done = subprocess.run([sys.executable, "-m", "scim_pipeline.cli", "code-server", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "Usage: scim-pipeline code-server" in done.stdout and "--port" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "scim_pipeline.cli", "code-server", "--no-such-option"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "No such option" in bad.stderr


def _env(tmp_path) -> dict:
    # The child imports this test module (its run process's target) from the project's root.
    return {**os.environ, "SCIM_PIPELINE_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
