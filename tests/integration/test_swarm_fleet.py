"""The swarm passes the trust checks: real API on PostgreSQL, real gateway, a swarm of 50 signed agents.

Hosts, tokens and agent keys are provisioned in bulk (`tests.support.fleet`). The API records an agent
connected only after the hello it passes through verifies with the host's key, and takes a result only if
it verifies too: one host whose registered key is not its agent's proves the check is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from services.api.store.db import make_engine
from services.api.store.models import AgentConnection
from services.dev.swarm import Swarm
from shared import signing
from shared.ids import HostId
from tests.support.db import fresh_database
from tests.support.fleet import provision
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e
COUNT = 50
FORGED = "swarm-00051"  # provisioned, then its registered key replaced: its agent's hello cannot verify


async def _replace_key(database_url: str, host: str) -> None:
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            other = signing.public_text(signing.generate())
            table = AgentConnection.__table__  # type: ignore[attr-defined]
            await conn.execute(update(table).where(table.c.host_id == host).values(public_key=other))
    finally:
        await engine.dispose()


async def _connected(http: httpx.AsyncClient) -> set[str]:
    answer = await http.get("/api/agents")
    assert answer.status_code == 200, answer.text
    return {a["host_id"] for a in answer.json() if a["connected"]}


async def test_swarm_agents_are_verified_and_serve_rest_exec(stack: Stack, tmp_path: Path) -> None:
    """50 swarm agents recorded connected by the API; a REST exec to one succeeds via agent, verified."""
    async with fresh_database("postgresql", tmp_path) as db_url:
        api = stack.start_api(db_url)
        gateway = stack.start_gateway()
        tokens = await provision(db_url, COUNT + 1, tmp_path / "swarm.json")
        assert len(tokens) == COUNT + 1
        assert FORGED in tokens
        await _replace_key(db_url, FORGED)
        swarm = Swarm(gateway.url, {HostId(h): t for h, t in tokens.items()}, concurrency=20)
        task = asyncio.create_task(swarm.run())
        try:
            async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
                expected = {h for h in tokens if h != FORGED}
                connected: set[str] = set()
                for _ in range(300):
                    connected = await _connected(http)
                    if connected >= expected:
                        break
                    await asyncio.sleep(0.1)
                assert connected == expected
                assert swarm.up == COUNT
                assert swarm.failures >= 1  # the forged host's hello was refused (and is retried)
                gateway.proc.wait_for(r"hello is not signed by this host's agent key")

                answer = await http.post("/api/hosts/swarm-00007/exec", json={"command": "true"})
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert (body["via"], body["status"], body["exit_code"]) == ("agent", "succeeded", 0), body
                recorded = (await http.get(f"/api/commands/{body['command_id']}")).json()
                assert (recorded["via"], recorded["status"]) == ("agent", "succeeded")
                assert FORGED not in await _connected(http)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stack.close()


async def test_swarm_metrics_reach_the_history(stack: Stack, tmp_path: Path) -> None:
    """`--metrics-interval`: every simulated agent's synthetic samples are stored, with the keepalive rtt."""
    async with fresh_database("postgresql", tmp_path) as db_url:
        api = stack.start_api(db_url)
        gateway = stack.start_gateway(ping_interval="0.2")
        tokens = await provision(db_url, 5, tmp_path / "swarm.json")
        swarm = Swarm(gateway.url, {HostId(h): t for h, t in tokens.items()}, metrics_interval=0.3)
        task = asyncio.create_task(swarm.run())
        try:
            async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
                waiting = set(tokens)
                for _ in range(100):
                    for host in sorted(waiting):
                        answer = await http.get(f"/api/hosts/{host}/metrics", params={"step": 30})
                        assert answer.status_code == 200, answer.text
                        points = answer.json()["points"]
                        if points and any(p["rtt_ms"] is not None for p in points):
                            assert all(0 <= p["cpu"] <= 100 and 0 < p["mem"] < 100 for p in points), points
                            waiting.discard(host)
                    if not waiting:
                        break
                    await asyncio.sleep(0.1)
                assert not waiting, f"no sample with an rtt from {sorted(waiting)}"
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stack.close()
