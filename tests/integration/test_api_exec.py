"""The hybrid runner through REST: agent first, SSH only on no responders, never re-sent after a timeout.

The gateway and the SSH worker are played by plain nats-py responders that count what they receive; they
check the API's signature as a real agent and worker do, and the agent's results are signed with an agent
key the API knows (`tests.support.fakeagent`). Forged results never settle a row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.api.store.models import CommandRun
from shared import subjects
from shared.errors import ErrorCode
from shared.natsx import error, reply
from shared.protocol import ExecRequest, ExecResult, SshExecRequest, decode_model, encode
from tests.support.db import (
    BACKENDS,
    RunningApi,
    api_settings,
    drop_pg_database,
    eventually,
    fresh_database,
    running_api,
)
from tests.support.fakeagent import AgentKey, checked_request, register_agent_key
from tests.support.natsserver import NatsServer, connect

AGENT = AgentKey()  # h1's agent
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHBpbm5lZGtleTAxMjM0NTY3ODlhYmNkZWZnaGlqa2xt"


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API on the test's NATS and database, with a short grace so timeouts are quick."""
    settings = api_settings(tmp_path, nats_server.url, database, exec_grace=0.5, max_output_chars=100)
    async with running_api(settings) as running:
        await _add_host(running, nats_server)
        await register_agent_key(running, "h1", AGENT.public_key)
        _API.append(running)
        yield running
        _API.remove(running)


_API: list[RunningApi] = []  # the API under test, for `_result`'s signature check


async def _add_host(api: RunningApi, nats_server: NatsServer) -> None:
    """Register host h1 (10.0.0.7) and pin its key as an SSH check would (the probe is not this test's)."""
    from services.api.store.models import Host

    body = {"id": "h1", "address": "10.0.0.7", "ssh_check": False}
    response = await api.client.post("/api/hosts", json=body, headers=api.auth)
    assert response.status_code == 201, response.text
    async with api.state.sessions() as session:
        host = await session.get(Host, "h1")
        assert host is not None
        host.host_key = HOST_KEY
        session.add(host)
        await session.commit()


Handler = Callable[[Msg], Awaitable[None]]


async def _responder(nc: NATS, subject: str, seen: list[bytes], answer: Handler | None) -> None:
    """Subscribe to `subject` with the identity that serves it (a gateway for ``warlock.agent.``, the SSH
    worker for ``warlock.ssh.``, both for ``warlock.>``), record every request, and answer with `answer`
    (None: never answer). Answers go through the connection that received the request (`peer_of`)."""
    roles = {
        "warlock.agent.": ["gateway"],
        "warlock.ssh.": ["ssh-worker"],
        "warlock.>": ["gateway", "ssh-worker"],
    }
    role_subjects = {"gateway": "warlock.agent.>", "ssh-worker": "warlock.ssh.>"}
    url = f"nats://{nc.connected_url.netloc}" if nc.connected_url else ""
    names = next((r for prefix, r in roles.items() if subject.startswith(prefix)), None)
    assert names is not None, f"no role serves {subject}"

    async def handler(msg: Msg) -> None:
        seen.append(msg.data)
        if answer is not None:
            await answer(msg)

    for role in names:
        peer = await connect(url, role)
        _PEERS.append(peer)
        await peer.subscribe(role_subjects[role] if subject == "warlock.>" else subject, cb=handler)
        await peer.flush()


@pytest.fixture
async def gw(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A gateway's identity: only gateways may publish late results and presence."""
    client = await nats_server.connect("gateway")
    yield client
    await client.close()


_PEERS: list[NATS] = []  # responders' connections, closed after each test


@pytest.fixture(autouse=True)
async def _close_peers(nats_server: NatsServer) -> AsyncIterator[None]:
    """Close the responders' connections while their server still runs."""
    yield
    while _PEERS:
        await _PEERS.pop().close()


def peer_of(msg: Msg) -> NATS:
    """The connection that received `msg` (only it may answer: allow_responses)."""
    client: NATS = msg._client
    return client


def _result(data: bytes, **fields: object) -> ExecResult:
    """The answer of a fake agent or worker to `data`, after checking the API signed it (else raise:
    the fake then never answers, and the test sees a timeout). The agent's result is signed by AGENT."""
    request = checked_request(_API[0], "h1", data)
    return AGENT.result("h1", command_id=request.command_id, **fields)


async def _exec(api: RunningApi, host: str = "h1", **body: object) -> dict[str, object]:
    body.setdefault("command", "uptime")
    response = await api.client.post(f"/api/hosts/{host}/exec", json=body, headers=api.auth)
    assert response.status_code == 200, response.text
    data: dict[str, object] = response.json()
    return data


async def test_exec_via_agent_records_pending_before_sending(api: RunningApi, nc: NATS) -> None:
    """The pending row is committed before the agent sees the request; the result is recorded."""
    seen: list[bytes] = []
    status_when_received: list[str | None] = []

    async def answer(msg: Msg) -> None:
        request = decode_model(ExecRequest, msg.data)
        async with api.state.sessions() as session:
            row = await session.get(CommandRun, request.command_id)
            status_when_received.append(None if row is None else row.status)
        await reply(peer_of(msg), msg, _result(msg.data, stdout="up 3 days\n", stderr="warn"))

    await _responder(nc, subjects.agent_exec("h1"), seen, answer)
    ssh_seen: list[bytes] = []
    await _responder(nc, subjects.ssh_exec("h1"), ssh_seen, None)
    data = await _exec(api, command="uptime", timeout=5)
    assert status_when_received == ["pending"]
    request = decode_model(ExecRequest, seen[0])
    assert request.command == "uptime"
    assert request.timeout == 5
    assert data["command_id"] == request.command_id
    assert data["via"] == "agent"
    assert data["status"] == "succeeded"
    assert data["exit_code"] == 0
    assert data["stdout"] == "up 3 days\n"
    assert data["timed_out"] is False
    assert data["requested_by"] == "api-key:bootstrap"
    assert ssh_seen == []
    stored = await api.client.get(f"/api/commands/{data['command_id']}", headers=api.auth)
    assert stored.json()["status"] == "succeeded"
    assert stored.json()["finished_at"] is not None


async def test_no_agent_falls_back_to_ssh_with_same_id_and_pinned_key(api: RunningApi, nc: NATS) -> None:
    """No responders on the agent subject: the same command id goes to SSH with the pinned target."""
    ssh_seen: list[bytes] = []

    async def answer(msg: Msg) -> None:
        await reply(peer_of(msg), msg, _result(msg.data, exit_code=3, via="ssh"))

    await _responder(nc, subjects.ssh_exec("h1"), ssh_seen, answer)
    data = await _exec(api, host="10.0.0.7", command="false")
    assert len(ssh_seen) == 1
    request = decode_model(SshExecRequest, ssh_seen[0])
    assert request.command_id == data["command_id"]
    assert request.target is not None
    assert request.target.host_key == HOST_KEY
    assert (request.target.address, request.target.port, request.target.username) == ("10.0.0.7", 22, "root")
    assert data["via"] == "ssh"
    assert data["status"] == "failed"
    assert data["exit_code"] == 3


async def test_silent_agent_times_out_and_is_never_sent_over_ssh(api: RunningApi, nc: NATS) -> None:
    """An agent that never answers: timed_out, and the SSH worker gets zero requests."""
    agent_seen: list[bytes] = []
    ssh_seen: list[bytes] = []
    await _responder(nc, subjects.agent_exec("h1"), agent_seen, None)
    await _responder(nc, subjects.ssh_exec("h1"), ssh_seen, None)
    data = await _exec(api, command="sleep 100", timeout=0.3)
    assert data["status"] == "timed_out"
    assert data["timed_out"] is True
    assert data["via"] == "agent"
    assert data["error_code"] == "timeout"
    assert len(agent_seen) == 1
    await asyncio.sleep(0.2)
    assert ssh_seen == []


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (ErrorCode.BUSY, "failed"),
        (ErrorCode.BAD_REQUEST, "failed"),
        (ErrorCode.UNAVAILABLE, "failed"),
        (ErrorCode.TIMEOUT, "timed_out"),
        (ErrorCode.DISCONNECTED, "timed_out"),
    ],
)
async def test_typed_agent_errors_never_fall_back(
    api: RunningApi, nc: NATS, code: ErrorCode, status: str
) -> None:
    """busy/bad_request/unavailable → failed; timeout/disconnected → timed_out; no SSH request either way."""
    ssh_seen: list[bytes] = []

    async def answer(msg: Msg) -> None:
        request = decode_model(ExecRequest, msg.data)
        await reply(peer_of(msg), msg, error(code, f"agent says {code}", request.command_id))

    await _responder(nc, subjects.agent_exec("h1"), [], answer)
    await _responder(nc, subjects.ssh_exec("h1"), ssh_seen, None)
    data = await _exec(api)
    assert data["status"] == status
    assert data["error_code"] == str(code)
    assert data["error_description"] == f"agent says {code}"
    assert data["via"] == "agent"
    assert ssh_seen == []


async def test_no_agent_and_no_worker_is_undeliverable(api: RunningApi) -> None:
    """No responders anywhere: undeliverable, recorded so."""
    data = await _exec(api)
    assert data["status"] == "undeliverable"
    assert data["via"] is None
    stored = await api.client.get(f"/api/commands/{data['command_id']}", headers=api.auth)
    assert stored.json()["status"] == "undeliverable"


async def test_output_is_capped_with_truncated_flag(api: RunningApi, nc: NATS) -> None:
    """Output beyond max_output_chars (100 here) is cut and flagged."""

    async def answer(msg: Msg) -> None:
        await reply(peer_of(msg), msg, _result(msg.data, stdout="x" * 500, stderr="short"))

    await _responder(nc, subjects.agent_exec("h1"), [], answer)
    data = await _exec(api)
    assert data["stdout"] == "x" * 100
    assert data["stderr"] == "short"
    assert data["truncated"] is True


async def test_host_commands_are_listed_newest_first(api: RunningApi, nc: NATS) -> None:
    """GET /api/hosts/{host}/commands lists runs newest first and honours limit."""

    async def answer(msg: Msg) -> None:
        await reply(peer_of(msg), msg, _result(msg.data))

    await _responder(nc, subjects.agent_exec("h1"), [], answer)
    ids = [(await _exec(api, command=f"echo {i}"))["command_id"] for i in range(3)]
    listed = await api.client.get("/api/hosts/10.0.0.7/commands", headers=api.auth)
    assert [r["command_id"] for r in listed.json()] == ids[::-1]
    limited = await api.client.get("/api/hosts/h1/commands", params={"limit": 2}, headers=api.auth)
    assert [r["command"] for r in limited.json()] == ["echo 2", "echo 1"]
    bad_limit = await api.client.get("/api/hosts/h1/commands", params={"limit": 0}, headers=api.auth)
    assert bad_limit.status_code == 422


async def test_late_result_settles_a_timed_out_run(gw: NATS, api: RunningApi, nc: NATS) -> None:
    """A result published on warlock.result.<host> after the timeout turns timed_out into its outcome."""
    await _responder(nc, subjects.agent_exec("h1"), [], None)
    data = await _exec(api, timeout=0.2)
    assert data["status"] == "timed_out"
    command_id = str(data["command_id"])
    wrong_host = AGENT.result("other", command_id=command_id, exit_code=9)
    await gw.publish(subjects.result("other"), encode(wrong_host))
    late = AGENT.result("h1", command_id=command_id, stdout="done", duration_ms=900.0)
    await gw.publish(subjects.result("h1"), encode(late))
    await gw.publish(subjects.result("h1"), b"{not json")

    async def settled() -> dict[str, object] | None:
        body = (await api.client.get(f"/api/commands/{command_id}", headers=api.auth)).json()
        return body if body["status"] != "timed_out" else None

    final = await eventually(settled)
    assert final["status"] == "succeeded"
    assert final["exit_code"] == 0
    assert final["stdout"] == "done"
    assert final["via"] == "agent"


async def test_database_gone_means_503_and_nothing_sent(
    tmp_path: Path, nats_server: NatsServer, nc: NATS
) -> None:
    """PostgreSQL database dropped under a running API: exec answers 503 and no request reaches NATS."""
    async with fresh_database("postgresql", tmp_path) as url:
        settings = api_settings(tmp_path, nats_server.url, url, auth_cache_ttl=60)
        async with running_api(settings) as api:
            await api.client.post(
                "/api/hosts", json={"id": "h1", "address": "10.0.0.7", "ssh_check": False}, headers=api.auth
            )
            assert (await api.client.get("/api/hosts", headers=api.auth)).status_code == 200  # key cached
            seen: list[bytes] = []
            await _responder(nc, subjects.agent_exec("h1"), seen, None)
            await _responder(nc, subjects.ssh_exec("h1"), seen, None)
            await drop_pg_database(url.rsplit("/", 1)[1])
            response = await api.client.post("/api/hosts/h1/exec", json={"command": "true"}, headers=api.auth)
            health = await api.client.get("/healthz")
    assert response.status_code == 503
    assert "detail" in response.json()
    assert health.status_code == 503
    assert health.json()["database"].startswith("error")
    await asyncio.sleep(0.1)
    assert seen == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_unreachable_database_at_start_is_503(
    tmp_path: Path, nats_server: NatsServer, nc: NATS, backend: str
) -> None:
    """An unreachable database URL: the API starts, answers 503 (JSON) and /healthz names the database."""
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}"  # a directory: cannot be opened as a database
    else:
        from services.dev.procs import free_port

        url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"
    seen: list[bytes] = []
    await _responder(nc, "warlock.>", seen, None)
    settings = api_settings(tmp_path, nats_server.url, url, db_retry_max=0.5)
    async with running_api(settings) as api:
        exec_response = await api.client.post(
            "/api/hosts/h1/exec", json={"command": "true"}, headers={"Authorization": "Bearer " + "a" * 64}
        )
        health = await api.client.get("/healthz")
    assert exec_response.status_code == 503
    assert "database" in exec_response.json()["detail"]
    assert health.status_code == 503
    assert health.json()["nats"] == "ok"
    assert health.json()["database"].startswith("error")
    assert [s for s in seen if b'"command"' in s] == []


def _forged(command_id: str | None, how: str) -> ExecResult:
    genuine = AGENT.result("h1", command_id=command_id, stdout="real")
    if how == "unsigned":
        return genuine.model_copy(update={"signature": None})
    if how == "edited-stdout":
        return genuine.model_copy(update={"stdout": "forged"})
    if how == "edited-exit-code":
        return genuine.model_copy(update={"exit_code": 1})
    assert how == "other-key"
    return AgentKey().result("h1", command_id=command_id, stdout="forged")


@pytest.mark.parametrize("how", ["unsigned", "edited-stdout", "edited-exit-code", "other-key"])
async def test_forged_result_never_settles_the_row(
    gw: NATS, api: RunningApi, nc: NATS, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply that is not the agent's own signed result: the row is timed_out with bad_signature (the
    command may have run; nothing of the forged output is kept), counted, logged once per host, and
    never re-sent over SSH. A genuine late result still settles it afterwards."""
    caplog.set_level(logging.WARNING, logger="services.api.fleet.verify")
    ssh_seen: list[bytes] = []

    async def answer(msg: Msg) -> None:
        await reply(peer_of(msg), msg, _forged(checked_request(api, "h1", msg.data).command_id, how))

    await _responder(nc, subjects.agent_exec("h1"), [], answer)
    await _responder(nc, subjects.ssh_exec("h1"), ssh_seen, None)
    first = await _exec(api, command="echo real")
    second = await _exec(api, command="echo real")
    for data in (first, second):
        assert (data["status"], data["error_code"], data["via"]) == ("timed_out", "bad_signature", "agent")
        assert (data["exit_code"], data["stdout"]) == (None, "")
        stored = (await api.client.get(f"/api/commands/{data['command_id']}", headers=api.auth)).json()
        assert (stored["status"], stored["stdout"]) == ("timed_out", "")
    assert ssh_seen == []
    assert api.state.runner.rejections.count("result", "h1") == 2
    assert caplog.text.count("result from h1 not accepted") == 1  # once per source, not per message

    forged_late = _forged(str(first["command_id"]), how)
    await gw.publish(subjects.result("h1"), encode(forged_late))
    late = AGENT.result("h1", command_id=str(first["command_id"]), stdout="late and real")
    await gw.publish(subjects.result("h1"), encode(late))

    async def settled() -> dict[str, object] | None:
        body = (await api.client.get(f"/api/commands/{first['command_id']}", headers=api.auth)).json()
        return body if body["status"] != "timed_out" else None

    final = await eventually(settled)
    assert (final["status"], final["stdout"]) == ("succeeded", "late and real")
    assert api.state.runner.rejections.count("late result", "h1") == 1


async def test_result_of_an_agent_without_a_registered_key_is_not_taken(
    api: RunningApi, nc: NATS, nats_server: NatsServer
) -> None:
    """A host whose agent key the API does not know: even a well-formed signed result does not count."""
    async with api.state.sessions() as session:
        from services.api.store import crud

        await crud.set_agent_public_key(session, "h1", AgentKey().public_key)  # re-installed elsewhere

    async def answer(msg: Msg) -> None:
        await reply(peer_of(msg), msg, _result(msg.data, stdout="from the old key"))

    await _responder(nc, subjects.agent_exec("h1"), [], answer)
    data = await _exec(api)
    assert (data["status"], data["error_code"], data["stdout"]) == ("timed_out", "bad_signature", "")
