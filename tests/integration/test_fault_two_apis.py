"""Two `warlock-api` processes on one PostgreSQL database and one NATS: both serve every endpoint, an agent's
presence is recorded once (the APIs share a queue group), and when one API is SIGKILLed mid-command the
other keeps serving and its reconciler settles the orphaned row, which is never re-run.

Real processes: nats-server with the permission matrix, two APIs, a gateway and a real agent.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.db import fresh_database
from tests.support.stack import Api, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

# The orphan deadline is created_at + timeout + max(exec_grace, ssh_grace) + reconcile_margin.
COMMAND_TIMEOUT_S = 5.0


def start_api(stack: Stack, db_url: str, name: str) -> Api:
    """An API whose reconciler looks every 0.5 s and orphans a run 1 s after the senders' waits."""
    return stack.start_api(
        db_url,
        name,
        exec_grace="1",
        ssh_grace="1",
        reconcile_margin="1",
        reconcile_interval="0.5",
        wheel_dir=str(stack.root / "wheels"),  # GET /api/agent-wheel builds one here, not in the tree
    )


ORPHAN_BOUND_S = COMMAND_TIMEOUT_S + 1 + 1 + 0.5 + 3.0  # deadline + one pass + slack for this machine
# The orphaned run ran to its end on the agent: the reconciler settles it from the agent's ledger, with the
# agent's own signed result (not `timed_out`/`orphaned`, which is for an agent that cannot say).
PRESENCE = re.compile(
    r"agent (\S+) of box \(session (\S+)\) recorded|presence (\S+) of box \(session (\S+)\) ignored"
)


FIXED_SINCE, FIXED_UNTIL = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"


def substitute(path: str, values: dict[str, str]) -> str | None:
    """`path` with its ``{param}``s filled from `values` (None when one is unknown)."""
    names = re.findall(r"{(\w+)}", path)
    if any(name not in values for name in names):
        return None
    return re.sub(r"{(\w+)}", lambda m: values[m.group(1)], path)


async def get_every_path(apis: list[tuple[Api, httpx.AsyncClient]], values: dict[str, str]) -> list[str]:
    """GET every parameter-free (or fillable) GET path of the OpenAPI document from each API: each answers
    it, with the same status and no 5xx, and the same body for hosts and runs. Returns the paths walked."""
    spec = (await apis[0][1].get("/openapi.json")).json()
    walked = []
    for path, operations in sorted(spec["paths"].items()):
        if "get" not in operations or path.startswith("/api/downloads"):  # downloads build a wheel
            continue
        url = substitute(path, values)
        if url is None:
            continue
        if path.endswith("/metrics"):  # a history's default range ends "now": give both the same range
            url += f"?since={FIXED_SINCE}&until={FIXED_UNTIL}"
        answers = [await http.get(url) for _, http in apis]
        statuses = [a.status_code for a in answers]
        assert statuses[0] == statuses[1], f"{url}: {statuses}"
        assert statuses[0] < 500, f"{url}: {statuses} {answers[0].text[:200]}"
        if path.startswith(("/api/hosts", "/api/commands")):  # stored data (agents' last-seen moves)
            assert answers[0].content == answers[1].content, url
        walked.append(url)
    return walked


async def presence_lines(apis: list[Api]) -> list[tuple[str, str]]:
    """(api name, presence line about box) across both APIs' logs."""
    found = []
    for api in apis:
        for match in PRESENCE.finditer(api.proc.log()):
            found.append((api.proc.name, match.group(0)))
    return found


async def test_two_apis_serve_record_presence_once_and_survive_a_kill(stack: Stack, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    async with fresh_database("postgresql", tmp_path) as db_url:
        api1 = start_api(stack, db_url, "api1")
        api2 = start_api(stack, db_url, "api2")
        assert api1.key == api2.key  # the second found the bootstrap key in the database and wrote nothing
        gateway = stack.start_gateway()
        async with (
            httpx.AsyncClient(base_url=api1.url, headers=api1.auth, timeout=30) as http1,
            httpx.AsyncClient(base_url=api2.url, headers=api2.auth, timeout=30) as http2,
        ):
            added = await http1.post(
                "/api/hosts", json={"id": "box", "address": "127.0.0.1", "ssh_check": False}
            )
            assert added.status_code == 201, added.text
            await stack.start_known_agent(api1, "box-agent", "box", [gateway.url])
            session = await until_connected(http2)

            # a presence event is recorded once, by one API (both are in the API queue group)
            await asyncio.sleep(1.0)  # time for a second instance to record it too, were it to
            lines = await presence_lines([api1, api2])
            mine = [line for line in lines if session in line[1]]
            assert len(mine) == 1, lines
            assert "recorded" in mine[0][1], lines

            # both run commands and answer every GET path
            ran = {}
            for name, http in (("api1", http1), ("api2", http2)):
                answer = await http.post("/api/hosts/box/exec", json={"command": f"echo via-{name}"})
                assert answer.status_code == 200, answer.text
                assert (answer.json()["status"], answer.json()["via"]) == ("succeeded", "agent"), answer.text
                ran[name] = answer.json()["command_id"]
            for http in (http1, http2):
                health = await http.post("/api/agents/box/health")
                assert health.status_code == 200, health.text
                assert health.json()["connected"], health.text
            values = {"host": "box", "host_id": "box", "command_id": ran["api1"], "ref": "box"}
            walked = await get_every_path([(api1, http1), (api2, http2)], values)
            assert {"/api/hosts", "/api/hosts/box", "/api/agents", "/api/agents/box"} <= set(walked), walked
            assert f"/api/commands/{ran['api1']}" in walked, walked
            assert "/api/hosts/box/commands" in walked, walked

            # SIGKILL api1 while its command runs on the host
            command = f"sleep 3; echo done-orphan >> {marks}"
            call = asyncio.create_task(
                http1.post("/api/hosts/box/exec", json={"command": command, "timeout": COMMAND_TIMEOUT_S})
            )
            orphan = await until_row(http2, command)
            await asyncio.sleep(0.5)  # delivered: the agent is running it
            api1.proc.signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(httpx.HTTPError):
                await call

            # the other API serves meanwhile: reads and a new command
            assert (await http2.get("/api/hosts/box")).status_code == 200
            other = await http2.post("/api/hosts/box/exec", json={"command": f"echo other >> {marks}"})
            assert other.json()["status"] == "succeeded", other.text

            settled = await until_settled(http2, orphan["command_id"], ORPHAN_BOUND_S)
            settled_after = time.monotonic() - killed
            orphan_status = settled["status"]
            assert (orphan_status, settled["via"], settled["stdout"]) == ("succeeded", "agent", ""), settled
            assert "api2" in [p.name for p in stack.procs]
            await asyncio.sleep(1.5)  # never re-run: not by the reconciler, not by anyone
            assert marks.read_text().split().count("done-orphan") == 1, marks.read_text()
            assert marks.read_text().split().count("other") == 1
            again = (await http2.get(f"/api/commands/{orphan['command_id']}")).json()
            assert again["status"] == orphan_status, again
            print(
                f"walked {len(walked)} GET paths on both APIs ({walked}); orphan settled {orphan_status} "
                f"({settled.get('error_code')}) {settled_after:.1f}s after the kill"
            )
        stack.close()


async def until_connected(http: httpx.AsyncClient) -> str:
    """Wait until box's agent reads connected; return its session id."""
    deadline = time.monotonic() + 15
    while True:
        state = (await http.get("/api/agents/box")).json()
        if state["connected"]:
            return str(state["session_id"])
        assert time.monotonic() < deadline, f"the agent never read connected: {state}"
        await asyncio.sleep(0.1)


async def until_row(http: httpx.AsyncClient, command: str) -> dict[str, Any]:
    """Wait for the pending row of `command` (any API's)."""
    deadline = time.monotonic() + 10
    while True:
        rows = (await http.get("/api/hosts/box/commands")).json()
        found = [row for row in rows if row["command"] == command]
        if found:
            assert found[0]["status"] == "pending", found[0]
            return dict(found[0])
        assert time.monotonic() < deadline, "the command was never recorded"
        await asyncio.sleep(0.05)


async def until_settled(http: httpx.AsyncClient, command_id: str, within: float) -> dict[str, Any]:
    """Wait until run `command_id` is no longer pending (at most `within` seconds)."""
    deadline = time.monotonic() + within
    while True:
        row: dict[str, Any] = (await http.get(f"/api/commands/{command_id}")).json()
        if row["status"] not in {"pending", "running"}:
            return row
        assert time.monotonic() < deadline, f"still {row['status']} after {within}s: {row}"
        await asyncio.sleep(0.1)
