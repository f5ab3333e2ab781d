"""Operator-signed exec on ``warlock.ops.<host>.exec``: verified by the API, recorded with the key's name,
run once like a REST exec (real nats-server, the API in-process, both databases).

The gateway and the SSH worker are fake responders that check the API's own signature (an agent never
trusts an operator key: the API re-signs) and answer with h1's agent key.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.ctl import admin
from shared import signing, subjects
from shared.ids import new_command_id
from shared.natsx import reply
from shared.protocol import ErrorReply, ExecRequest, ExecResult, decode_exec_reply, encode
from tests.support.db import RunningApi, api_settings, running_api
from tests.support.fakeagent import AgentKey, checked_request, register_agent_key
from tests.support.natsserver import NatsServer

AGENT = AgentKey()


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API with host h1 (agent key registered) and no SSH check."""
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as running:
        body = {"id": "h1", "address": "10.0.0.9", "ssh_check": False}
        assert (await running.client.post("/api/hosts", json=body, headers=running.auth)).status_code == 201
        await register_agent_key(running, "h1", AGENT.public_key)
        yield running


@pytest.fixture
async def operator(api: RunningApi, tmp_path: Path) -> SigningKey:
    """Operator key `alice`, made as `warlock signing-keys create alice --out FILE` does."""
    made = await admin.create_operator_key(api.settings, "alice", tmp_path / "alice.key")
    assert made.path.stat().st_mode & 0o777 == 0o600
    return signing.load_private(made.path)


@dataclass
class Identities:
    """Connections as the roles that really send and serve these subjects (the server enforces them)."""

    gateway: NATS
    worker: NATS
    operator: NATS


@pytest.fixture
async def ids(nats_server: NatsServer) -> AsyncIterator[Identities]:
    found = Identities(
        await nats_server.connect("gateway"),
        await nats_server.connect("ssh-worker"),
        await nats_server.connect("operator"),
    )
    yield found
    for client in (found.gateway, found.worker, found.operator):
        await client.close()


class FakeAgent:
    """Answers h1's agent subject after checking the API signed the request; records what it got."""

    def __init__(self, api: RunningApi, nc: NATS) -> None:
        self.api = api
        self.nc = nc
        self.seen: list[ExecRequest] = []

    async def start(self) -> FakeAgent:
        await self.nc.subscribe(subjects.agent_exec("h1"), cb=self._answer)
        await self.nc.flush()
        return self

    async def _answer(self, msg: Msg) -> None:
        request = checked_request(self.api, "h1", msg.data)  # raises (no answer) unless the API signed it
        self.seen.append(request)
        await reply(self.nc, msg, AGENT.result("h1", command_id=request.command_id, stdout="hi\n"))


def _signed(
    key: SigningKey,
    host: str = "h1",
    ttl: float = 60.0,
    now: float | None = None,
    **body: object,
) -> ExecRequest:
    values: dict[str, object] = {"command": "echo hi", "timeout": 5, "command_id": new_command_id()}
    values.update(body)
    request = ExecRequest.model_validate(values)
    sig = signing.sign_command(key, "ops_exec", signing.signed_fields(request), host, ttl, now)
    return request.model_copy(update={"signature": sig})


async def _ops(nc: NATS, request: ExecRequest | bytes, host: str = "h1") -> ExecResult | ErrorReply:
    data = request if isinstance(request, bytes) else encode(request)
    return decode_exec_reply((await nc.request(subjects.ops_exec(host), data, timeout=20)).data)


async def _runs(api: RunningApi) -> list[dict[str, object]]:
    runs: list[dict[str, object]] = (await api.client.get("/api/hosts/h1/commands", headers=api.auth)).json()
    return runs


async def test_operator_exec_runs_once_and_is_recorded_with_the_key_name(
    api: RunningApi, ids: Identities, operator: SigningKey
) -> None:
    """A signed ops exec reaches the agent once, signed by the API; the reply is the agent's result; the
    row says operator:alice. The same request again is a replay: typed error, nothing runs again."""
    agent = await FakeAgent(api, ids.gateway).start()
    request = _signed(operator)
    answer = await _ops(ids.operator, request)
    assert isinstance(answer, ExecResult)
    assert (answer.command_id, answer.exit_code, answer.stdout, answer.via) == (
        request.command_id,
        0,
        "hi\n",
        "agent",
    )
    assert [r.command_id for r in agent.seen] == [request.command_id]
    assert agent.seen[0].signature is not None
    assert agent.seen[0].signature.key_id == api.state.signer.key_id  # the API's key, not the operator's
    row = (await api.client.get(f"/api/commands/{request.command_id}", headers=api.auth)).json()
    assert (row["requested_by"], row["status"], row["via"], row["command"]) == (
        "operator:alice",
        "succeeded",
        "agent",
        "echo hi",
    )

    again = await _ops(ids.operator, request)
    assert isinstance(again, ErrorReply)
    assert again.code == "replay"
    assert len(agent.seen) == 1
    assert len(await _runs(api)) == 1


async def test_operator_exec_falls_back_to_ssh_signed_by_the_api(
    api: RunningApi, ids: Identities, operator: SigningKey
) -> None:
    """No agent session: the same command id goes to the SSH worker, signed (ssh_exec) by the API."""
    ssh_seen: list[ExecRequest] = []

    async def worker(msg: Msg) -> None:
        request = checked_request(api, "h1", msg.data)
        ssh_seen.append(request)
        answer = ExecResult(command_id=request.command_id or "", exit_code=2, duration_ms=1.0, via="ssh")
        await reply(ids.worker, msg, answer)

    await ids.worker.subscribe(subjects.ssh_exec("h1"), cb=worker)
    await ids.worker.flush()
    request = _signed(operator)
    answer = await _ops(ids.operator, request)
    assert isinstance(answer, ExecResult)
    assert (answer.exit_code, answer.via) == (2, "ssh")
    assert [r.command_id for r in ssh_seen] == [request.command_id]
    row = (await api.client.get(f"/api/commands/{request.command_id}", headers=api.auth)).json()
    assert (row["requested_by"], row["status"], row["via"]) == ("operator:alice", "failed", "ssh")


async def test_refused_operator_execs_run_nothing_and_record_nothing(
    api: RunningApi, ids: Identities, operator: SigningKey, tmp_path: Path
) -> None:
    """Unsigned (with the how-to), unknown key, tampered, other host, expired, no command id, unknown
    host: each a typed error; the agent sees nothing and no row is written."""
    agent = await FakeAgent(api, ids.gateway).start()
    unsigned = await _ops(ids.operator, b'{"command": "id"}')
    assert isinstance(unsigned, ErrorReply)
    assert unsigned.code == "unsigned"
    assert "warlock signing-keys create" in unsigned.description
    assert "warlock req" in unsigned.description

    stranger = await _ops(ids.operator, _signed(signing.generate()))
    assert isinstance(stranger, ErrorReply)
    assert stranger.code == "unknown_key"

    tampered = _signed(operator).model_copy(update={"command": "rm -rf /"})
    cases = {
        "bad_signature": (tampered, "h1"),
        "wrong_host": (_signed(operator, host="h2"), "h1"),
        "expired": (_signed(operator, now=time.time() - 600), "h1"),
        "bad_request": (_signed(operator, command_id=None), "h1"),
        "not_found": (_signed(operator, host="ghost"), "ghost"),
    }
    for code, (request, host) in cases.items():
        answer = await _ops(ids.operator, request, host)
        assert isinstance(answer, ErrorReply), code
        assert answer.code == code, answer.description
    garbage = await _ops(ids.operator, b"{nope")
    assert isinstance(garbage, ErrorReply)
    assert garbage.code == "bad_request"
    assert agent.seen == []
    assert await _runs(api) == []
    assert api.state.runner.rejections.count("operator exec") >= 4


async def test_revoked_operator_key_is_refused(
    api: RunningApi, ids: Identities, operator: SigningKey
) -> None:
    """After `warlock signing-keys revoke alice` the key's commands are forbidden (nothing runs); list
    shows it."""
    agent = await FakeAgent(api, ids.gateway).start()
    assert isinstance(await _ops(ids.operator, _signed(operator)), ExecResult)
    revoked = await admin.revoke_operator_key(api.settings, "alice")
    assert revoked.revoked_at is not None
    answer = await _ops(ids.operator, _signed(operator))
    assert isinstance(answer, ErrorReply)
    assert answer.code == "forbidden"
    assert "revoked" in answer.description
    assert len(agent.seen) == 1
    assert len(await _runs(api)) == 1
    listed = await admin.list_operator_keys(api.settings)
    assert [(k.name, k.revoked_at is not None) for k in listed] == [("alice", True)]
