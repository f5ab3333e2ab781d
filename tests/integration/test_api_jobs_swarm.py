"""A job fanned out to 200 swarm agents through the real stack: the API process on PostgreSQL, a real
gateway, signed swarm agents (`services.dev.swarm`); 200 outcomes recorded within a generous bound, each
via agent and verified (a host whose registered key is not its agent's gets no result recorded)."""

from __future__ import annotations

import asyncio
import contextlib
import time
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
COUNT = 200
BOUND_S = 10.0  # generous: ~0.2 s here when the machine is idle


async def _connected(http: httpx.AsyncClient) -> int:
    answer = await http.get("/api/agents")
    assert answer.status_code == 200, answer.text
    return sum(1 for a in answer.json() if a["connected"])


async def test_job_to_200_swarm_agents_records_200_outcomes(stack: Stack, tmp_path: Path) -> None:
    async with fresh_database("postgresql", tmp_path) as db_url:
        api = stack.start_api(db_url)
        gateway = stack.start_gateway()
        tokens = await provision(db_url, COUNT, tmp_path / "swarm.json")
        swarm = Swarm(gateway.url, {HostId(h): t for h, t in tokens.items()}, concurrency=50)
        task = asyncio.create_task(swarm.run())
        try:
            async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http:
                for _ in range(600):
                    if await _connected(http) == COUNT:
                        break
                    await asyncio.sleep(0.1)
                assert await _connected(http) == COUNT
                t0 = time.monotonic()
                created = await http.post(
                    "/api/jobs", json={"command": "true", "targets": {"labels": {"fleet": "swarm"}}}
                )
                assert created.status_code == 202, created.text
                job_id = created.json()["job_id"]
                while True:
                    job = (await http.get(f"/api/jobs/{job_id}")).json()
                    if job["finished_at"] is not None and job["counts"]["pending"] == 0:
                        break
                    assert time.monotonic() - t0 < BOUND_S, job["counts"]
                    await asyncio.sleep(0.05)
                assert job["counts"]["succeeded"] == COUNT, job["counts"]
                assert {o["host_id"] for o in job["outcomes"]} == set(tokens)
                assert {(o["status"], o["via"], o["exit_code"]) for o in job["outcomes"]} == {
                    ("succeeded", "agent", 0)
                }
                # the results counted because they verified: a host whose key is not its agent's fails
                forged = sorted(tokens)[0]
                await _replace_key(db_url, forged)
                again = await http.post("/api/jobs", json={"command": "true", "targets": {"hosts": [forged]}})
                assert again.status_code == 202, again.text
                for _ in range(200):
                    one = (await http.get(f"/api/jobs/{again.json()['job_id']}")).json()
                    if one["finished_at"] is not None:
                        break
                    await asyncio.sleep(0.05)
                outcome = one["outcomes"][0]
                assert (outcome["status"], outcome["error_code"]) == ("timed_out", "bad_signature"), outcome
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stack.close()


async def _replace_key(database_url: str, host: str) -> None:
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            other = signing.public_text(signing.generate())
            table = AgentConnection.__table__  # type: ignore[attr-defined]
            await conn.execute(update(table).where(table.c.host_id == host).values(public_key=other))
    finally:
        await engine.dispose()
