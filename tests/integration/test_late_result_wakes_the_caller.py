"""A late result wakes the caller still waiting on its request: a real `warlock-api` (SQLite) and
nats-server; the gateway is played by a NATS client that takes the exec request and, as a gateway that
moved to another NATS node does (nats-server lets only the receiving connection reply), publishes the
agent's signed result on ``warlock.result.<host>`` instead of replying. The REST caller gets the recorded
``succeeded`` row at once, not a ``timed_out`` after the command's timeout and grace (a loaded CI run's
fault test stalled 7 s on exactly this)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from nats.aio.msg import Msg

from services.api.store import crud
from services.api.store.db import make_engine, sessionmaker
from shared import subjects
from shared.protocol import encode
from tests.support.db import fresh_database
from tests.support.fakeagent import AgentKey
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e


async def test_a_late_result_answers_the_waiting_caller_at_once(
    stack: Stack, nats_server: NatsServer, tmp_path: Path
) -> None:
    agent = AgentKey()
    async with fresh_database("sqlite", tmp_path) as db_url:
        api = stack.start_api(db_url)
        engine = make_engine(db_url)
        gateway = await nats_server.connect("gateway")
        try:
            async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http:
                added = await http.post(
                    "/api/hosts", json={"id": "web1", "address": "10.0.0.1", "ssh_check": False}
                )
                assert added.status_code == 201, added.text
                async with sessionmaker(engine)() as session:
                    await crud.set_agent_public_key(session, "web1", agent.public_key)

                async def moved_gateway(msg: Msg) -> None:
                    command_id = json.loads(msg.data)["command_id"]
                    late = agent.result("web1", command_id=command_id, stdout="ran once\n", exit_code=0)
                    await gateway.publish(subjects.result("web1"), encode(late))  # no reply

                await gateway.subscribe(subjects.agent_exec("web1"), cb=moved_gateway)
                await gateway.flush()
                began = time.monotonic()
                answer = await http.post("/api/hosts/web1/exec", json={"command": "true", "timeout": 10})
                took = time.monotonic() - began
                assert answer.status_code == 200, answer.text
                body = answer.json()
                assert (body["status"], body["via"], body["exit_code"], body["stdout"]) == (
                    "succeeded",
                    "agent",
                    0,
                    "ran once\n",
                ), body
                assert took < 5, f"the caller waited {took:.1f}s (timeout 10 s + grace) for a settled run"
                stored = (await http.get(f"/api/commands/{body['command_id']}")).json()
                assert (stored["status"], stored["stdout"]) == ("succeeded", "ran once\n")
        finally:
            await gateway.drain()
            await engine.dispose()
