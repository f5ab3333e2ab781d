"""Job fan-out of `true` to swarm agents, every per-host outcome recorded, beside raw NATS in the same run.

One NATS server, the API on a fresh PostgreSQL database (127.0.0.1:5432), two gateways, and swarm agents
(`warlock swarm`, separate processes; they answer without spawning anything, so the figures are the
control plane's). Hosts, tokens and agent keys are provisioned in bulk (`tests.support.fleet`).

    phase 1  1,000 agents on gateway 1
             raw: one signed exec request per host straight over NATS (nats-py, the api identity, all at
             once; no API, no database), then a job to the same hosts (``{"targets": {"hosts": [...]}}``)
    phase 2  9,000 more (4,000 on gateway 1, 5,000 on gateway 2): 10,000 across two gateways, the same
             two measurements (the job: ``{"targets": {"all": true}}``), the API's peak RSS meanwhile

A job is timed from the POST to the first ``GET /api/jobs/{id}?limit=0`` (polled every 25 ms) that says
finished with nothing pending: every outcome is in the database by then. The API's own span (job created_at
→ finished_at) is printed beside it. Each figure is the median of `runs`, raw and job alternating.

Then 20 real agents (`warlock-agent` processes, hosts ``real-01`` … with addresses 127.0.0.N, spawning
`/bin/sh`) and one sshd on 127.0.0.1 (sshd listens on at most 16 addresses, so the 20 SSH connections all
go to 127.0.0.1): a job of `true` to the 20 beside raw asyncssh running `true` on 20 connections at once,
fresh ones and ones opened beforehand (pooled).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats

from services.dev.procs import BIN, rss_kib
from shared import subjects
from tests.support.db import create_pg_database, drop_pg_database, pg_url
from tests.support.fleet import provision, write_tokens
from tests.support.natsserver import NatsServer, role_options
from tests.support.stack import Api, Stack

TRUE = json.dumps({"command": "true", "timeout": 30}).encode()


async def raw_fanout(url: str, hosts: list[str], signer: Any) -> float:
    """Seconds for one signed exec request per host, all at once, straight over NATS (signing excluded)."""
    bodies = [(subjects.agent_exec(h), signer.exec_body(h, TRUE, ttl=600)) for h in hosts]
    nc = await nats.connect(url, **role_options(url, "api"), pending_size=256 * 1024 * 1024)
    try:
        t0 = time.perf_counter()
        replies = await asyncio.gather(*(nc.request(s, b, timeout=60) for s, b in bodies))
        took = time.perf_counter() - t0
    finally:
        await nc.close()
    bad = [r.data[:200] for r in replies if json.loads(r.data).get("exit_code") != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} raw requests failed, e.g. {bad[0]!r}")
    return took


def job_fanout(api: Api, hosts: list[str], everyone: bool) -> tuple[float, float, float]:
    """Seconds from POST /api/jobs to every outcome recorded, the API's own span, and to the 202 (the
    job and its runs recorded); targets: all hosts (`everyone`) or the list `hosts`."""
    count = len(hosts)
    targets: dict[str, Any] = {"all": True} if everyone else {"hosts": hosts}
    with httpx.Client(base_url=api.url, headers=api.auth, timeout=120) as http:
        t0 = time.perf_counter()
        answer = http.post("/api/jobs", json={"command": "true", "timeout": 30, "targets": targets})
        if answer.status_code != 202:
            raise RuntimeError(f"job refused: {answer.status_code} {answer.text[:300]}")
        accepted = time.perf_counter() - t0
        job_id = answer.json()["job_id"]
        while True:
            job = http.get(f"/api/jobs/{job_id}", params={"limit": 0}).json()
            if job["finished_at"] is not None and job["counts"]["pending"] == 0:
                break
            time.sleep(0.025)
        took = time.perf_counter() - t0
    counts = job["counts"]
    if counts["succeeded"] != count or job["targets"] != count:
        raise RuntimeError(f"job {job_id}: {job['targets']} targets, counts {counts}")
    created = _ts(job["created_at"])
    finished = _ts(job["finished_at"])
    return took, finished - created, accepted


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


class PeakRss:
    """The peak RSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _swarm(stack: Stack, root: Path, name: str, gateway_url: str, tokens: dict[str, str]) -> None:
    if not tokens:
        return
    path = root / f"{name}.json"
    write_tokens(path, tokens)
    argv = [str(BIN / "warlock"), "swarm", "--gateway", gateway_url, "--tokens", str(path)]
    swarm = stack.start(name, argv, stack.env())
    swarm.wait_for(rf"swarm: {len(tokens)} sessions established", timeout=300)


def _wait_connected(api: Api, count: int, timeout: float = 120) -> None:
    """Wait until the API records `count` agents connected; after `timeout`, go on if at least 99 % are
    (a job reaches an agent the gateway holds whether or not its presence was recorded), else fail."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=api.url, headers=api.auth, timeout=60) as http:
        while True:
            agents = http.get("/api/agents").json()
            up = sum(1 for a in agents if a["connected"])
            if up >= count:
                return
            if time.monotonic() > deadline:
                if up >= 0.99 * count:
                    print(f"note: {up} of {count} agents recorded connected after {timeout:g}s; going on")
                    return
                raise RuntimeError(f"only {up} of {count} agents recorded connected")
            time.sleep(0.5)


def fanout(root: Path, small: int = 1000, large: int = 10000, runs: int = 3) -> dict[str, Any]:
    """The figures of both phases (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    server = NatsServer(root, "nats-fanout")
    stack = Stack(root, server.url)
    name = asyncio.run(create_pg_database())
    out: dict[str, Any] = {"small": small, "large": large, "runs": runs}
    try:
        db_url = pg_url(name)
        api = stack.start_api(db_url, "fanout-api")
        gw1 = stack.start_gateway("fan-gw1")
        gw2 = stack.start_gateway("fan-gw2")
        tokens = asyncio.run(provision(db_url, large))
        hosts = sorted(tokens)
        half = large // 2
        _swarm(stack, root, "swarm-a", gw1.url, {h: tokens[h] for h in hosts[:small]})
        _wait_connected(api, small)
        measured = _measure(api, server, stack, hosts[:small], runs, False)
        out["small_raw"], out["small_job"], out["small_api"], out["small_202"] = measured
        print(f"fan-out to {small}: raw {out['small_raw']} job {out['small_job']}", flush=True)
        _swarm(stack, root, "swarm-b", gw1.url, {h: tokens[h] for h in hosts[small:half]})
        _swarm(stack, root, "swarm-c", gw2.url, {h: tokens[h] for h in hosts[half:]})
        _wait_connected(api, large)
        before = rss_kib(api.proc.pid)
        with PeakRss(api.proc.pid) as peak:
            measured = _measure(api, server, stack, hosts, runs, True)
        out["large_raw"], out["large_job"], out["large_api"], out["large_202"] = measured
        out["rss_before"], out["rss_peak"] = before, peak.peak
        return out
    finally:
        stack.close()
        server.stop()
        asyncio.run(drop_pg_database(name))


def _measure(
    api: Api, server: NatsServer, stack: Stack, hosts: list[str], runs: int, everyone: bool
) -> tuple[list[float], list[float], list[float], list[float]]:
    raw: list[float] = []
    job: list[float] = []
    span: list[float] = []
    accepted: list[float] = []
    job_fanout(api, hosts, everyone)  # warm up (first job pays for imports, statement caches)
    for _ in range(runs):
        raw.append(asyncio.run(raw_fanout(server.url, hosts, stack.signer)))
        took, api_span, answered = job_fanout(api, hosts, everyone)
        job.append(took)
        span.append(api_span)
        accepted.append(answered)
    return raw, job, span, accepted


def print_fanout(out: dict[str, Any]) -> None:
    """The fan-out table."""
    print(
        f"\n## Job fan-out of `true`, every outcome recorded (API on PostgreSQL; median of {out['runs']})\n"
    )
    print(
        "| agents | gateways | raw NATS s | job: POST → recorded s | API span s | 202 after s | job / raw |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, gateways, target in (("small", 1, 0.5), ("large", 2, 5.0)):
        raw = statistics.median(out[f"{key}_raw"])
        job = statistics.median(out[f"{key}_job"])
        span = statistics.median(out[f"{key}_api"])
        accepted = statistics.median(out[f"{key}_202"])
        row = f"| {out[key]:,} | {gateways} | {raw:.3f} | {job:.3f} (target ≤ {target}) | {span:.3f}"
        print(f"{row} | {accepted:.3f} | {job / raw:.2f}× |")
    print(
        f"\nAPI RSS during the {out['large']:,}-host job: peak {out['rss_peak'] / 1024:.0f} MiB "
        f"(idle before it {out['rss_before'] / 1024:.0f} MiB)."
    )
    print("\nAll runs (s): " + json.dumps({k: v for k, v in out.items() if isinstance(v, list)}))


# ----------------------------------------------------------------------------- 20 real agents and SSH


async def _ssh_fanout(sshd: Any, user: str, addresses: list[str], pooled: bool) -> float:
    """Seconds to run `true` on every address at once over SSH: fresh connections, or already open."""
    import asyncssh

    key = asyncssh.read_private_key(str(sshd.client_key_path))
    host_key = asyncssh.import_public_key(sshd.host_key_line)

    async def connect(address: str) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            address,
            sshd.port,
            username=user,
            client_keys=[key],
            known_hosts=([host_key], [], []),
            config=[],
            agent_path=None,
        )

    async def fresh(address: str) -> None:
        async with await connect(address) as conn:
            await conn.run("true", check=True)

    if not pooled:
        t0 = time.perf_counter()
        await asyncio.gather(*(fresh(a) for a in addresses))
        return time.perf_counter() - t0
    conns = await asyncio.gather(*(connect(a) for a in addresses))
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(c.run("true", check=True) for c in conns))
        return time.perf_counter() - t0
    finally:
        for c in conns:
            c.close()


def real_agents(root: Path, count: int = 20, runs: int = 5) -> dict[str, Any]:
    """Job to `count` real agents beside raw asyncssh (fresh, pooled) to the same hosts; seconds each."""
    from bench.rest import plain_shell_user
    from tests.support.sshd import Sshd

    root.mkdir(parents=True, exist_ok=True)
    user = plain_shell_user()
    addresses = [f"127.0.0.{i}" for i in range(1, count + 1)]
    sshd = Sshd(root / "sshd", extra_config=["MaxStartups 100", "MaxSessions 100"])  # 20 at once
    for path, mode in ((root.parent, 0o711), (root, 0o711), (root / "sshd", 0o711)):
        path.chmod(mode)  # sshd reads authorized_keys as the (unprivileged) bench user
    sshd.authorized_keys_path.chmod(0o644)
    server = NatsServer(root, "nats-real")
    stack = Stack(root, server.url)
    name = asyncio.run(create_pg_database())
    out: dict[str, Any] = {"count": count, "runs": runs, "job": [], "fresh": [], "pooled": []}
    try:
        api = stack.start_api(pg_url(name), "real-api")
        gw = stack.start_gateway("real-gw")
        hosts = [f"real-{i:02d}" for i in range(1, count + 1)]
        with httpx.Client(base_url=api.url, headers=api.auth, timeout=60) as http:
            for host, address in zip(hosts, addresses, strict=True):
                body = {"id": host, "address": address, "ssh_port": sshd.port, "ssh_user": user}
                body.update(ssh_check=False, labels={"tier": "real"})
                answer = http.post("/api/hosts", json=body)
                if answer.status_code != 201:
                    raise RuntimeError(f"could not add {host}: {answer.text}")

        async def agents() -> None:
            for i, host in enumerate(hosts):
                await stack.start_known_agent(api, f"real-agent-{i}", host, [gw.url])

        asyncio.run(agents())
        _wait_connected(api, count)
        ssh_to = ["127.0.0.1"] * count
        job_fanout(api, hosts, False)  # warm up
        asyncio.run(_ssh_fanout(sshd, user, ssh_to, True))
        for _ in range(runs):
            out["job"].append(job_fanout(api, hosts, False)[0])
            out["fresh"].append(asyncio.run(_ssh_fanout(sshd, user, ssh_to, False)))
            out["pooled"].append(asyncio.run(_ssh_fanout(sshd, user, ssh_to, True)))
        return out
    finally:
        stack.close()
        sshd.stop()
        server.stop()
        asyncio.run(drop_pg_database(name))


def print_real_agents(out: dict[str, Any]) -> None:
    """The real-agents table."""
    count, runs = out["count"], out["runs"]
    print(f"\n## `true` on {count} real hosts at once (median of {runs}; one machine, loopback)\n")
    print("| path | s | × job |")
    print("| --- | ---: | ---: |")
    job = statistics.median(out["job"])
    for label, key in (
        ("Warlock job → real agents (every outcome recorded)", "job"),
        ("raw asyncssh, fresh connection per host", "fresh"),
        ("raw asyncssh, pooled connections", "pooled"),
    ):
        value = statistics.median(out[key])
        print(f"| {label} | {value:.3f} | {value / job:.2f}× |")
