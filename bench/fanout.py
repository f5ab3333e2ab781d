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


def job_fanout(api: Api, hosts: list[str], everyone: bool) -> tuple[float, float]:
    """Seconds from POST /api/jobs to every outcome recorded, and the API's own span; targets: all hosts
    (`everyone`) or the list `hosts`."""
    count = len(hosts)
    targets: dict[str, Any] = {"all": True} if everyone else {"hosts": hosts}
    with httpx.Client(base_url=api.url, headers=api.auth, timeout=120) as http:
        t0 = time.perf_counter()
        answer = http.post("/api/jobs", json={"command": "true", "timeout": 30, "targets": targets})
        if answer.status_code != 202:
            raise RuntimeError(f"job refused: {answer.status_code} {answer.text[:300]}")
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
    return took, finished - created


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
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=api.url, headers=api.auth, timeout=60) as http:
        while True:
            agents = http.get("/api/agents").json()
            up = sum(1 for a in agents if a["connected"])
            if up >= count:
                return
            if time.monotonic() > deadline:
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
        out["small_raw"], out["small_job"], out["small_api"] = _measure(
            api, server, stack, hosts[:small], runs, False
        )
        print(f"fan-out to {small}: raw {out['small_raw']} job {out['small_job']}", flush=True)
        _swarm(stack, root, "swarm-b", gw1.url, {h: tokens[h] for h in hosts[small:half]})
        _swarm(stack, root, "swarm-c", gw2.url, {h: tokens[h] for h in hosts[half:]})
        _wait_connected(api, large)
        before = rss_kib(api.proc.pid)
        with PeakRss(api.proc.pid) as peak:
            out["large_raw"], out["large_job"], out["large_api"] = _measure(
                api, server, stack, hosts, runs, True
            )
        out["rss_before"], out["rss_peak"] = before, peak.peak
        return out
    finally:
        stack.close()
        server.stop()
        asyncio.run(drop_pg_database(name))


def _measure(
    api: Api, server: NatsServer, stack: Stack, hosts: list[str], runs: int, everyone: bool
) -> tuple[list[float], list[float], list[float]]:
    raw: list[float] = []
    job: list[float] = []
    span: list[float] = []
    job_fanout(api, hosts, everyone)  # warm up (first job pays for imports, statement caches)
    for _ in range(runs):
        raw.append(asyncio.run(raw_fanout(server.url, hosts, stack.signer)))
        took, api_span = job_fanout(api, hosts, everyone)
        job.append(took)
        span.append(api_span)
    return raw, job, span


def print_fanout(out: dict[str, Any]) -> None:
    """The fan-out table."""
    print(
        f"\n## Job fan-out of `true`, every outcome recorded (API on PostgreSQL; median of {out['runs']})\n"
    )
    print(
        "| agents | gateways | raw NATS s | job (POST → all recorded) s | API span s | job / raw | target |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, gateways, target in (("small", 1, 0.5), ("large", 2, 5.0)):
        raw = statistics.median(out[f"{key}_raw"])
        job = statistics.median(out[f"{key}_job"])
        span = statistics.median(out[f"{key}_api"])
        row = f"| {out[key]:,} | {gateways} | {raw:.3f} | {job:.3f} | {span:.3f} | {job / raw:.2f}×"
        print(f"{row} | ≤ {target} s |")
    print(
        f"\nAPI RSS during the {out['large']:,}-host job: peak {out['rss_peak'] / 1024:.0f} MiB "
        f"(idle before it {out['rss_before'] / 1024:.0f} MiB)."
    )
    print("\nAll runs (s): " + json.dumps({k: v for k, v in out.items() if isinstance(v, list)}))
