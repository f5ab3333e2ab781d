"""Signed commands against real agent processes: envelopes, a gateway under an attacker's control, TLS.

Nothing between the API and the agent decides what runs: a command runs only if the API's key signed
exactly what arrived, for this host, within its validity, once. The checks are made on the host: marker
files that a refused command would create never appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from nacl.signing import VerifyKey
from websockets.asyncio.server import ServerConnection, serve

from services.dev.procs import BIN, Proc
from shared import signing, subjects
from shared.errors import ErrorCode
from shared.ids import CommandId, new_command_id
from shared.protocol import (
    Ack,
    ErrorReply,
    Exec,
    ExecError,
    ExecReply,
    ExecRequest,
    ExecResult,
    Hello,
    Ping,
    Pong,
    Welcome,
    decode_agent_frame,
    decode_exec_reply,
    encode,
)
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack
from tests.support.trust import TestSigner

HOST = "web-1"


def signed_request(signer: TestSigner, command: str, host: str = HOST, ttl: float = 120.0) -> ExecRequest:
    """An exec request with a fresh id, signed by `signer` for `host`."""
    request = ExecRequest(command=command, timeout=10, command_id=CommandId(new_command_id()))
    signed = signer.sign("exec", request, host, ttl)
    assert isinstance(signed, ExecRequest)
    return signed


def agent_key(stack: Stack, name: str = "agent") -> VerifyKey:
    """The public key of the identity the agent `name` made on its host."""
    return signing.parse_public(signing.public_text(signing.load_private(stack.root / f"{name}.key")))


@dataclass
class Rig:
    """A real authority, gateway and agent process for web-1, and an API-side NATS client."""

    stack: Stack
    nats: NatsServer
    agent: Proc
    token: str
    url: str

    async def exec(self, request: ExecRequest | bytes) -> ExecReply:
        """Send an exec request to web-1 and decode the reply."""
        body = request if isinstance(request, bytes) else encode(request)
        nc = await self.nats.connect("api")
        try:
            msg = await nc.request(subjects.agent_exec(HOST), body, timeout=15)
        finally:
            await nc.close()
        return decode_exec_reply(msg.data)

    async def refused(self, request: ExecRequest | bytes, code: ErrorCode) -> ErrorReply:
        """Send `request`; it must be refused with `code`."""
        reply = await self.exec(request)
        assert isinstance(reply, ErrorReply), reply
        assert reply.code == code, reply
        return reply


@pytest.fixture
def rig(stack: Stack, nats_server: NatsServer) -> Rig:
    """Authority, gateway and web-1's agent (trusting the stack's signer), all real processes."""
    stack.start_authority()
    gateway = stack.start_gateway()
    token = stack.add_host(HOST)
    agent = stack.start_agent("agent", HOST, token, [gateway.url])
    return Rig(stack, nats_server, agent, token, gateway.url)


# ----------------------------------------------------------------------------- envelopes


async def test_envelopes_that_do_not_verify_run_nothing(rig: Rig, tmp_path: Path) -> None:
    """Tampered, other host's, expired, too long-lived, unknown key, unsigned: each a typed error, one
    log line, and nothing runs on the host. The signed original runs, and its result is the agent's."""
    marker = tmp_path / "marker"
    touch = f"touch {marker}"
    signer = rig.stack.signer
    stranger = TestSigner(tmp_path, "stranger.key")

    original = signed_request(signer, "echo hi")
    tampered = original.model_copy(update={"command": touch})
    await rig.refused(tampered, ErrorCode.BAD_SIGNATURE)
    longer = original.model_copy(update={"timeout": 11.0})
    await rig.refused(longer, ErrorCode.BAD_SIGNATURE)
    await rig.refused(signed_request(signer, touch, host="web-2"), ErrorCode.WRONG_HOST)
    expired = await rig.refused(signed_request(signer, touch, ttl=-1), ErrorCode.EXPIRED)
    assert "expired" in expired.description
    await rig.refused(signed_request(signer, touch, ttl=3600), ErrorCode.EXPIRED)  # outlives the ledger
    await rig.refused(signed_request(stranger, touch), ErrorCode.UNKNOWN_KEY)
    unsigned = await rig.refused(encode(ExecRequest(command=touch)), ErrorCode.UNSIGNED)
    assert "warlock signing-keys" in unsigned.description
    assert not marker.exists()

    result = await rig.exec(original)
    assert isinstance(result, ExecResult)
    assert result.stdout == "hi\n"
    assert signing.verify_result(agent_key(rig.stack), HOST, result)
    forged = result.model_copy(update={"stdout": "pwned\n"})
    assert not signing.verify_result(agent_key(rig.stack), HOST, forged)
    assert rig.agent.count(f"exec {tampered.command_id} refused") == 2  # once per refused frame
    assert rig.agent.count(r"refused \(") == 7
    assert rig.token not in rig.agent.log()
    assert "PRIVATE KEY" not in rig.agent.log()


async def test_a_replayed_envelope_runs_once(rig: Rig, tmp_path: Path) -> None:
    """The same signed request twice (also across an agent restart): it runs once; then `replay`."""
    counter = tmp_path / "count"
    request = signed_request(rig.stack.signer, f"echo run >> {counter}")
    first = await rig.exec(request)
    assert isinstance(first, ExecResult)
    assert first.exit_code == 0
    replayed = await rig.refused(request, ErrorCode.REPLAY)
    assert replayed.command_id == request.command_id
    assert "nothing ran again" in replayed.description
    rig.agent.stop()
    config = rig.stack.root / "agent.conf"
    again = rig.stack.start("agent-2", [str(BIN / "warlock-agent"), "run", "--config", str(config)], {})
    again.wait_for(r"session \S+ established with")
    await rig.refused(request, ErrorCode.REPLAY)
    assert counter.read_text() == "run\n"


async def test_rotated_signing_key(stack: Stack, nats_server: NatsServer, tmp_path: Path) -> None:
    """An agent trusting the old and the new API key accepts both; reconfigured with only the new one,
    the old key's commands are `unknown_key`."""
    old, new = stack.signer, TestSigner(tmp_path, "next.key")
    stack.start_authority()
    gateway = stack.start_gateway()
    token = stack.add_host(HOST)
    both = [old.public_key, new.public_key]
    agent = stack.start_agent("agent", HOST, token, [gateway.url], trusted_keys=both)
    rig = Rig(stack, nats_server, agent, token, gateway.url)
    for signer in (old, new):
        reply = await rig.exec(signed_request(signer, "echo ok"))
        assert isinstance(reply, ExecResult), reply
        assert reply.stdout == "ok\n"
    agent.stop()
    rig.agent = stack.start_agent("agent-new", HOST, token, [gateway.url], trusted_keys=[new.public_key])
    marker = tmp_path / "marker"
    await rig.refused(signed_request(old, f"touch {marker}"), ErrorCode.UNKNOWN_KEY)
    assert isinstance(await rig.exec(signed_request(new, "true")), ExecResult)
    assert not marker.exists()


# ----------------------------------------------------------------------------- a hostile gateway


@dataclass
class HostileGateway:
    """A WebSocket server speaking the gateway protocol, run by an attacker: any token is welcome, and
    the test decides which frames the agent gets. It sees everything the agent sends."""

    hellos: list[Hello] = field(default_factory=list)
    frames: asyncio.Queue[ExecResult | ExecError] = field(default_factory=asyncio.Queue)
    conn: ServerConnection | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def handler(self, ws: ServerConnection) -> None:
        """Welcome the agent, then queue its results (acking them) and answer its pings."""
        hello = decode_agent_frame(await ws.recv())
        assert isinstance(hello, Hello)
        self.hellos.append(hello)
        welcome = Welcome(session_id="evil-1", gateway_id="evil", ping_interval=20, max_result_bytes=65536)
        await ws.send(encode(welcome), text=True)
        self.conn = ws
        self.ready.set()
        with contextlib.suppress(Exception):
            async for data in ws:
                frame = decode_agent_frame(data)
                if isinstance(frame, Ping):
                    await ws.send(encode(Pong(id=frame.id)), text=True)
                elif isinstance(frame, ExecResult | ExecError):
                    await ws.send(encode(Ack(command_id=frame.command_id)), text=True)
                    await self.frames.put(frame)

    async def send(self, frame: Exec) -> ExecResult | ExecError:
        """Push an Exec frame to the agent; return what the agent answers."""
        assert self.conn is not None
        await self.conn.send(encode(frame), text=True)
        async with asyncio.timeout(10):
            return await self.frames.get()


@pytest.fixture
async def hostile(stack: Stack) -> AsyncIterator[tuple[HostileGateway, Proc]]:
    """A real agent process connected to the attacker's gateway (trusting the stack's signer)."""
    evil = HostileGateway()
    async with serve(evil.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        token = stack.add_host(HOST)
        agent = stack.start_agent("agent", HOST, token, [f"ws://127.0.0.1:{port}/agent"], wait=False)
        async with asyncio.timeout(15):
            await evil.ready.wait()
        yield evil, agent


def as_frame(request: ExecRequest) -> Exec:
    """The Exec frame an honest gateway makes from `request`."""
    assert request.command_id is not None
    return Exec(
        command_id=request.command_id,
        command=request.command,
        timeout=request.timeout,
        signature=request.signature,
    )


async def test_a_hostile_gateway_cannot_make_the_agent_run_anything(
    stack: Stack, hostile: tuple[HostileGateway, Proc], tmp_path: Path
) -> None:
    """Rewritten command, another host's envelope, unsigned, a replayed frame: typed refusals and the
    marker never appears. It can drop or delay what the API sent, and it can only run that, once."""
    evil, _agent = hostile
    marker = tmp_path / "marker"
    counter = tmp_path / "count"
    touch = f"touch {marker}"
    signer = stack.signer
    legit = as_frame(signed_request(signer, f"echo run >> {counter}; echo secret"))

    async def refused(frame: Exec, code: ErrorCode) -> None:
        answer = await evil.send(frame)
        assert isinstance(answer, ExecError), answer
        assert (answer.code, answer.command_id) == (code, frame.command_id)

    await refused(legit.model_copy(update={"command": touch}), ErrorCode.BAD_SIGNATURE)
    other = as_frame(signed_request(signer, touch, host="web-2"))  # captured from web-2's gateway
    await refused(other, ErrorCode.WRONG_HOST)
    await refused(Exec(command_id=CommandId("evil-1"), command=touch, timeout=5), ErrorCode.UNSIGNED)
    resigned = Exec(command_id=CommandId("evil-2"), command=touch, timeout=5, signature=legit.signature)
    await refused(resigned, ErrorCode.BAD_SIGNATURE)

    result = await evil.send(legit)
    assert isinstance(result, ExecResult)
    assert result.stdout == "secret\n"
    await refused(legit, ErrorCode.REPLAY)
    await asyncio.sleep(0.3)
    assert not marker.exists()
    assert counter.read_text() == "run\n"

    public = agent_key(stack)
    hello = evil.hellos[0]
    assert signing.verify_values(public, signing.HELLO_DOMAIN, signing.hello_values(hello), hello.signature)
    assert signing.verify_result(public, HOST, result)
    for edit in ({"stdout": "all good\n"}, {"exit_code": 0, "stdout": ""}, {"timed_out": True}):
        assert not signing.verify_result(public, HOST, result.model_copy(update=edit))
    assert not signing.verify_result(public, "web-2", result)


# ----------------------------------------------------------------------------- transport


def test_plain_ws_to_a_remote_gateway_is_refused(stack: Stack) -> None:
    """ws:// to a non-loopback address without `insecure`: a config error (exit 2) naming gateway_urls."""
    config = stack.write_agent_config("agent", HOST, "ab" * 32, ["ws://192.0.2.10:8765/agent"])
    proc = stack.start("agent", [str(BIN / "warlock-agent"), "run", "--config", str(config)], {})
    assert proc.popen.wait(30) == 2
    assert "config error: gateway_urls" in proc.log()
    assert "insecure" in proc.log()


@dataclass
class Certs:
    """A CA and a gateway certificate for 127.0.0.1 (trustme), as files."""

    ca: Path
    cert: Path
    key: Path


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """A test CA and a certificate it issued for 127.0.0.1."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    paths = Certs(tmp_path / "ca.pem", tmp_path / "gw.pem", tmp_path / "gw.key")
    ca.cert_pem.write_to_path(str(paths.ca))
    issued.cert_chain_pems[0].write_to_path(str(paths.cert))
    issued.private_key_pem.write_to_path(str(paths.key))
    return paths


async def test_wss_with_a_pinned_ca(
    stack: Stack, nats_server: NatsServer, certs: Certs, tmp_path: Path
) -> None:
    """The gateway serves wss:// (log line, /healthz over https); an agent pinning the CA connects and
    runs a signed command; one pinning another CA never gets a session."""
    stack.start_authority()
    gateway = stack.start_gateway(tls_cert_file=str(certs.cert), tls_key_file=str(certs.key))
    assert gateway.url.startswith("wss://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(certs.ca))
    health_url = f"https://127.0.0.1:{gateway.port}/healthz"
    with urllib.request.urlopen(health_url, context=context, timeout=5) as response:
        assert json.loads(response.read())["status"] == "ok"

    token = stack.add_host(HOST)
    agent = stack.start_agent("agent", HOST, token, [gateway.url], ca_file=str(certs.ca))
    rig = Rig(stack, nats_server, agent, token, gateway.url)
    reply = await rig.exec(signed_request(stack.signer, "echo tls"))
    assert isinstance(reply, ExecResult)
    assert reply.stdout == "tls\n"

    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    token2 = stack.add_host("web-2")
    wrong = stack.start_agent("agent-2", "web-2", token2, [gateway.url], wait=False, ca_file=str(other))
    wrong.wait_for(r"cannot connect to wss://\S+: .*CERTIFICATE_VERIFY_FAILED", timeout=15)
    assert wrong.count(r"session \S+ established") == 0


def test_gateway_tls_settings_go_together(stack: Stack, certs: Certs) -> None:
    """A certificate without its key (or the reverse) and an unreadable key: config errors, exit 2."""
    for settings in ({"tls_cert_file": str(certs.cert)}, {"tls_key_file": str(certs.key)}):
        env = stack.env(**{f"WARLOCK_GATEWAY_{k.upper()}": v for k, v in settings.items()})
        proc = stack.start(f"gw-{len(stack.procs)}", [str(BIN / "warlock-gateway")], env)
        assert proc.popen.wait(30) == 2
        assert "WARLOCK_GATEWAY_TLS_CERT_FILE and WARLOCK_GATEWAY_TLS_KEY_FILE go together" in proc.log()
    env = stack.env(
        WARLOCK_GATEWAY_TLS_CERT_FILE=str(certs.cert), WARLOCK_GATEWAY_TLS_KEY_FILE=str(certs.cert)
    )
    proc = stack.start("gw-bad", [str(BIN / "warlock-gateway")], env)
    assert proc.popen.wait(30) == 2
    assert "config error: tls_cert_file (WARLOCK_GATEWAY_TLS_CERT_FILE)" in proc.log()
