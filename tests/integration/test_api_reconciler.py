"""The reconciler settles runs a stopped API left pending, never re-runs them, and a late result still counts.

A real in-process API (its lifespan runs the reconciler) on SQLite and on PostgreSQL, a real nats-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from services.api.fleet.reconciler import ORPHANED, settle_orphans
from services.api.store.models import CommandRun, CommandStatus, utcnow
from shared import subjects
from shared.protocol import encode
from tests.support.db import RunningApi, api_settings, eventually, running_api
from tests.support.fakeagent import AgentKey, register_agent_key
from tests.support.natsserver import NatsServer

AGENT = AgentKey()


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API with a fast reconciler (every 0.2 s, no margin, 1 s graces) and host h1 with its agent key."""
    settings = api_settings(
        tmp_path,
        nats_server.url,
        database,
        reconcile_interval=0.2,
        reconcile_margin=0,
        exec_grace=1,
        ssh_grace=1,
    )
    async with running_api(settings) as running:
        body = {"id": "h1", "address": "10.0.0.7", "ssh_check": False}
        assert (await running.client.post("/api/hosts", json=body, headers=running.auth)).status_code == 201
        await register_agent_key(running, "h1", AGENT.public_key)
        yield running


async def _add_run(api: RunningApi, command_id: str, age_s: float, status: CommandStatus) -> None:
    async with api.state.sessions() as session:
        run = CommandRun(
            command_id=command_id,
            host_id="h1",
            command="id",
            timeout=30,
            requested_by="api-key:test",
            status=status,
            created_at=utcnow() - timedelta(seconds=age_s),
        )
        session.add(run)
        await session.commit()


async def _run(api: RunningApi, command_id: str) -> dict[str, object]:
    answer = await api.client.get(f"/api/commands/{command_id}", headers=api.auth)
    assert answer.status_code == 200
    body: dict[str, object] = answer.json()
    return body


async def test_orphaned_pending_run_is_settled_once_and_a_late_result_still_counts(
    api: RunningApi, nats_server: NatsServer
) -> None:
    """A pending run past timeout + grace becomes timed_out (orphaned: it may have run, never re-sent);
    a run still within its timeout stays pending; a finished run is untouched; a signed late result from
    the agent then settles the orphaned run."""
    await _add_run(api, "orphan", age_s=3600, status=CommandStatus.PENDING)
    await _add_run(api, "in-flight", age_s=5, status=CommandStatus.PENDING)
    await _add_run(api, "done", age_s=3600, status=CommandStatus.SUCCEEDED)

    async def orphan_settled() -> bool:
        return (await _run(api, "orphan"))["status"] == "timed_out"

    await eventually(orphan_settled)
    orphan = await _run(api, "orphan")
    assert (orphan["error_code"], orphan["timed_out"]) == (ORPHANED, True)
    assert "never re-sent" in str(orphan["error_description"])
    assert (await _run(api, "in-flight"))["status"] == "pending"
    assert (await _run(api, "done"))["status"] == "succeeded"
    # another pass (another API instance) finds nothing left to settle
    assert await settle_orphans(api.state.sessions, api.settings) == []

    gateway: NATS = await nats_server.connect("gateway")
    try:
        late = AGENT.result("h1", command_id="orphan", stdout="it ran\n")
        await gateway.publish(subjects.result("h1"), encode(late))
        await gateway.flush()

        async def late_recorded() -> bool:
            return (await _run(api, "orphan"))["status"] == "succeeded"

        await eventually(late_recorded)
    finally:
        await gateway.close()
    assert (await _run(api, "orphan"))["stdout"] == "it ran\n"


async def test_a_run_within_its_timeout_is_never_orphaned(api: RunningApi) -> None:
    """The deadline counts the run's own timeout: a 30 s command recorded 10 s ago is left alone, even by a
    pass that runs now."""
    await _add_run(api, "young", age_s=10, status=CommandStatus.PENDING)
    assert await settle_orphans(api.state.sessions, api.settings) == []
    assert (await _run(api, "young"))["status"] == "pending"
