"""The ``scim-pipeline`` command. Each subcommand's work lives in the module named after its concept; this file
only parses arguments and turns configuration errors into one clear line."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from scim_pipeline.config import ConfigError, check_postgres

# subcommand -> "module:function"; the function takes the parsed arguments and returns an exit code.
COMMANDS = {
    "emulator": "scim_pipeline.devstack.emulator.server:run_from_cli",
    "webhooks": "scim_pipeline.receiver.app:run_from_cli",
    "app": "scim_pipeline.devstack.demo_app.app:run_from_cli",
    "sync": "scim_pipeline.commands:sync_from_cli",
    "sql": "scim_pipeline.commands:sql_from_cli",
    "changes": "scim_pipeline.commands:changes_from_cli",
    "approve": "scim_pipeline.commands:approve_from_cli",
    "retry": "scim_pipeline.commands:retry_from_cli",
    "demo": "scim_pipeline.devstack.demo:demo_from_cli",
    "dev": "scim_pipeline.devstack.demo:dev_from_cli",
    "daemon": "scim_pipeline.daemon:daemon_from_cli",
    "code-server": "scim_pipeline.code_server:code_server_from_cli",
}
# Commands that use the Dagster instance or the webhook inbox: with SCIM_PIPELINE_POSTGRES_URL set, the database is
# checked before they start, so that a wrong password is one line now and not a traceback in the middle of a run.
USE_POSTGRES = {"webhooks", "sync", "dev", "daemon", "code-server"}
# Dagster's own commands, with a setting of ours: their arguments go to Dagster untouched (``--help`` is Dagster's).
DAGSTER_COMMANDS = {"daemon", "code-server"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scim-pipeline",
        description="Keep an application's users, memberships and roles in sync with its customers' directories.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("emulator", help="run the Scalekit emulator (TLS, gRPC + OAuth + control API on one port)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8443, help="TLS port; 0 picks a free one (default 8443)")
    p.add_argument("--seed", type=int, default=7, help="seed of the synthetic directories (default 7)")
    p.add_argument("--orgs", type=int, default=5, help="number of organizations (default 5)")
    p.add_argument("--users-per-org", type=int, default=200, help="users per organization (default 200)")
    p.add_argument("--groups-per-org", type=int, default=12, help="groups per organization (default 12)")
    p.add_argument("--webhook-url", default=None, help="where directory events are POSTed (default: none)")
    p.add_argument("--churn", type=float, default=0.0, metavar="EVENTS_PER_MIN",
                   help="random realistic directory mutations per minute (default 0)")
    p.add_argument("--retry-time-scale", type=float, default=1.0,
                   help="divide Scalekit's webhook retry delays by this (e.g. 60 turns minutes into seconds)")
    p.add_argument("--token-ttl", type=int, default=3600, help="access token lifetime in seconds (default 3600)")

    p = sub.add_parser("webhooks", help="run the webhook receiver")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090)")

    p = sub.add_parser("app", help="run the demo application that receives change sets")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8091, help="port (default 8091)")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered 500 (default 0)")
    p.add_argument("--rate-limit-rate", type=float, default=0.0, help="share of requests answered 429 (default 0)")

    p = sub.add_parser("sync", help="materialize the full pipeline once, delivery included")
    p.add_argument("--org", action="append", default=[], metavar="ORG_ID", help="only this organization (repeatable)")

    p = sub.add_parser("sql", help="read-only SQL on the warehouse")
    p.add_argument("query", help="the SQL query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="interrupt the query after this many seconds (default 30); a running pipeline never waits "
                   "longer than that for the warehouse")

    p = sub.add_parser("changes", help="list change sets")
    p.add_argument("--org", default=None, metavar="ORG_ID", help="only this organization")
    p.add_argument("--status", choices=["held", "pending", "failed", "dead", "delivered"], default=None,
                   help="only changes with this status")

    p = sub.add_parser("approve", help="release changes held by the mass-deprovisioning guard")
    p.add_argument("--org", required=True, metavar="ORG_ID", help="the organization whose held changes to release")

    p = sub.add_parser("retry", help="try dead changes again now, with fresh attempts")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--org", default=None, metavar="ORG_ID", help="the organization whose dead changes to retry")
    which.add_argument("--all", action="store_true", help="every organization's dead changes")

    apps = {"choices": ["demo", "scim2"], "default": "demo",
            "help": "the application: the demo application (the changes protocol) or scim2-server, a SCIM 2.0 "
                    "application (default demo)"}
    p = sub.add_parser("demo", help="run the whole pipeline end to end, headless, on the embedded services")
    p.add_argument("--app", **apps)
    p = sub.add_parser("dev", help="embedded services plus Dagster's webserver and daemon, sensors and schedules "
                       "running")
    p.add_argument("--app", **apps)
    p = sub.add_parser("daemon", help="Dagster's daemon (dagster-daemon, same arguments) with sensors evaluated every "
                       "SCIM_PIPELINE_SENSOR_LOOP_S seconds (default 0.5) instead of 5")
    p.add_argument("dagster_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="dagster-daemon's arguments, e.g. run -w workspace.yaml")
    p = sub.add_parser("code-server", help="Dagster's code server for the code location (dagster api grpc, same "
                       "arguments), its runs started as forks of a process that imported the code location once")
    p.add_argument("dagster_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="dagster api grpc's arguments, e.g. -h 0.0.0.0 -p 4000 (-m scim_pipeline.definitions "
                        "unless they name a code location)")
    return parser


def _quiet_library_warnings() -> None:
    """Dagster's beta/preview notices are for developers of the code location, not for people running it."""
    warnings.filterwarnings("ignore", message=r".*is currently in (beta|preview)")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # dagster-postgres one patch release behind dagster (see DAGSTER_POSTGRES in the Makefile)
    warnings.filterwarnings("ignore", message=r"Found version mismatch between `dagster-shared`")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DAGSTER_COMMANDS:
        # Every argument is Dagster's, options included (``-h`` is code-server's host): argparse would take some.
        args = argparse.Namespace(command=argv[0], dagster_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    _quiet_library_warnings()
    module_name, func_name = COMMANDS[args.command].split(":")
    try:
        if args.command in USE_POSTGRES:
            check_postgres()
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"scim-pipeline {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
