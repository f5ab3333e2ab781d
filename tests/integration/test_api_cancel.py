"""``POST /api/commands/{id}/cancel`` in the API: which subject a cancel goes to, what it carries (signed),
and what each answer makes of the run. The gateway and SSH worker are nats-py responders with their real
identities (the permission matrix applies); they check the API's signature as the agent and worker do.
Both database backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.api.store.models import CommandRun, CommandStatus, Host, Via
from shared import signing, subjects
from shared.errors import ErrorCode
from shared.ids import HostId
from shared.natsx import error, reply
from shared.protocol import CancelAnswer, CancelRequest, Message, SshCancelRequest, decode_model
from tests.support.db import RunningApi, api_settings, running_api
from tests.support.natsserver import NatsServer

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHBpbm5lZGtleTAxMjM0NTY3ODlhYmNkZWZnaGlqa2xt"
Answer = Callable[[Message], Message | None]


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    settings = api_settings(tmp_path, nats_server.url, database)
    async with running_api(settings) as running:
        body = {"id": "h1", "address": "10.0.0.7", "ssh_check": False}
        assert (await running.client.post("/api/hosts", json=body, headers=running.auth)).status_code == 201
        async with running.state.sessions() as session:
            host = await session.get(Host, "h1")
            assert host is not None
            host.host_key = HOST_KEY
            session.add(host)
            await session.commit()
        yield running


@pytest.fixture
async def peers(nats_server: NatsServer) -> AsyncIterator[list[NATS]]:
    made: list[NATS] = []
    yield made
    for peer in made:
        await peer.close()


async def add_run(api: RunningApi, command_id: str, status: CommandStatus, via: Via | None = None) -> None:
    async with api.state.sessions() as session:
        session.add(
            CommandRun(command_id=command_id, host_id="h1", command="sleep 60", status=status, via=via)
        )
        await session.commit()


async def respond(
    nats_server: NatsServer, peers: list[NATS], subject: str, seen: list[Message], answer: Answer
) -> None:
    """Serve `subject` with the role that may (gateway: agent subjects, ssh-worker: ssh subjects); decode the
    request, check the API signed it (kind cancel / ssh_cancel, for h1) and answer `answer(request)`."""
    ssh = subject.startswith("warlock.ssh.")
    peer = await nats_server.connect("ssh-worker" if ssh else "gateway")
    peers.append(peer)

    async def handler(msg: Msg) -> None:
        request: CancelRequest | SshCancelRequest
        request = decode_model(SshCancelRequest, msg.data) if ssh else decode_model(CancelRequest, msg.data)
        signing.verify_command(
            "ssh_cancel" if ssh else "cancel",
            signing.signed_fields(request),
            request.signature,
            TRUSTED[0],
            HostId("h1"),
            max_ttl=3600,
        )
        seen.append(request)
        out = answer(request)
        if out is not None:
            await reply(peer, msg, out)

    await peer.subscribe(subject, cb=handler)
    await peer.flush()


TRUSTED: list[signing.TrustedKeys] = []


@pytest.fixture(autouse=True)
def trusted(api: RunningApi) -> None:
    TRUSTED[:] = [signing.TrustedKeys([api.state.signer.public_key])]


async def cancel(api: RunningApi, command_id: str) -> tuple[int, dict[str, Any]]:
    response = await api.client.post(f"/api/commands/{command_id}/cancel", headers=api.auth)
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def status_of(api: RunningApi, command_id: str) -> str:
    response = await api.client.get(f"/api/commands/{command_id}", headers=api.auth)
    return str(response.json()["status"])


async def test_an_exec_the_agent_never_got_is_cancelled_and_never_runs(
    api: RunningApi, nats_server: NatsServer, peers: list[NATS]
) -> None:
    """The cancel carries the exec's not-after (created_at + command_ttl, signed); the agent answers
    never_ran (its ledger now refuses the id): the pending run is recorded cancelled."""
    await add_run(api, "c1", CommandStatus.PENDING)
    seen: list[Message] = []
    await respond(
        nats_server,
        peers,
        subjects.agent_cancel("h1"),
        seen,
        lambda r: CancelAnswer(command_id="c1", state="never_ran"),
    )
    code, body = await cancel(api, "c1")
    assert code == 200, body
    assert body["status"] == "cancelled"
    assert "never ran" in body["error_description"]
    (request,) = seen
    assert isinstance(request, CancelRequest)
    async with api.state.sessions() as session:
        run = await session.get(CommandRun, "c1")
        assert run is not None
        want = run.created_at.timestamp() + api.settings.command_ttl
    assert request.exec_not_after == pytest.approx(want)


async def test_no_agent_session_falls_back_to_the_ssh_worker_with_the_signed_target(
    api: RunningApi, nats_server: NatsServer, peers: list[NATS]
) -> None:
    await add_run(api, "c2", CommandStatus.PENDING)
    seen: list[Message] = []
    await respond(
        nats_server,
        peers,
        subjects.ssh_cancel("h1"),
        seen,
        lambda r: CancelAnswer(command_id="c2", state="not_running"),
    )
    code, body = await cancel(api, "c2")
    assert code == 409, body
    assert (body["code"], body["run"]["status"]) == ("not_running", "pending")
    (request,) = seen
    assert isinstance(request, SshCancelRequest)
    assert (request.command_id, request.target.address, request.target.host_key) == (
        "c2",
        "10.0.0.7",
        HOST_KEY,
    )
    assert await status_of(api, "c2") == "pending"


async def test_a_run_routed_over_ssh_is_cancelled_over_ssh_only(
    api: RunningApi, nats_server: NatsServer, peers: list[NATS]
) -> None:
    """via ssh: the agent subject is not asked; the worker accepts; the run stays open (its result will
    settle it): 202 with Location once the wait is over."""
    await add_run(api, "c3", CommandStatus.PENDING, Via.SSH)
    agent_seen: list[Message] = []
    ssh_seen: list[Message] = []
    await respond(nats_server, peers, subjects.agent_cancel("h1"), agent_seen, lambda r: None)
    await respond(
        nats_server,
        peers,
        subjects.ssh_cancel("h1"),
        ssh_seen,
        lambda r: CancelAnswer(command_id="c3", state="accepted"),
    )
    response = await api.client.post("/api/commands/c3/cancel", headers=api.auth)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == "/api/commands/c3"
    assert response.json()["status"] == "pending"
    assert (len(agent_seen), len(ssh_seen)) == (0, 1)


async def test_finished_unknown_unreachable_and_refused(
    api: RunningApi, nats_server: NatsServer, peers: list[NATS]
) -> None:
    await add_run(api, "done", CommandStatus.SUCCEEDED, Via.AGENT)
    code, body = await cancel(api, "done")
    assert code == 409, body
    assert (body["code"], body["run"]["status"]) == ("finished", "succeeded")
    code, body = await cancel(api, "nope")
    assert code == 404, body

    await add_run(api, "lonely", CommandStatus.PENDING)  # no agent session, no SSH worker
    code, body = await cancel(api, "lonely")
    assert code == 503, body
    assert body["code"] == "unreachable"
    assert await status_of(api, "lonely") == "pending"

    await add_run(api, "old", CommandStatus.PENDING)
    seen: list[Message] = []
    why = "the agent (version 0.1) does not take cancels"
    await respond(
        nats_server, peers, subjects.agent_cancel("h1"), seen, lambda r: error(ErrorCode.UNAVAILABLE, why)
    )
    code, body = await cancel(api, "old")
    assert code == 502, body
    assert (body["code"], body["detail"], body["run"]["status"]) == ("unavailable", why, "pending")
