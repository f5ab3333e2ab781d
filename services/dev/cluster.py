"""`warlock run --cluster` (`make cluster`): a Warlock cluster on one machine, to watch it survive the loss
of any part.

The same steps as `warlock run` (`services.dev.stack.DevStack`), with:

- three nats-servers in one cluster (``nats-1..3``, client ports from ``WARLOCK_DEV_NATS_PORT``), their
  routes on 127.0.0.1 over TLS with a certificate of the local dev CA (``tls/nats-route.pem``, server and
  client usage), verified both ways: a process without a CA-signed certificate cannot join. Clients
  connect on loopback without TLS, with their role's nkey, as in the single-node stack. Every client gets
  all three URLs, each service starting from a different node;
- two APIs (``api-1``, ``api-2``) sharing one PostgreSQL database: ``WARLOCK_DATABASE_URL`` if set, else
  database ``warlock`` on 127.0.0.1:5432 as user ``postgres`` (created when missing), not ``test``, which
  the test suite owns, nor ``postgres``, PostgreSQL's maintenance database;
- two gateways (``gateway-1``, ``gateway-2``, ids ``dev-gw1`` / ``dev-gw2``); the agent is configured with
  both URLs and moves to the other when its gateway goes;
- one SSH worker and the local agent, as in the single-node stack.

dev.json keeps the single-node keys (the first API, node and gateway) and adds ``parts`` (every process:
name, pid, url, log), ``api_urls``, ``gateway_urls`` and ``nats_urls``. A part other than the agent that
exits is reported once and the rest keeps running; Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from services.dev.files import ensure_route_tls
from services.dev.procs import Proc, pick_port
from services.dev.stack import DevStack, _shown_url
from shared.natsauth import Cluster, TlsFiles, write_server_config

CLUSTER_NAME = "warlock-dev"
DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/warlock"
CONNECT_TIMEOUT_S = 5.0
ROUTE_TIMEOUT_S = 20.0


class DatabaseUnavailable(RuntimeError):
    """No usable PostgreSQL for the cluster's APIs (the message is the one line the launcher prints)."""


def postgres_url(url: str) -> str:
    """`url` as the API's SQLAlchemy async URL (``postgresql+asyncpg://``); DatabaseUnavailable if it is
    not a PostgreSQL URL (two API instances cannot share a SQLite file)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUnavailable(
            "WARLOCK_DATABASE_URL is not a database URL; expected postgresql://user[:password]@host[:port]/db"
        ) from None
    if parsed.get_backend_name() != "postgresql":
        raise DatabaseUnavailable(
            f"WARLOCK_DATABASE_URL must name a PostgreSQL database (both APIs share it), not "
            f"{parsed.get_backend_name()}: postgresql://user[:password]@host[:port]/db"
        )
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


async def _connect(url: str, database: str | None = None) -> Any:
    import asyncpg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return await asyncpg.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        database=database or parsed.database,
        timeout=CONNECT_TIMEOUT_S,
    )


async def _check(url: str, create: bool) -> None:
    import asyncpg

    try:
        conn = await _connect(url)
    except asyncpg.InvalidCatalogNameError:
        if not create:
            raise
        from sqlalchemy.engine import make_url

        admin = await _connect(url, "postgres")
        try:
            await admin.execute(f'CREATE DATABASE "{make_url(url).database}"')
        except asyncpg.DuplicateDatabaseError:
            pass  # another launcher made it meanwhile
        finally:
            await admin.close()
        conn = await _connect(url)
    await conn.close()


def ensure_database(configured: str | None) -> str:
    """The APIs' database URL: `configured` (``WARLOCK_DATABASE_URL``), else `DEFAULT_DATABASE_URL`, whose
    database is created when missing. Raises DatabaseUnavailable, one line naming the URL (password hidden),
    why, and ``WARLOCK_DATABASE_URL``, when it cannot be reached."""
    url = postgres_url(configured) if configured else DEFAULT_DATABASE_URL
    try:
        asyncio.run(asyncio.wait_for(_check(url, create=configured is None), CONNECT_TIMEOUT_S * 3))
    except Exception as exc:  # refused, timed out, no such database or role, bad password, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "WARLOCK_DATABASE_URL" if configured else "the default (WARLOCK_DATABASE_URL is not set)"
        raise DatabaseUnavailable(
            f"cannot use PostgreSQL at {_shown_url(url)} ({where}): {reason}. Set WARLOCK_DATABASE_URL to "
            "a PostgreSQL database both APIs can use, e.g. postgresql://user:password@host:5432/warlock"
        ) from None
    return url


def _routes(monitor_port: int) -> set[str]:
    """The names of the nodes a node has routes to (its monitoring endpoint, /routez)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/routez", timeout=2) as answer:
            routes = json.loads(answer.read()).get("routes") or []
    except (OSError, ValueError):
        return set()
    return {str(route.get("remote_name")) for route in routes}


class ClusterStack(DevStack):
    """`warlock run --cluster`: `DevStack`'s steps with three NATS nodes, two APIs and two gateways."""

    NATS_NODES = 3
    APIS = 2
    GATEWAYS = 2
    KEEP_RUNNING = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.database: str | None = None
        self.monitor_ports: list[int] = []
        self.route_ports: list[int] = []

    def part_name(self, kind: str, index: int) -> str:
        """``nats-1``, ``api-2``, ``gateway-1`` ..."""
        return f"{'nats' if kind == 'nats-server' else kind}-{index + 1}"

    def database_url(self) -> str:
        """The PostgreSQL both APIs share (checked once, before anything starts)."""
        if self.database is None:
            self.database = ensure_database(self.settings.database_url)
        return self.database

    def write_nats_configs(self, ports: list[int]) -> list[Path]:
        """One config per node: client port, monitoring port, TLS routes to the two others."""
        tls = ensure_route_tls(self.dir / "tls")
        route_tls = TlsFiles(str(tls.cert_file), str(tls.key_file), str(tls.ca_file))
        self.route_ports = [pick_port(0) for _ in ports]
        self.monitor_ports = [pick_port(0) for _ in ports]
        configs = []
        for i, port in enumerate(ports):
            name = self.part_name("nats-server", i)
            routes = tuple(
                f"nats-route://127.0.0.1:{route}" for j, route in enumerate(self.route_ports) if j != i
            )
            cluster = Cluster(
                CLUSTER_NAME, name, self.route_ports[i], routes, listen="127.0.0.1", tls=route_tls
            )
            conf = self.dir / f"{name}.conf"
            self.nkeys = write_server_config(
                conf,
                self.dir / "nats",
                host="127.0.0.1",
                port=port,
                cluster=cluster,
                http_port=self.monitor_ports[i],
            )
            configs.append(conf)
        return configs

    def wait_for_nats(self, nodes: list[Proc]) -> None:
        """Every node ready and routed to both others (TLS verified), else RuntimeError naming the node."""
        super().wait_for_nats(nodes)
        names = {node.name for node in nodes}
        deadline = time.monotonic() + ROUTE_TIMEOUT_S
        for node, monitor in zip(nodes, self.monitor_ports, strict=True):
            while not (names - {node.name}) <= _routes(monitor):
                if node.popen.poll() is not None or time.monotonic() > deadline:
                    routed = sorted(_routes(monitor)) or "none"
                    raise RuntimeError(
                        f"{node.name} did not join the cluster within {ROUTE_TIMEOUT_S:.0f} s (routes to "
                        f"{routed}; see {node.log_path}):\n{node.log()[-1500:]}"
                    )
                time.sleep(0.1)

    def parts(self) -> list[dict[str, Any]]:
        """`DevStack.parts`, the NATS nodes with their route and monitoring ports."""
        parts = super().parts()
        for part in parts:
            if part["name"].startswith("nats-"):
                i = int(part["name"].split("-")[1]) - 1
                part["route_port"] = self.route_ports[i]
                part["monitor_url"] = f"http://127.0.0.1:{self.monitor_ports[i]}"
        return parts

    def banner(self) -> str:
        """Every part with its pid, what it serves and its log; how to run a command and kill a part."""
        info, host = self.info, self.host
        rows = []
        for part in self.parts():
            serves = part["url"] or ""
            if "route_port" in part:
                serves += f" (routes :{part['route_port']}, monitor {part['monitor_url']})"
            elif part["name"] == "agent":
                serves = f"host {host!r} via {' or '.join(info['gateway_urls'])}"
            rows.append(
                f"  {part['name']:<13} {part['pid']:<8} {serves}\n  {'':<13} {'':<8} log {part['log']}"
            )
        key = info["api_key_file"]
        curls = "\n".join(
            f"  curl -s -H \"Authorization: Bearer $(cat {key})\" -H 'Content-Type: application/json' \\\n"
            f'       -d \'{{"command":"uptime"}}\' {url}/api/hosts/{host}/exec'
            for url in info["api_urls"]
        )
        pid = {part["name"]: part["pid"] for part in info["parts"]}
        return f"""
Warlock cluster is running: 3 NATS nodes (TLS routes), 2 APIs, 2 gateways, the SSH worker and the agent.
  {"part":<13} {"pid":<8} serves
{chr(10).join(rows)}
  database      {info["database_url"]}
  API key file  {key}
  dashboard     {"  ".join(f"{url}/" for url in info["api_urls"])}   (either API; log in with the key)
  CA            {info["ca_file"]}
  stack file    {self.dir / "dev.json"}   (every part: name, pid, url, log)
  {"  ".join(self.notes)}

Run a command on this machine through either API:
{curls}

Kill a part and watch; the launcher reports it and keeps the rest running:
  kill -9 {pid["gateway-1"]}   (gateway-1) the agent is back through gateway-2 within seconds:
           tail -f {self.logs / "agent.log"}; curl .../api/agents/{host} shows "gateway_id" "dev-gw2"
  kill -9 {pid["api-1"]}   (api-1) the other API keeps answering
  kill {pid["nats-2"]}   (nats-2) its clients reconnect to another node; commands keep flowing
  Which node each client is on: curl -s http://127.0.0.1:{self.monitor_ports[0]}/connz (and the others)

Press Ctrl-C to stop everything.
"""
