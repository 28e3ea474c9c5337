"""Webhook receiver throughput and latency: the durable inbox against the same server answering without storage.

Starts the real receiver (`scim-pipeline webhooks`: uvicorn, durable SQLite inbox) on 127.0.0.1 and, beside it, the
same app and server settings with storage switched off (answering right after verification and parsing): the ceiling
the inbox is measured against. Both get the same bounded number of signed events at a fixed concurrency, in
alternating rounds; it reports accepted events/s, p50/p99 latency and server CPU per event, the ratios, and checks
that every accepted event is stored.

With ``--postgres`` a third target joins the same rounds: two receivers, each with its own SCIM_PIPELINE_HOME,
storing into one PostgreSQL database (SCIM_PIPELINE_POSTGRES_URL) of a throwaway server started from the machine's
PostgreSQL packages, the load split between them as a load balancer would. Its CPU figure counts the receivers, not
the database server.

    python bench/webhooks.py [--events 20000] [--concurrency 64] [--rounds 4] [--postgres]

The load generator is a minimal keep-alive HTTP/1.1 client over asyncio streams with the requests built in advance:
on a small machine it shares the CPUs with the server, and a full-featured client would measure itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from standardwebhooks import Webhook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scim_pipeline.devstack import services  # noqa: E402
from scim_pipeline.receiver.app import WEBHOOK_PATH  # noqa: E402
from scim_pipeline.receiver.inbox import Inbox  # noqa: E402

TARGET_EVENTS_PER_S = 2000
TARGET_P99_MS = 50.0


def build_requests(secret: str, port: int, count: int, tag: str) -> list[bytes]:
    """Signed, realistic `user_updated` events as complete HTTP/1.1 requests (~1 KB bodies)."""
    ts = int(time.time())
    webhook, when = Webhook(secret), datetime.fromtimestamp(ts, timezone.utc)
    requests = []
    for i in range(count):
        body = json.dumps({
            "spec_version": "1", "id": f"evt_{tag}_{i}", "type": "organization.directory.user_updated",
            "occurred_at": "2026-11-28T15:00:00.000Z", "environment_id": "env_bench",
            "organization_id": f"org_{i % 50}", "object": "DirectoryUser",
            "data": {
                "id": f"diruser_{i}", "organization_id": f"org_{i % 50}", "dp_id": f"dir_{i % 50}",
                "preferred_username": f"user{i}", "email": f"user{i}@example.com", "active": True,
                "name": f"User {i}", "given_name": "User", "family_name": str(i),
                "roles": [{"role_name": "member"}], "groups": [{"id": f"dirgroup_{i % 12}", "name": f"Group {i % 12}"}],
                "raw_attributes": {"emails": [{"value": f"user{i}@example.com", "primary": True}],
                                   "title": "Engineer", "department": "R&D", "padding": "x" * 400},
            },
        }).encode()
        webhook_id = f"msg_{tag}_{i}"
        headers = {"webhook-id": webhook_id, "webhook-timestamp": str(ts),
                   "webhook-signature": webhook.sign(webhook_id, when, body.decode())}
        head = (
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        )
        requests.append(head.encode() + body)
    return requests


async def _worker(port: int, requests: list[bytes], next_index, latencies: list[float], statuses: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (i := next_index()) is not None:
            started = time.perf_counter()
            writer.write(requests[i])
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def drive(port: int, requests: list[bytes], concurrency: int) -> dict:
    """Send every request once, ``concurrency`` at a time; stops by itself when the list is exhausted."""
    return await drive_many({port: requests}, concurrency)


async def drive_many(requests_by_port: dict[int, list[bytes]], concurrency: int) -> dict:
    """``drive`` over several servers at once, ``concurrency`` shared evenly between them (a load balancer)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    workers = []
    for port, requests in requests_by_port.items():
        position = iter(range(len(requests)))
        workers += [_worker(port, requests, lambda position=position: next(position, None), latencies, statuses)
                    for _ in range(max(1, concurrency // len(requests_by_port)))]
    started = time.perf_counter()
    await asyncio.gather(*workers)
    return {"elapsed": time.perf_counter() - started, "latencies": latencies, "statuses": statuses}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all threads (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _run(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class Target:
    """The servers under test (one, or several sharing a store), and what the rounds sent to them measured."""

    def __init__(self, name: str, ports: list[int], pids: list[int]):
        self.name, self.ports, self.pids = name, ports, pids
        self.elapsed, self.cpu, self.latencies, self.statuses = 0.0, 0.0, [], {}

    def _cpu(self) -> float | None:
        times = [cpu_seconds(pid) for pid in self.pids]
        return None if None in times else sum(times)

    def round(self, secret: str, n: int, tag: str, concurrency: int) -> None:
        share = [n // len(self.ports) + (i < n % len(self.ports)) for i in range(len(self.ports))]
        requests = {port: build_requests(secret, port, k, f"{port}_{tag}") for port, k in zip(self.ports, share)}
        cpu_before = self._cpu()
        result = _run(drive_many(requests, concurrency))
        cpu_after = self._cpu()
        self.elapsed += result["elapsed"]
        self.cpu += (cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None else float("nan")
        self.latencies += result["latencies"]
        for status, n in result["statuses"].items():
            self.statuses[status] = self.statuses.get(status, 0) + n

    @property
    def accepted(self) -> int:
        return self.statuses.get(200, 0)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "rate": self.accepted / self.elapsed, "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
            # Server CPU per event: much less moved than wall-clock rates by other load on a shared machine.
            "cpu_us": self.cpu / len(lat) * 1e6,
        }


def start_ceiling(home: Path, secret: str) -> tuple[subprocess.Popen, int]:
    """The same app and uvicorn settings as the real command, with storage off (this file's --serve-no-store)."""
    port = services.free_port()
    env = {**os.environ, "SCALEKIT_WEBHOOK_SECRET": secret, "SCIM_PIPELINE_HOME": str(home)}
    log = open(home / "ceiling.log", "ab")
    process = subprocess.Popen([sys.executable, __file__, "--serve-no-store", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + 30
    while not services.port_open("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the no-storage receiver did not start:\n" + (home / "ceiling.log").read_text())
        time.sleep(0.05)
    return process, port


def serve_no_store(port: int) -> int:
    from scim_pipeline.config import settings
    from scim_pipeline.lib.asgi import bind, serve
    from scim_pipeline.receiver.app import SERVER_OPTIONS, create_app

    cfg = settings()
    app = create_app(cfg.home / "unused.sqlite", cfg.webhook_secrets(), store=False)
    return 0 if serve(app, bind("127.0.0.1", port), **SERVER_OPTIONS) else 1


def line(target: Target) -> str:
    r = target.summary()
    return (f"  {target.name:<24} {r['rate']:6.0f} events/s   p50 {r['p50_ms']:5.1f} ms   p99 {r['p99_ms']:5.1f} ms"
            f"   server CPU {r['cpu_us']:4.0f} us/event   statuses {dict(sorted(target.statuses.items()))}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per server (default 4)")
    parser.add_argument("--postgres", action="store_true",
                        help="also two receivers sharing a PostgreSQL inbox (a throwaway local server)")
    parser.add_argument("--serve-no-store", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_no_store:
        return serve_no_store(args.port)

    home = Path(tempfile.mkdtemp(prefix="bench-webhooks-"))
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    rounds = max(1, min(args.rounds, args.events))
    with contextlib.ExitStack() as stack:
        print(f"webhook receiver: {args.events} signed events per target in {rounds} alternating rounds, "
              f"concurrency {args.concurrency}, {os.cpu_count()} CPUs, client, servers and database on one machine")
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        svc = stack.enter_context(services.start("webhooks", [], home, env={"SCALEKIT_WEBHOOK_SECRET": secret}))
        process, port = start_ceiling(home, secret)
        stack.callback(_stop, process)
        durable = Target("durable inbox (SQLite)", [svc.port], [svc.process.pid])
        ceiling = Target("no storage", [port], [process.pid])
        targets = [durable, ceiling]
        if args.postgres:
            from scim_pipeline.devstack.postgres import PostgresServer

            server = stack.enter_context(PostgresServer())
            url = server.create_database("bench")
            receivers = []
            for name in ("a", "b"):
                (home / name).mkdir()
                receivers.append(stack.enter_context(services.start(
                    "webhooks", [], home / name,
                    env={"SCALEKIT_WEBHOOK_SECRET": secret, "SCIM_PIPELINE_POSTGRES_URL": url})))
            shared = Target("PostgreSQL, 2 receivers", [r.port for r in receivers], [r.process.pid for r in receivers])
            targets.append(shared)
        warmup = min(1000, args.events)
        for target in targets:
            target.round(secret, warmup, "w", args.concurrency)
            target.elapsed, target.cpu, target.latencies, target.statuses = 0.0, 0.0, [], {}
        # Alternating rounds: every target meets the same background load, so their ratios mean something.
        per_round = args.events // rounds
        for r in range(rounds):
            n = per_round if r < rounds - 1 else args.events - per_round * (rounds - 1)
            for target in targets:
                target.round(secret, n, str(r), args.concurrency)

        expected = args.events + warmup  # the warm-up is stored too
        stores = [(durable, Inbox(home / "inbox.sqlite"))] + ([(shared, Inbox(url))] if args.postgres else [])
        failed = False
        for target, inbox in stores:
            stored = inbox.count()
            print(line(target) + f"   stored {stored}/{expected}")
            failed |= stored != expected or target.accepted != args.events
        print(line(ceiling))
        c = ceiling.summary()
        for target, _ in stores:
            d = target.summary()
            print(f"  {target.name} / no storage: throughput {d['rate'] / c['rate']:.2f}x, "
                  f"p99 {d['p99_ms'] / c['p99_ms']:.2f}x, server CPU {d['cpu_us'] / c['cpu_us']:.2f}x")
            meets = d["rate"] >= TARGET_EVENTS_PER_S and d["p99_ms"] < TARGET_P99_MS
            print(f"  target for {target.name} (>= {TARGET_EVENTS_PER_S} durable events/s, "
                  f"p99 < {TARGET_P99_MS:.0f} ms): {'met' if meets else 'NOT met'}")
        # Speed on a shared machine is reported, not enforced; losing an acknowledged event is a failure.
        if failed:
            print("  FAILED: not every event was accepted and stored", file=sys.stderr)
            return 1
        return 0


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(10)


if __name__ == "__main__":
    sys.exit(main())
