"""The agent lifecycle endpoints against a real nats-server and both databases.

The gateway and the SSH worker are played by plain nats-py responders that record what they receive and
check the API's signature on it (TestSigner: the API loads the same key file); the agent wheel is a small
fake file (the real build is tested once, in tests/unit/test_api_wheel.py). No request carries a token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.api.http.routes import downloads
from services.api.store import crud
from services.api.store.models import AgentConnection
from shared import signing, subjects
from shared.errors import ErrorCode
from shared.natsx import error, reply
from shared.protocol import (
    AgentConfigureRequest,
    AgentInstallRequest,
    AgentOpResult,
    AgentUninstallRequest,
    ExecResult,
    InstallStep,
    Message,
    PingReply,
    RotateOk,
    RotateRequest,
    SshExecRequest,
    SshProbeOk,
    SshProbeRequest,
    TokenRevoked,
    decode_model,
)
from shared.tokens import hash_token
from shared.version import __version__, wheel_name
from tests.support.db import RunningApi, api_settings, eventually, running_api
from tests.support.natsserver import NatsServer
from tests.support.trust import TestSigner

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFnZW50c3Rlc3RrZXkwMTIzNDU2Nzg5YWJjZGVmZ2g"
WHEEL_NAME = wheel_name()
WHEEL_BYTES = b"PK\x03\x04 not really a wheel, but bytes with a hash"
WHEEL_SHA = hashlib.sha256(WHEEL_BYTES).hexdigest()
STEPS = (InstallStep(name="sha256", ok=True, detail=WHEEL_SHA), InstallStep(name="unit", ok=True))
AGENT_KEY = signing.generate()  # the agent's own key, "made on the host"
AGENT_PUBLIC = signing.public_text(AGENT_KEY)
HOST_TOKEN = "7c" * 32  # the token "made on the host": the API never sees it, only its hash
RUNNING = AgentOpResult(
    steps=STEPS,
    state="running",
    systemd=True,
    agent_public_key=AGENT_PUBLIC,
    token_sha256=hash_token(HOST_TOKEN),
)
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


@pytest.fixture
def signer(tmp_path: Path) -> TestSigner:
    """The API's signing key (the API of the test loads this file)."""
    return TestSigner(tmp_path)


def verified(kind: str, request: Message, host: str, signer: TestSigner) -> None:
    """`request` carries a valid API signature of `kind` for `host` (as the worker / agent checks it)."""
    signature = getattr(request, "signature", None)
    trusted = signing.TrustedKeys([signer.public_key])
    fields = signing.signed_fields(request)
    assert signing.verify_command(kind, fields, signature, trusted, host, 600) == signer.key_id


@pytest.fixture
async def api(
    tmp_path: Path, nats_server: NatsServer, database: str, signer: TestSigner
) -> AsyncIterator[RunningApi]:
    """The API with a fake agent wheel and short timeouts, host h1 (pinned key) and h2 (no key) added."""
    wheel = tmp_path / WHEEL_NAME
    wheel.write_bytes(WHEEL_BYTES)
    ca = tmp_path / "agents-ca.pem"
    ca.write_text(CA_PEM)
    settings = api_settings(
        tmp_path,
        nats_server.url,
        database,
        signing_key_file=signer.key_file,
        agent_ca_file=ca,
        agent_wheel=wheel,
        gateway_urls="ws://gw-a:8765/agent, wss://gw-b/agent",
        install_timeout=3,
        agent_op_timeout=3,
        health_timeout=1,
        ssh_health_timeout=1,
        rotate_timeout=1,
    )
    async with running_api(settings) as running:
        await _add_hosts(running, nats_server)
        yield running


async def _add_hosts(api: RunningApi, nats_server: NatsServer) -> None:
    worker = await nats_server.connect("ssh-worker")

    async def probe(msg: Msg) -> None:
        assert decode_model(SshProbeRequest, msg.data).signature is not None
        await reply(worker, msg, SshProbeOk(host_key=HOST_KEY, fingerprint="SHA256:x"))

    await worker.subscribe(subjects.SSH_PROBE, cb=probe)
    await worker.flush()
    for body in (
        {"id": "h1", "address": "10.0.0.7"},
        {"id": "h2", "address": "10.0.0.8", "ssh_check": False},
    ):
        response = await api.client.post("/api/hosts", json=body, headers=api.auth)
        assert response.status_code == 201, response.text
    await worker.close()


class Peers:
    """Plays gateways and SSH workers, each with its own NATS identity (the server enforces the matrix):
    records each request (in order) and answers with a canned message."""

    def __init__(self, gateway: NATS, worker: NATS) -> None:
        self.gateway = gateway
        self.worker = worker
        self.seen: dict[str, list[bytes]] = {}
        self.events: list[str] = []
        self.revoked: list[TokenRevoked] = []

    def conn_for(self, subject: str) -> NATS:
        """The identity that serves `subject`: a gateway for agent requests, the SSH worker for the rest."""
        return self.gateway if subject.startswith("warlock.agent.") else self.worker

    async def answer(self, subject: str, message: Message | None) -> None:
        """Subscribe to `subject`; answer every request with `message` (None: never answer)."""
        nc = self.conn_for(subject)

        async def handler(msg: Msg) -> None:
            self.seen.setdefault(subject, []).append(msg.data)
            if message is not None:
                await reply(nc, msg, message)
            self.events.append(f"replied {subject}")

        await nc.subscribe(subject, cb=handler)
        await nc.flush()

    async def any_revoked(self) -> bool:
        """Whether a revocation arrived yet."""
        return bool(self.revoked)

    async def watch_revocations(self) -> None:
        """Record every TokenRevoked published."""

        async def handler(msg: Msg) -> None:
            self.revoked.append(decode_model(TokenRevoked, msg.data))
            self.events.append("revoked")

        await self.gateway.subscribe(subjects.TOKEN_REVOKED, cb=handler)
        await self.gateway.flush()


@pytest.fixture
async def peers(nats_server: NatsServer) -> AsyncIterator[Peers]:
    """Responders on the test's NATS (a gateway and an SSH worker identity), with revocations recorded."""
    p = Peers(await nats_server.connect("gateway"), await nats_server.connect("ssh-worker"))
    await p.watch_revocations()
    yield p
    await p.gateway.close()
    await p.worker.close()


async def _stored_hash(api: RunningApi, host: str) -> str | None:
    async with api.state.sessions() as session:
        agent = await crud.get_agent(session, host)
    return None if agent is None else agent.token_hash


async def _stored_key(api: RunningApi, host: str) -> str | None:
    async with api.state.sessions() as session:
        agent = await crud.get_agent(session, host)
    return None if agent is None else agent.public_key


async def _issue(api: RunningApi, host: str, public_key: str | None = None) -> str:
    """A token for `host` (as an earlier install left it), with the agent's key enrolled if given."""
    async with api.state.sessions() as session:
        token = await crud.issue_agent_token(session, host)
        agent = await session.get(AgentConnection, host)
        assert agent is not None
        agent.public_key = public_key
        session.add(agent)
        await session.commit()
    return token


def carries_no_token(raw: bytes) -> None:
    """A request payload names no token field and holds no 64-hex value but hashes and digests."""
    assert b'"token"' not in raw
    assert HOST_TOKEN.encode() not in raw


# ----------------------------------------------------------------------------- install


async def test_install_is_signed_sends_no_token_and_stores_what_the_host_reports(
    api: RunningApi, peers: Peers, signer: TestSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker gets a signed install (wheel, pinned target, trusted keys, CA) without any token; the
    public key and token hash the host reports are stored; the answer holds the key, never a token."""
    await peers.answer(subjects.ssh_agent_op("h1", "install"), RUNNING)
    with caplog.at_level(logging.DEBUG):
        response = await api.client.post(
            "/api/agents/10.0.0.7/install", json={"prefix": "/tmp/scratch"}, headers=api.auth
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "token" not in body
    assert body["host_id"] == "h1"
    assert body["agent_public_key"] == AGENT_PUBLIC
    assert body["state"] == "running"
    assert body["systemd"] is True
    assert [s["name"] for s in body["steps"]] == ["sha256", "unit"]
    raw = peers.seen[subjects.ssh_agent_op("h1", "install")][0]
    carries_no_token(raw)
    request = decode_model(AgentInstallRequest, raw)
    verified("install", request, "h1", signer)
    assert request.trusted_keys == (signer.public_key,)
    assert request.ca_pem == CA_PEM
    assert request.wheel_name == WHEEL_NAME
    assert request.wheel_sha256 == WHEEL_SHA
    assert hashlib.sha256(base64.b64decode(request.wheel_b64)).hexdigest() == WHEEL_SHA
    assert request.target.host_key == HOST_KEY
    assert request.prefix == "/tmp/scratch"
    assert request.mode == "auto"
    assert request.gateway_urls == ("ws://gw-a:8765/agent", "wss://gw-b/agent")
    assert await _stored_hash(api, "h1") == hash_token(HOST_TOKEN)
    assert await _stored_key(api, "h1") == AGENT_PUBLIC
    assert peers.revoked == []  # no previous token
    assert "installing the agent on h1" in caplog.text


async def test_reinstall_revokes_the_previous_token(api: RunningApi, peers: Peers) -> None:
    """Installing again (upgrade): the host's new token hash is stored and the one it replaces revoked."""
    first = await _issue(api, "h1", AGENT_PUBLIC)
    await peers.answer(subjects.ssh_agent_op("h1", "install"), RUNNING)
    second = await api.client.post("/api/agents/h1/install", json={"mode": "systemd"}, headers=api.auth)
    assert second.status_code == 200
    assert await _stored_hash(api, "h1") == hash_token(HOST_TOKEN)
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(first))]


async def test_one_operation_per_host_across_api_instances(
    api: RunningApi, peers: Peers, database: str
) -> None:
    """Two API instances on one PostgreSQL database install the same host at once: the SSH worker sees
    the two installs one after the other, never overlapping (a per-process lock alone lets them overlap)."""
    if not database.startswith("postgresql"):
        pytest.skip("SQLite means one API instance; its process lock is the whole story")
    intervals: list[tuple[float, float]] = []
    tasks: set[asyncio.Task[None]] = set()

    async def slow_install(msg: Msg) -> None:
        start = time.monotonic()
        await asyncio.sleep(0.6)
        intervals.append((start, time.monotonic()))
        await reply(peers.worker, msg, RUNNING)

    async def on_install(msg: Msg) -> None:  # a task per request: one subscription's callbacks are serial
        task = asyncio.create_task(slow_install(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await peers.worker.subscribe(subjects.ssh_agent_op("h1", "install"), cb=on_install)
    await peers.worker.flush()
    async with running_api(api.settings) as other:
        body = {"mode": "systemd"}
        first, second = await asyncio.gather(
            api.client.post("/api/agents/h1/install", json=body, headers=api.auth),
            other.client.post("/api/agents/h1/install", json=body, headers=other.auth),
        )
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert len(intervals) == 2
    earlier, later = sorted(intervals)
    assert later[0] >= earlier[1], intervals


async def test_install_without_systemd_is_409_and_changes_nothing(api: RunningApi, peers: Peers) -> None:
    """state no_systemd: 409 with the steps and a hint to use direct; the stored token stays, none revoked."""
    old = await _issue(api, "h1", AGENT_PUBLIC)
    no_systemd = AgentOpResult(
        steps=(InstallStep(name="systemd", ok=False),), state="no_systemd", systemd=False
    )
    await peers.answer(subjects.ssh_agent_op("h1", "install"), no_systemd)
    response = await api.client.post("/api/agents/h1/install", headers=api.auth)
    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "no_systemd"
    assert body["steps"] == [{"name": "systemd", "ok": False, "detail": ""}]
    assert '"mode": "direct"' in body["hint"]
    assert await _stored_hash(api, "h1") == hash_token(old)
    assert peers.revoked == []


async def test_install_reply_without_key_or_hash_is_502_and_stores_nothing(
    api: RunningApi, peers: Peers
) -> None:
    """A worker (or agent) that reports no public key / token hash: 502, nothing stored."""
    await peers.answer(
        subjects.ssh_agent_op("h1", "install"), AgentOpResult(steps=STEPS, state="running", systemd=True)
    )
    response = await api.client.post("/api/agents/h1/install", headers=api.auth)
    assert response.status_code == 502
    assert "public key" in response.json()["detail"]
    assert await _stored_hash(api, "h1") is None


async def test_install_without_pinned_key_is_409(api: RunningApi, peers: Peers) -> None:
    """A host added without ssh_check cannot be installed: 409 telling how to fix it; nothing is sent."""
    await peers.answer(subjects.ssh_agent_op("h2", "install"), RUNNING)
    response = await api.client.post("/api/agents/h2/install", headers=api.auth)
    assert response.status_code == 409
    assert "ssh_check" in response.json()["detail"]
    assert peers.seen == {}
    assert await _stored_hash(api, "h2") is None


async def test_install_without_worker_is_503_and_stores_nothing(api: RunningApi) -> None:
    """No SSH worker: 503, nothing stored."""
    response = await api.client.post("/api/agents/h1/install", headers=api.auth)
    assert response.status_code == 503
    assert "SSH worker" in response.json()["detail"]
    assert await _stored_hash(api, "h1") is None


@pytest.mark.parametrize(
    ("code", "status"),
    [(ErrorCode.AUTH_FAILED, 422), (ErrorCode.INTERNAL, 502), (ErrorCode.BAD_SIGNATURE, 502)],
)
async def test_install_worker_errors_map_to_422_or_502(
    api: RunningApi, peers: Peers, code: ErrorCode, status: int
) -> None:
    """A typed worker error answers with its code: SSH login/connect problems 422, others 502."""
    await peers.answer(subjects.ssh_agent_op("h1", "install"), error(code, "it went wrong"))
    response = await api.client.post("/api/agents/h1/install", headers=api.auth)
    assert response.status_code == status
    assert response.json()["code"] == code
    assert "it went wrong" in response.json()["detail"]
    assert await _stored_hash(api, "h1") is None


async def test_bad_install_body_is_422(api: RunningApi) -> None:
    """A relative prefix, an unknown mode or an unknown field is refused before anything happens."""
    for body in ({"prefix": "tmp"}, {"mode": "magic"}, {"extra": 1}, {"gateway_urls": ["http://x"]}):
        response = await api.client.post("/api/agents/h1/install", json=body, headers=api.auth)
        assert response.status_code == 422, body
    assert (await api.client.post("/api/agents/nope/install", headers=api.auth)).status_code == 404
    assert (await api.client.post("/api/agents/h1/install")).status_code == 401


async def test_install_timeout_is_504_and_stores_nothing(api: RunningApi, peers: Peers) -> None:
    """A worker that never answers: 504; the API stores nothing it did not see (install again)."""
    old = await _issue(api, "h1", AGENT_PUBLIC)
    await peers.answer(subjects.ssh_agent_op("h1", "install"), None)
    response = await api.client.post("/api/agents/h1/install", headers=api.auth)
    assert response.status_code == 504
    assert response.json()["code"] == "timeout"
    assert await _stored_hash(api, "h1") == hash_token(old)


# ----------------------------------------------------------------------------- downloads, pull install


async def test_install_script_and_wheel_download_need_no_key(api: RunningApi) -> None:
    """install.sh is served as a shell script; the wheel by alias or real name, with its SHA-256 header."""
    script = await api.client.get("/agent/install.sh")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/x-shellscript")
    assert script.text.startswith("#!")
    for name in ("warlock_agent.whl", WHEEL_NAME):
        wheel = await api.client.get(f"/agent/{name}")
        assert wheel.status_code == 200
        assert wheel.content == WHEEL_BYTES
        assert wheel.headers["x-warlock-sha256"] == WHEEL_SHA
        assert wheel.headers["x-warlock-wheel-name"] == WHEEL_NAME
    assert (await api.client.get("/agent/other-1.0-py3-none-any.whl")).status_code == 404
    assert (await api.client.get("/agent/passwd")).status_code == 404


async def test_agent_wheel_hash_from_the_authenticated_api(api: RunningApi, signer: TestSigner) -> None:
    """GET /api/agent-wheel (API key) names the wheel, its SHA-256, where to download it and the API keys
    a pulled agent trusts."""
    assert (await api.client.get("/api/agent-wheel")).status_code == 401
    response = await api.client.get("/api/agent-wheel", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["sha256"]) == (WHEEL_NAME, WHEEL_SHA)
    assert body["url"].endswith(f"/agent/{WHEEL_NAME}")
    assert body["trusted_keys"] == [signer.public_key]
    download = await api.client.get(body["url"])
    assert hashlib.sha256(download.content).hexdigest() == body["sha256"]


async def test_pull_token_then_enroll_once(api: RunningApi, peers: Peers) -> None:
    """A pull token is shown once (hash stored, old token revoked, key cleared); the pulled install
    enrolls its key with it; the same key again is fine; another key, another host or token: refused."""
    old = await _issue(api, "h1", AGENT_PUBLIC)
    response = await api.client.post("/api/agents/h1/pull-token", headers=api.auth)
    assert response.status_code == 200
    token = response.json()["token"]
    assert await _stored_hash(api, "h1") == hash_token(token)
    assert await _stored_key(api, "h1") is None
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(old))]

    new_key = signing.public_text(signing.generate())
    bearer = {"Authorization": f"Bearer {token}"}
    body = {"host_id": "h1", "public_key": new_key}
    assert (await api.client.post("/agent/enroll", json=body)).status_code == 401
    wrong = {"Authorization": f"Bearer {old}"}
    assert (await api.client.post("/agent/enroll", json=body, headers=wrong)).status_code == 401
    other_host = {"host_id": "h2", "public_key": new_key}
    assert (await api.client.post("/agent/enroll", json=other_host, headers=bearer)).status_code == 401
    bad_key = {"host_id": "h1", "public_key": "ed25519:short"}
    assert (await api.client.post("/agent/enroll", json=bad_key, headers=bearer)).status_code == 422
    enrolled = await api.client.post("/agent/enroll", json=body, headers=bearer)
    assert enrolled.status_code == 200, enrolled.text
    assert enrolled.json() == {"host_id": "h1", "key_id": signing.key_id(new_key)}
    assert await _stored_key(api, "h1") == new_key
    assert (await api.client.post("/agent/enroll", json=body, headers=bearer)).status_code == 200
    another = {"host_id": "h1", "public_key": signing.public_text(signing.generate())}
    refused = await api.client.post("/agent/enroll", json=another, headers=bearer)
    assert refused.status_code == 409
    assert await _stored_key(api, "h1") == new_key


# ----------------------------------------------------------------------------- uninstall


async def test_uninstall_revokes_the_stored_hash_and_deletes_the_record(
    api: RunningApi, peers: Peers, signer: TestSigner
) -> None:
    """The worker removes the agent (signed request); the record goes and the old hash is revoked."""
    token = await _issue(api, "h1")
    removed = AgentOpResult(steps=(InstallStep(name="remove", ok=True),), state="removed", systemd=True)
    await peers.answer(subjects.ssh_agent_op("h1", "uninstall"), removed)
    response = await api.client.post("/api/agents/h1/uninstall", json={"prefix": "/tmp/x"}, headers=api.auth)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "removed"
    assert response.json()["token_revoked"] is True
    sent = decode_model(AgentUninstallRequest, peers.seen[subjects.ssh_agent_op("h1", "uninstall")][0])
    verified("uninstall", sent, "h1", signer)
    assert sent.prefix == "/tmp/x"
    assert sent.target.host_key == HOST_KEY
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(token))]
    async with api.state.sessions() as session:
        assert await session.get(AgentConnection, "h1") is None
    agent = await api.client.get("/api/agents/h1", headers=api.auth)
    assert agent.json()["connected"] is False
    assert (await api.client.get("/api/agents", headers=api.auth)).json() == []


async def test_uninstall_of_a_clean_host_is_200(api: RunningApi, peers: Peers) -> None:
    """not_installed is not an error; without a record nothing is revoked."""
    clean = AgentOpResult(steps=(), state="not_installed", systemd=True)
    await peers.answer(subjects.ssh_agent_op("h1", "uninstall"), clean)
    response = await api.client.post("/api/agents/h1/uninstall", headers=api.auth)
    assert response.status_code == 200
    assert response.json()["state"] == "not_installed"
    assert response.json()["token_revoked"] is False
    assert "clean" in response.json()["note"]


async def test_uninstall_without_pinned_key_still_revokes(api: RunningApi, peers: Peers) -> None:
    """No pinned key: nothing is sent over SSH, but the token is revoked and the record deleted."""
    token = await _issue(api, "h2")
    response = await api.client.post("/api/agents/h2/uninstall", headers=api.auth)
    assert response.status_code == 200
    assert response.json()["state"] is None
    assert "ssh_check" in response.json()["note"]
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h2", token_sha256=hash_token(token))]
    assert await _stored_hash(api, "h2") is None


async def test_uninstall_worker_error_changes_nothing(api: RunningApi, peers: Peers) -> None:
    """A failed SSH uninstall answers 422 and keeps the token and record (retry later)."""
    token = await _issue(api, "h1")
    await peers.answer(subjects.ssh_agent_op("h1", "uninstall"), error(ErrorCode.CONNECT_FAILED, "refused"))
    response = await api.client.post("/api/agents/h1/uninstall", headers=api.auth)
    assert response.status_code == 422
    assert await _stored_hash(api, "h1") == hash_token(token)
    assert peers.revoked == []


# ----------------------------------------------------------------------------- health


async def test_health_via_agent_measures_latency(api: RunningApi, peers: Peers) -> None:
    """A pong through the gateway: connected, with the API's round trip and the agent leg."""
    pong = PingReply.model_validate(
        {
            "host_id": "h1",
            "session_id": "s1",
            "gateway_id": "gw1",
            "agent_version": __version__,
            "agent_rtt_ms": 0.4,
        }
    )
    await peers.answer(subjects.agent_ping("h1"), pong)
    await _issue(api, "h1")
    response = await api.client.post("/api/agents/h1/health", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert body["connected"] is True
    assert body["via"] == "agent"
    assert body["latency_ms"] > 0
    assert body["agent_rtt_ms"] == 0.4
    assert body["gateway_id"] == "gw1"
    assert (await api.client.get("/api/agents/h1", headers=api.auth)).json()["last_ping"] is not None


async def test_health_via_ssh_when_no_agent(
    api: RunningApi, peers: Peers, nc: NATS, signer: TestSigner
) -> None:
    """No gateway holds the host: the SSH worker runs `true` on the pinned target (signed ssh_exec)."""
    seen: list[SshExecRequest] = []

    async def handler(msg: Msg) -> None:
        request = decode_model(SshExecRequest, msg.data)
        seen.append(request)
        await reply(peers.worker, msg, _result(request))

    await peers.worker.subscribe(subjects.ssh_exec("h1"), cb=handler)
    await peers.worker.flush()
    response = await api.client.post("/api/agents/h1/health", headers=api.auth)
    body = response.json()
    assert (body["connected"], body["via"], body["reachable"]) == (False, "ssh", True)
    assert body["latency_ms"] > 0
    assert seen[0].command == "true"
    assert seen[0].target is not None
    assert seen[0].target.host_key == HOST_KEY
    verified("ssh_exec", seen[0], "h1", signer)


def _result(request: SshExecRequest) -> Message:
    return ExecResult(command_id=request.command_id or "x", exit_code=0, duration_ms=1.0, via="ssh")


async def test_health_with_neither_path(api: RunningApi) -> None:
    """No gateway, no SSH worker: not connected, not reachable, via null."""
    response = await api.client.post("/api/agents/h1/health", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert (body["connected"], body["via"], body["reachable"]) == (False, None, False)


# ----------------------------------------------------------------------------- regenerate


def rotate_ok(rotate: RotateRequest, key: SigningKey = AGENT_KEY, host: str = "h1") -> RotateOk:
    """The agent's answer to `rotate`: the hash of the token it made, signed with its own key."""
    token_sha = hash_token("9d" * 32)
    values = signing.rotated_values(host, rotate.command_id, token_sha)
    sig = signing.sign_values(key, signing.ROTATED_DOMAIN, values)
    return RotateOk(host_id=host, token_sha256=token_sha, signature=sig)


async def answer_rotation(peers: Peers, key: SigningKey = AGENT_KEY) -> None:
    """Play the live agent behind its gateway: answer each signed rotate with a rotate_ok signed by `key`."""

    async def handler(msg: Msg) -> None:
        peers.seen.setdefault(subjects.agent_rotate("h1"), []).append(msg.data)
        await reply(peers.gateway, msg, rotate_ok(decode_model(RotateRequest, msg.data), key))
        peers.events.append(f"replied {subjects.agent_rotate('h1')}")

    await peers.gateway.subscribe(subjects.agent_rotate("h1"), cb=handler)
    await peers.gateway.flush()


async def test_regenerate_with_live_agent_stores_the_agents_signed_hash(
    api: RunningApi, peers: Peers, signer: TestSigner
) -> None:
    """The live agent makes its token: the signed rotate carries none; the hash in its signed rotate_ok is
    stored, then the old hash is revoked. The answer holds no token."""
    old = await _issue(api, "h1", AGENT_PUBLIC)
    await answer_rotation(peers)
    response = await api.client.post("/api/agents/h1/regenerate-token", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert "token" not in body
    assert body["delivered"] == "session"
    raw = peers.seen[subjects.agent_rotate("h1")][0]
    carries_no_token(raw)
    rotate = decode_model(RotateRequest, raw)
    verified("rotate", rotate, "h1", signer)
    assert body["token_sha256"] == hash_token("9d" * 32)
    assert await _stored_hash(api, "h1") == hash_token("9d" * 32)
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(old))]
    assert peers.events == [f"replied {subjects.agent_rotate('h1')}", "revoked"]


async def test_rotate_ok_not_signed_by_the_agent_is_not_stored(api: RunningApi, peers: Peers) -> None:
    """A gateway answering rotate_ok with its own hash (signed by another key): nothing stored, nothing
    revoked; without an SSH worker the previous token stays valid and the answer says so."""
    old = await _issue(api, "h1", AGENT_PUBLIC)
    await answer_rotation(peers, key=signing.generate())
    response = await api.client.post("/api/agents/h1/regenerate-token", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert body["delivered"] is None
    assert "not signed by the agent" in body["note"]
    assert "previous token stays valid" in body["note"]
    assert await _stored_hash(api, "h1") == hash_token(old)
    assert api.state.lifecycle.rotations_refused == 1
    assert peers.revoked == []


async def test_regenerate_with_offline_agent_configures_over_ssh(
    api: RunningApi, peers: Peers, signer: TestSigner
) -> None:
    """No session: a signed configure (no token) makes the new token on the host; its hash is stored and
    the old one revoked after."""
    old = await _issue(api, "h1", AGENT_PUBLIC)
    await peers.answer(subjects.ssh_agent_op("h1", "configure"), RUNNING)
    response = await api.client.post(
        "/api/agents/h1/regenerate-token",
        json={"prefix": "/tmp/p", "gateway_urls": ["ws://gw-c/agent"]},
        headers=api.auth,
    )
    body = response.json()
    assert response.status_code == 200
    assert body["delivered"] == "ssh"
    assert body["token_sha256"] == hash_token(HOST_TOKEN)
    raw = peers.seen[subjects.ssh_agent_op("h1", "configure")][0]
    carries_no_token(raw)
    sent = decode_model(AgentConfigureRequest, raw)
    verified("configure", sent, "h1", signer)
    assert sent.trusted_keys == (signer.public_key,)
    assert sent.ca_pem == CA_PEM
    assert sent.prefix == "/tmp/p"
    assert sent.gateway_urls == ("ws://gw-c/agent",)
    assert await _stored_hash(api, "h1") == hash_token(HOST_TOKEN)
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(old))]
    assert peers.events == [f"replied {subjects.ssh_agent_op('h1', 'configure')}", "revoked"]


async def test_regenerate_when_everything_fails_changes_nothing(api: RunningApi, peers: Peers) -> None:
    """No session, no worker: 200, delivered null, the previous token still valid, a note saying so."""
    old = await _issue(api, "h1", AGENT_PUBLIC)
    response = await api.client.post("/api/agents/h1/regenerate-token", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert body["delivered"] is None
    assert "previous token stays valid" in body["note"]
    assert await _stored_hash(api, "h1") == hash_token(old)
    assert peers.revoked == []


# ----------------------------------------------------------------------------- hosts + install


async def test_add_host_with_install_agent(
    api: RunningApi, peers: Peers, nc: NATS, signer: TestSigner
) -> None:
    """install_agent runs the install after the (signed) check; its result (no token) is under install."""
    probes: list[SshProbeRequest] = []

    async def probe(msg: Msg) -> None:
        probes.append(decode_model(SshProbeRequest, msg.data))
        await reply(peers.worker, msg, SshProbeOk(host_key=HOST_KEY, fingerprint="SHA256:y"))

    await peers.worker.subscribe(subjects.SSH_PROBE, cb=probe)
    await peers.answer(subjects.ssh_agent_op("h3", "install"), RUNNING)
    body = {"id": "h3", "address": "10.0.0.9", "install_agent": True, "install_mode": "direct"}
    response = await api.client.post("/api/hosts", json=body, headers=api.auth)
    assert response.status_code == 201, response.text
    verified("probe", probes[0], "h3", signer)
    assert (probes[0].host_id, probes[0].address) == ("h3", "10.0.0.9")
    install = response.json()["install"]
    assert install["state"] == "running"
    assert "token" not in install
    assert install["agent_public_key"] == AGENT_PUBLIC
    assert await _stored_hash(api, "h3") == hash_token(HOST_TOKEN)
    sent = decode_model(AgentInstallRequest, peers.seen[subjects.ssh_agent_op("h3", "install")][0])
    assert sent.mode == "direct"
    failed = await api.client.post(
        "/api/hosts", json={"id": "h4", "address": "10.0.0.10", "install_agent": True}, headers=api.auth
    )
    assert failed.status_code == 201
    assert failed.json()["install"]["status"] == 503
    no_check = {"id": "h5", "address": "10.0.0.11", "install_agent": True, "ssh_check": False}
    assert (await api.client.post("/api/hosts", json=no_check, headers=api.auth)).status_code == 422


async def test_install_script_missing_is_503(api: RunningApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the shared.install package the script endpoint answers 503 in JSON, not 500."""

    def missing() -> None:
        raise ImportError("shared.install")

    monkeypatch.setattr(downloads, "install_module", missing)
    response = await api.client.get("/agent/install.sh")
    assert response.status_code == 503
    assert "install.sh" in response.json()["detail"]
