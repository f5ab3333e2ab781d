"""The attacks of issue 9, replayed against the real stack with the most tempting credentials.

Before NATS identities and signatures, an anonymous NATS client ran `id` as root on any host, forged the
results the API recorded, made a random token valid, re-keyed and kicked agents, and steered the SSH
worker. Here each attack is tried with the operator identity, a gateway identity, the API's own NATS
identity without its signing key, and an agent's own token; after each: nothing ran on the host (a marker
file), no row was forged, the agent kept its session and its token, sshd saw no login and an attacker's
listener no connection.

Real nats-server (permission matrix enforced), `warlock-api` (SQLite), gateway, agent, SSH worker, sshd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest
import websockets
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from websockets.asyncio.client import connect as ws_connect

from services.api.settings import ApiSettings
from services.ctl import admin
from services.dev.procs import Proc
from shared import signing, subjects
from shared.ids import new_command_id
from shared.protocol import (
    ExecRequest,
    ExecResult,
    Hello,
    RotateRequest,
    SessionClaim,
    SshExecRequest,
    SshProbeRequest,
    SshTarget,
    TokenOk,
    TokenRevoked,
    encode,
)
from shared.tokens import generate_token
from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd
from tests.support.stack import Api, Gateway, Stack

pytestmark = pytest.mark.e2e

ROLES_TRIED = ("operator", "gateway")  # the identities an attacker is most likely to hold
FORGED = "forged-output\n"


@dataclass
class Fleet:
    """Host `box`: agent through a real gateway, SSH through the real worker, behind a real API."""

    stack: Stack
    server: NatsServer
    api: Api
    gateway: Gateway
    http: httpx.AsyncClient
    sshd: Sshd
    agent: Proc
    agent_config: Path
    marker: Path
    token: str

    async def rest_exec(self, command: str) -> dict[str, Any]:
        answer = await self.http.post("/api/hosts/box/exec", json={"command": command, "timeout": 10})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def touch(self) -> str:
        """The command every attack tries to run: it would leave the marker file."""
        return f"touch {self.marker}"


@dataclass
class Attacker:
    """A NATS connection as `role`, collecting the server's permission errors."""

    role: str
    nc: NATS
    errors: list[str] = field(default_factory=list)

    async def synced_errors(self) -> list[str]:
        """The permission errors so far, once the server has processed everything sent."""
        with contextlib.suppress(nats.errors.Error):
            await self.nc.flush(timeout=2)
            await self.nc.flush(timeout=2)
        return list(self.errors)

    async def request(self, subject: str, body: bytes, timeout: float = 2.0) -> bytes | None:
        """A request's reply, or None when nothing answered (refused by the server, or no responder)."""
        try:
            msg = await self.nc.request(subject, body, timeout=timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return None
        data: bytes = msg.data
        return data


async def attacker(server: NatsServer, role: str) -> Attacker:
    found: list[str] = []

    async def on_error(exc: Exception) -> None:
        found.append(str(exc))

    nc = await server.connect(role, error_cb=on_error, max_reconnect_attempts=0)
    return Attacker(role, nc, found)


def denied(errors: list[str], subject: str) -> bool:
    return any("permissions violation" in e.lower() and subject.lower() in e.lower() for e in errors)


@pytest.fixture
async def fleet(stack: Stack, nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Fleet]:
    sshd = Sshd(tmp_path / "sshd")
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
    try:
        api = stack.start_api(db_url)
        stack.start_fallback(sshd.client_key_path)
        gateway = stack.start_gateway()
        async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http:
            body = {"id": "box", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_user": sshd.username}
            added = await http.post("/api/hosts", json=body)
            assert added.status_code == 201, added.text
            token = await asyncio.to_thread(stack.agent_token, api, "box")
            identity = tmp_path / "box-agent.key"
            agent_key, _ = signing.ensure_private(identity)
            settings = ApiSettings(database_url=db_url, api_key_file=tmp_path / "unused-api-key")
            await admin.register_agent_key(settings, "box", signing.public_text(agent_key))
            agent = await asyncio.to_thread(
                stack.start_agent, "box-agent", "box", token, [gateway.url], identity_key_file=str(identity)
            )
            fleet = Fleet(
                stack,
                nats_server,
                api,
                gateway,
                http,
                sshd,
                agent,
                tmp_path / "box-agent.conf",
                tmp_path / "pwned",
                token,
            )
            for _ in range(100):
                state = await http.get("/api/agents/box")
                if state.json().get("connected"):
                    break
                await asyncio.sleep(0.1)
            assert (await fleet.rest_exec("echo ready"))["via"] == "agent"
            yield fleet
    finally:
        stack.close()
        sshd.stop()


def listener() -> tuple[socket.socket, int]:
    """An attacker's TCP listener on loopback: the worker must never connect to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    return sock, sock.getsockname()[1]


def connections(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


async def test_nats_credentials_alone_run_nothing_rekey_nothing_and_dial_nothing(fleet: Fleet) -> None:
    """Operator and gateway identities are refused by the server; the API identity without the API's
    signing key gets typed `unsigned` errors from the agent and the worker. Nothing runs, no agent is
    re-keyed or kicked, the worker dials nothing, and no role can read the whole bus."""
    token_before = fleet.agent_config.read_text()
    logins_before = fleet.sshd.accepted_logins()
    trap, trap_port = listener()
    target = SshTarget(address="127.0.0.1", port=trap_port, username="root")
    exec_body = encode(ExecRequest(command=fleet.touch(), command_id=new_command_id()))
    attempts: list[tuple[str, bytes]] = [
        (subjects.agent_exec("box"), exec_body),
        (subjects.agent_rotate("box"), encode(RotateRequest(command_id=new_command_id()))),
        (
            subjects.ssh_exec("box"),
            encode(SshExecRequest(command=fleet.touch(), command_id=new_command_id(), target=target)),
        ),
        (
            subjects.SSH_PROBE,
            encode(SshProbeRequest(host_id="box", address="127.0.0.1", port=trap_port, username="root")),
        ),
    ]
    spoofs: list[tuple[str, bytes]] = [
        (subjects.TOKEN_REVOKED, encode(TokenRevoked(host_id="box"))),
        (
            subjects.session_claim("box"),
            encode(SessionClaim(host_id="box", session_id="x" * 32, gateway_id="evil", connected_at=9e9)),
        ),
    ]
    seen_everything: list[Msg] = []

    async def collect(msg: Msg) -> None:
        seen_everything.append(msg)

    for role in ROLES_TRIED:
        bad = await attacker(fleet.server, role)
        await bad.nc.subscribe(">", cb=collect)
        for subject, body in attempts:
            assert await bad.request(subject, body) is None, (role, subject)
        for subject, body in spoofs:
            if role == "gateway" and subject.endswith(".claim"):
                continue  # gateways do publish claims: a compromised gateway can drop sessions (README)
            await bad.nc.publish(subject, body)
        errors = await bad.synced_errors()
        assert denied(errors, ">"), (role, errors)
        for subject, _ in attempts:
            assert denied(errors, subject), (role, subject, errors)
        await bad.nc.close()

    # the API's own NATS identity, without the signing key: typed refusals, nothing dialed or run
    api_nc = await fleet.server.connect("api")
    try:
        for subject, body in attempts:
            reply = await api_nc.request(subject, body, timeout=10)
            answer = json.loads(reply.data)
            assert (answer["type"], answer["code"]) == ("error", "unsigned"), (subject, answer)
    finally:
        await api_nc.close()

    await asyncio.sleep(0.5)
    assert not fleet.marker.exists()
    assert fleet.agent_config.read_text() == token_before  # not re-keyed
    assert fleet.agent.count(r"session \S+ established with") == 1  # never kicked
    assert fleet.sshd.accepted_logins() == logins_before
    assert connections(trap) == 0
    trap.close()
    assert seen_everything == []
    after = await fleet.rest_exec("echo still-mine")
    assert (after["status"], after["via"], after["stdout"]) == ("succeeded", "agent", "still-mine\n")
    assert after["requested_by"].startswith("api-key:")


async def test_a_rogue_responder_cannot_forge_a_recorded_result(fleet: Fleet) -> None:
    """A plain subscriber on the exec subject that answers first with a forged result: the operator may
    not subscribe there at all; a gateway identity may, but its unsigned or wrongly signed results never
    settle a row: no run is recorded `succeeded` with its output."""
    forger_key = signing.generate()
    made: list[str] = []

    def forge(sign: bool) -> Callable[[Msg], Any]:
        async def answer(msg: Msg) -> None:
            request = json.loads(msg.data)
            result = ExecResult(command_id=request["command_id"], exit_code=0, stdout=FORGED, duration_ms=1.0)
            if sign:
                result = signing.sign_result(forger_key, "box", result)
            made.append(request["command_id"])
            await msg.respond(encode(result))

        return answer

    operator = await attacker(fleet.server, "operator")
    await operator.nc.subscribe(subjects.agent_exec("box"), cb=forge(False))
    assert denied(await operator.synced_errors(), subjects.agent_exec("box"))
    for n in range(3):
        run = await fleet.rest_exec(f"echo real-{n}")
        assert (run["status"], run["stdout"]) == ("succeeded", f"real-{n}\n")
    await operator.nc.close()
    assert made == []

    for sign in (False, True):
        rogue = await attacker(fleet.server, "gateway")
        await rogue.nc.subscribe(subjects.agent_exec("box"), cb=forge(sign))
        await rogue.nc.flush()
        for n in range(3):
            run = await fleet.rest_exec(f"echo real-{n}")
            assert run["stdout"] != FORGED, run
            assert run["status"] != "succeeded" or run["stdout"] == f"real-{n}\n", run
        await rogue.nc.close()
    assert made, "the gateway identity's subscriber was expected to receive requests"
    history = (await fleet.http.get("/api/hosts/box/commands", params={"limit": 100})).json()
    assert all(row["stdout"] != FORGED for row in history)


async def test_a_fake_token_authority_cannot_admit_a_random_token(fleet: Fleet) -> None:
    """Answering warlock.auth.verify is the API's alone: a gateway or operator identity that tries is
    refused by the server, a random token stays 401 at the gateway, and the real agent keeps its session."""
    for role in ROLES_TRIED:
        fake = await attacker(fleet.server, role)

        async def vouch(msg: Msg) -> None:
            await msg.respond(encode(TokenOk(host_id="box")))

        await fake.nc.subscribe(subjects.TOKEN_VERIFY, cb=vouch)
        assert denied(await fake.synced_errors(), subjects.TOKEN_VERIFY), role
        headers = {"Authorization": f"Bearer {generate_token()}"}
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with ws_connect(fleet.gateway.url, additional_headers=headers, open_timeout=5):
                pass
        assert refused.value.response.status_code == 401
        await fake.nc.close()
    assert fleet.agent.count(r"session \S+ established with") == 1
    run = await fleet.rest_exec("echo mine")
    assert (run["status"], run["via"], run["stdout"]) == ("succeeded", "agent", "mine\n")


async def test_an_agents_own_token_without_its_key_opens_no_session(fleet: Fleet) -> None:
    """The agent's token, stolen without the key made on its host: the gateway admits only a hello signed
    with the key the API knows for the host, so neither an unsigned hello nor one signed by another key
    takes the host over; the real agent is never superseded."""
    stranger = signing.generate()
    hellos = [
        Hello(host_id="box", hostname="evil", platform="linux", agent_version="9"),
        Hello(host_id="box", hostname="evil", platform="linux", agent_version="9", signed_at=time.time()),
    ]
    forged = signing.sign_values(stranger, signing.HELLO_DOMAIN, signing.hello_values(hellos[1]))
    hellos[1] = hellos[1].model_copy(update={"signature": forged})
    headers = {"Authorization": f"Bearer {fleet.token}"}
    for hello in hellos:
        async with ws_connect(fleet.gateway.url, additional_headers=headers, open_timeout=5) as ws:
            await ws.send(encode(hello).decode())
            with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert "agent key" in closed.value.rcvd.reason
    assert fleet.agent.count(r"session \S+ established with") == 1
    run = await fleet.rest_exec("echo mine")
    assert (run["status"], run["via"], run["stdout"]) == ("succeeded", "agent", "mine\n")
