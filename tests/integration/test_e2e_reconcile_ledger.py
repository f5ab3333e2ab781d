"""Runs left pending by a killed API are settled from the agent's ledger, with the agent's verified answer.

Real `warlock-api` (SQLite), gateway and agent processes on a real nats-server with the permission matrix:

- a command the agent ran while its API was SIGKILLed (nobody heard its result) is settled by the next API's
  reconciler with the agent's signed result, and it ran once;
- a run that never reached the agent is settled failed / ``never_ran``, and the agent now refuses its id;
- answers a fake responder (a NATS client with the gateway's identity) forges, unsigned or signed with
  another key, settle nothing: those runs reach the deadline rule (``orphaned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.msg import Msg

from services.api.settings import ApiSettings
from services.api.store.models import utcnow
from services.api.store.runstore import sqlite_datetime
from services.ctl import admin
from shared import signing, subjects
from shared.ids import CommandId
from shared.protocol import ExecResult, ResultAnswer, ResultQuery, decode_model, encode
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e


def _rows(db: Path, host: str) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM command_run WHERE host_id = ? ORDER BY created_at", (host,))
        return [dict(row) for row in rows]


def _insert_pending(
    db: Path, host: str, command_id: str, age_s: float, timeout: float, via: str | None = None
) -> None:
    created = sqlite_datetime(utcnow() - timedelta(seconds=age_s))
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
        conn.execute(
            "INSERT INTO command_run (command_id, host_id, command, timeout, requested_by, status, stdout,"
            " stderr, truncated, created_at, via)"
            " VALUES (?, ?, 'true', ?, 'test', 'pending', '', '', 0, ?, ?)",
            (command_id, host, timeout, created, via),
        )


async def _add_host(
    http: httpx.AsyncClient, host: str, address: str, settings: ApiSettings, public_key: str
) -> None:
    added = await http.post("/api/hosts", json={"id": host, "address": address, "ssh_check": False})
    assert added.status_code == 201, added.text
    await admin.register_agent_key(settings, host, public_key)


async def test_runs_left_pending_are_settled_from_the_agents_ledger(
    stack: Stack, nats_server: NatsServer, tmp_path: Path
) -> None:
    db = tmp_path / "api.db"
    db_url = f"sqlite+aiosqlite:///{db}"
    settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
    ran = tmp_path / "ran.txt"
    forger_key = signing.generate()
    # a reconciler that asks after 1 s and passes every 0.3 s; deadlines at timeout + 1 s
    api1 = stack.start_api(
        db_url,
        "api",
        reconcile_interval="0.3",
        reconcile_query_after="1",
        reconcile_margin="0",
        exec_grace="1",
        ssh_grace="1",
    )
    gateway = stack.start_gateway()
    async with httpx.AsyncClient(base_url=api1.url, headers=api1.auth, timeout=30) as http:
        identity = tmp_path / "box-agent.key"
        key, _ = signing.ensure_private(identity)
        await _add_host(http, "box", "127.0.0.1", settings, signing.public_text(key))
        await _add_host(
            http, "fake", "127.0.0.2", settings, signing.public_text(signing.generate())
        )  # no agent: forgers
        token = await asyncio.to_thread(stack.agent_token, api1, "box")
        agent = await asyncio.to_thread(
            stack.start_agent, "box-agent", "box", token, [gateway.url], identity_key_file=str(identity)
        )
        deadline = time.monotonic() + 10
        while not (await http.get("/api/agents/box")).json()["connected"]:
            assert time.monotonic() < deadline, "the agent never read connected"
            await asyncio.sleep(0.1)
        command = f"echo ran >> {ran}; sleep 1.5; echo hi"
        caller = asyncio.create_task(
            http.post("/api/hosts/box/exec", json={"command": command, "timeout": 30})
        )
        deadline = time.monotonic() + 10
        while not ran.exists():
            assert time.monotonic() < deadline, "the command never started"
            await asyncio.sleep(0.05)
        api1.proc.signal(signal.SIGKILL)  # mid-command: nobody will hear its result
        with contextlib.suppress(httpx.HTTPError):
            await caller
    api1.proc.stop(timeout=5)
    [left] = _rows(db, "box")
    assert left["status"] == "pending"
    ledger = tmp_path / "box-agent-ledger.jsonl"
    deadline = time.monotonic() + 10
    while (
        f'"id":"{left["command_id"]}"' not in ledger.read_text() or '"state":"done"' not in ledger.read_text()
    ):
        assert time.monotonic() < deadline, "the agent never finished the command"
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    assert _rows(db, "box")[0]["status"] == "pending"  # no late result settled it: only the ledger knows

    _insert_pending(db, "box", "never-1", age_s=2, timeout=5)  # never sent: not in the agent's ledger
    _insert_pending(db, "box", "ssh-1", age_s=2, timeout=3, via="ssh")  # routed over SSH: never asked
    _insert_pending(db, "fake", "forged-1", age_s=3, timeout=1)
    _insert_pending(db, "fake", "forged-2", age_s=3, timeout=1)

    # a responder with the gateway's identity answers every query about "fake": unsigned, then forged
    gw_nc = await nats_server.connect("gateway")
    queries: list[ResultQuery] = []

    async def forge(msg: Msg) -> None:
        query = decode_model(ResultQuery, msg.data)
        queries.append(query)
        if len(queries) % 2:  # unsigned "never ran"
            answer = ResultAnswer(query_id=query.query_id, command_id=query.command_id, state="never_ran")
        else:  # a result signed with a key that is not the host's
            result = ExecResult(command_id=query.command_id, exit_code=0, stdout="forged", duration_ms=1.0)
            answer = ResultAnswer(
                query_id=query.query_id,
                command_id=query.command_id,
                state="done",
                result=signing.sign_result(forger_key, "fake", result),
            )
            answer = signing.sign_answer(forger_key, "fake", answer)
        await msg.respond(encode(answer))

    sub = await gw_nc.subscribe(subjects.agent_result("fake"), cb=forge)
    try:
        api2 = stack.start_api(
            db_url,
            "api2",
            reconcile_interval="0.3",
            reconcile_query_after="1",
            reconcile_margin="0",
            exec_grace="1",
            ssh_grace="1",
        )
        deadline = time.monotonic() + 20
        while True:
            box = {row["command_id"]: row for row in _rows(db, "box")}
            fake = {row["command_id"]: row for row in _rows(db, "fake")}
            if all(row["status"] != "pending" for row in (*box.values(), *fake.values())):
                break
            assert time.monotonic() < deadline, f"still pending: {box} {fake}"
            await asyncio.sleep(0.2)
    finally:
        await sub.unsubscribe()
        await gw_nc.close()

    settled = box[left["command_id"]]
    assert (settled["status"], settled["via"], settled["exit_code"], settled["stdout"]) == (
        "succeeded",
        "agent",
        0,
        "hi\n",
    )
    never = box["never-1"]
    assert (never["status"], never["error_code"]) == ("failed", "never_ran"), never
    ledger_records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert {"id": "never-1", "state": "used"}.items() <= next(
        r for r in ledger_records if r["id"] == "never-1"
    ).items()
    routed = box["ssh-1"]
    assert (routed["status"], routed["error_code"]) == ("timed_out", "orphaned"), routed
    assert '"id":"ssh-1"' not in ledger.read_text()  # the agent was never asked about it
    assert ran.read_text() == "ran\n"  # ran once: the reconciler only asked
    assert agent.count(r"result query \S+ about command") >= 2

    assert len(queries) >= 2  # both forgeries were received and answered ...
    for command_id in ("forged-1", "forged-2"):
        row = fake[command_id]
        assert (row["status"], row["error_code"], row["stdout"]) == (
            "timed_out",
            "orphaned",
            "",
        )  # ... to no avail
    assert "result answer from fake not accepted" in api2.proc.log()
    assert {q.command_id for q in queries} == {CommandId("forged-1"), CommandId("forged-2")}
