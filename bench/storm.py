"""Fleet-scale benches: a connect storm on one gateway with the real token authority, the gateway's RSS
at that many idle agents, and the failover time of a swarm after its gateway is SIGKILLed.

Every run: a real nats-server, `warlock-api` on a fresh PostgreSQL database (127.0.0.1:5432) as the token
authority, real `warlock-gateway` processes (plain ws:// on loopback: TLS off) and the swarm (one process,
on uvloop, holding every simulated agent; each signs its hello, checked by the gateway and by the API).
Hosts, token hashes and agent keys are provisioned in bulk before anything is timed (`tests.support.fleet`).

- storm: the swarm starts with every agent at once (at most `concurrency` connects in flight); timed from
  the swarm's start until its last agent got its Welcome (authenticated, hello checked, subscribed). CPU
  seconds of the API and of the gateway over that span (psutil), and the API's until the presence events
  it was sent are recorded.
- gateway RSS: after the storm, the gateway's resident set with every agent idle (settled a few seconds).
- failover: agents given ``A,B`` all sit on A; A is SIGKILLed; timed until B holds every one of them
  (its /healthz session count, polled every 50 ms).
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.dev.procs import BIN, Proc, rss_kib
from tests.support.db import create_pg_database, drop_pg_database, pg_url
from tests.support.fleet import provision
from tests.support.natsserver import NatsServer
from tests.support.stack import Api, Gateway, Stack

ESTABLISHED = r"swarm: {count} sessions established \(([\d.]+)s after start\)"
SETTLE_S = 3.0


@dataclass
class Storm:
    """One connect storm's figures."""

    agents: int
    seconds: float
    api_cpu_s: float  # during the storm
    api_cpu_settled_s: float  # until it went idle (the presence events it was sent are recorded)
    gateway_cpu_s: float
    swarm_cpu_s: float  # the simulated agents' own process
    gateway_rss_before_kib: int
    gateway_rss_kib: int  # with every agent connected and idle

    @property
    def rate(self) -> float:
        """Agents admitted per second."""
        return self.agents / self.seconds


def cpu_s(pid: int) -> float:
    """User + system CPU seconds `pid` used so far."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def healthz_sessions(gateway: Gateway) -> int:
    """The session count the gateway's /healthz reports (-1 if it does not answer)."""
    url = gateway.url.replace("ws://", "http://").replace("/agent", "/healthz")
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(json.loads(answer.read())["sessions"])
    except (OSError, ValueError, KeyError):
        return -1


class Fleet:
    """NATS, the API on a fresh PostgreSQL database and `count` provisioned swarm hosts."""

    def __init__(self, root: Path, count: int) -> None:
        self.root = root
        self.count = count
        self.server = NatsServer(root, "nats-fleet")
        self.stack = Stack(root, self.server.url)
        self.db_name = asyncio.run(create_pg_database())
        self.api: Api = self.stack.start_api(pg_url(self.db_name), "fleet-api")
        self.tokens_file = root / "fleet-tokens.json"
        asyncio.run(provision(pg_url(self.db_name), count, self.tokens_file))

    def swarm(self, name: str, urls: list[str], concurrency: int) -> Proc:
        """Start the swarm (``python -m services.dev.swarm``: on uvloop) over every provisioned host
        against `urls` (``A,B``)."""
        argv = [str(BIN / "python"), "-m", "services.dev.swarm", "--gateway", ",".join(urls)]
        argv += ["--tokens", str(self.tokens_file), "--concurrency", str(concurrency)]
        return self.stack.start(name, argv, self.stack.env())

    def close(self) -> None:
        """Stop every process, drop the database."""
        try:
            self.stack.close()
            self.server.stop()
        finally:
            asyncio.run(drop_pg_database(self.db_name))


def _wait_idle(pid: int, timeout: float, busy: float = 0.05) -> None:
    """Wait until `pid` used less than `busy` CPU seconds in a second (its backlog is done), or `timeout`."""
    deadline = time.monotonic() + timeout
    last = cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = cpu_s(pid)
        if now - last < busy:
            return
        last = now


def connect_storm(root: Path, count: int = 10_000, concurrency: int = 500, runs: int = 3) -> list[Storm]:
    """`runs` storms of `count` swarm agents connecting at once to a fresh gateway (cold token cache), the
    API on PostgreSQL as the authority; between runs the swarm and gateway stop and the API goes idle."""
    root.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(root, count)
    storms: list[Storm] = []
    try:
        for run in range(runs):
            storms.append(_one_storm(fleet, run, concurrency))
        return storms
    finally:
        fleet.close()


def _one_storm(fleet: Fleet, run: int, concurrency: int) -> Storm:
    count = fleet.count
    gateway = fleet.stack.start_gateway(f"storm-gw-{run}", BACKLOG="4096")
    time.sleep(1.0)
    rss_before = rss_kib(gateway.proc.pid)
    api_pid, gw_pid = fleet.api.proc.pid, gateway.proc.pid
    api0, gw0 = cpu_s(api_pid), cpu_s(gw_pid)
    swarm = fleet.swarm(f"storm-swarm-{run}", [gateway.url], concurrency)
    match = swarm.wait_for(ESTABLISHED.format(count=count), timeout=300)
    api1, gw1, swarm1 = cpu_s(api_pid), cpu_s(gw_pid), cpu_s(swarm.pid)
    _wait_idle(api_pid, timeout=120)
    api2 = cpu_s(api_pid)
    time.sleep(SETTLE_S)
    storm = Storm(
        agents=count,
        seconds=float(match.group(1)),
        api_cpu_s=api1 - api0,
        api_cpu_settled_s=api2 - api0,
        gateway_cpu_s=gw1 - gw0,
        swarm_cpu_s=swarm1,
        gateway_rss_before_kib=rss_before,
        gateway_rss_kib=rss_kib(gw_pid),
    )
    swarm.stop()
    gateway.proc.stop()
    _wait_idle(api_pid, timeout=120)  # the disconnects are recorded before the next storm
    return storm


def failover(root: Path, count: int = 1_000, concurrency: int = 500, runs: int = 3) -> list[float]:
    """Seconds from SIGKILL of gateway A until gateway B holds all `count` agents (which sat on A),
    `runs` times (a fresh pair of gateways and a fresh swarm each time)."""
    root.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(root, count)
    try:
        return [_one_failover(fleet, run, concurrency) for run in range(runs)]
    finally:
        fleet.close()


def _one_failover(fleet: Fleet, run: int, concurrency: int) -> float:
    count = fleet.count
    a = fleet.stack.start_gateway(f"failover-a-{run}", BACKLOG="4096")
    b = fleet.stack.start_gateway(f"failover-b-{run}", BACKLOG="4096")
    swarm = fleet.swarm(f"failover-swarm-{run}", [a.url, b.url], concurrency)
    try:
        swarm.wait_for(ESTABLISHED.format(count=count), timeout=120)
        if healthz_sessions(a) != count or healthz_sessions(b) != 0:
            raise RuntimeError(f"agents not all on A: A {healthz_sessions(a)}, B {healthz_sessions(b)}")
        killed = time.monotonic()
        a.proc.signal(signal.SIGKILL)
        while healthz_sessions(b) < count:
            if time.monotonic() - killed > 120:
                raise RuntimeError(f"only {healthz_sessions(b)}/{count} agents on B after 120 s")
            time.sleep(0.05)
        return time.monotonic() - killed
    finally:
        swarm.stop()
        b.proc.stop()


def print_storm(storms: list[Storm]) -> None:
    """The storm block as Markdown: every run, then the median."""
    count = storms[0].agents
    print(f"\n## Connect storm: {count} agents on one gateway, the API on PostgreSQL as authority\n")
    print("| run | seconds | agents/s | API CPU s (storm) | API CPU s (until idle) | gateway CPU s |", end="")
    print(" swarm CPU s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for i, s in enumerate(storms, 1):
        print(
            f"| {i} | {s.seconds:.2f} | {s.rate:.0f} | {s.api_cpu_s:.1f} | {s.api_cpu_settled_s:.1f} |"
            f" {s.gateway_cpu_s:.1f} | {s.swarm_cpu_s:.1f} |"
        )
    median = statistics.median(s.seconds for s in storms)
    print(f"\nMedian: **{median:.2f} s** ({count / median:.0f} agents/s); target ≤ 10 s for 10,000 agents.")
    print("Plain ws:// on loopback (TLS off); every hello signed and checked by the gateway and the API.")


def print_rss(storms: list[Storm]) -> None:
    """The gateway RSS block as Markdown (each storm's fresh gateway, settled with every agent idle)."""
    count = storms[0].agents
    print(f"\n## Gateway RSS at {count} idle agents\n")
    print("| run | gateway RSS MiB | idle gateway MiB | KiB per agent |")
    print("| ---: | ---: | ---: | ---: |")
    for i, s in enumerate(storms, 1):
        per = (s.gateway_rss_kib - s.gateway_rss_before_kib) / s.agents
        print(f"| {i} | {s.gateway_rss_kib / 1024:.1f} | {s.gateway_rss_before_kib / 1024:.1f} | {per:.1f} |")
    median = statistics.median(s.gateway_rss_kib for s in storms) / 1024
    print(f"\nMedian: **{median:.1f} MiB**; target ≤ 256 MiB at 10,000 idle agents.")


def print_failover(seconds: list[float], count: int) -> None:
    """The failover block as Markdown."""
    print(f"\n## Failover: {count} agents after their gateway is SIGKILLed\n")
    print("| run | seconds until all are on the other gateway |")
    print("| ---: | ---: |")
    for i, value in enumerate(seconds, 1):
        print(f"| {i} | {value:.2f} |")
    median = statistics.median(seconds)
    print(f"\nMedian: **{median:.2f} s**; target ≤ 15 s (the swarm reconnects with the real agent's", end="")
    print(" policy: the next URL after a uniform(0, 0.5 s) pause).")
