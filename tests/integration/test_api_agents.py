"""The agent lifecycle endpoints against a real nats-server and both databases.

The gateway and the SSH worker are played by plain nats-py responders that record what they receive; the
agent wheel is a small fake file (the real build is tested once, in tests/unit/test_api_wheel.py).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from services.api import crud
from services.api.models import AgentConnection
from services.api.routes import downloads
from shared import subjects
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
    TokenRevoked,
    decode_model,
)
from shared.tokens import hash_token
from shared.version import __version__, wheel_name
from tests.support.db import RunningApi, api_settings, eventually, running_api
from tests.support.natsserver import NatsServer

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFnZW50c3Rlc3RrZXkwMTIzNDU2Nzg5YWJjZGVmZ2g"
WHEEL_NAME = wheel_name()
WHEEL_BYTES = b"PK\x03\x04 not really a wheel, but bytes with a hash"
WHEEL_SHA = hashlib.sha256(WHEEL_BYTES).hexdigest()
STEPS = (InstallStep(name="sha256", ok=True, detail=WHEEL_SHA), InstallStep(name="unit", ok=True))
RUNNING = AgentOpResult(steps=STEPS, state="running", systemd=True)


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    """The API with a fake agent wheel and short timeouts, host h1 (pinned key) and h2 (no key) added."""
    wheel = tmp_path / WHEEL_NAME
    wheel.write_bytes(WHEEL_BYTES)
    settings = api_settings(
        tmp_path,
        nats_server.url,
        database,
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
    """Plays gateways and SSH workers: records each request (in order) and answers with a canned message."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.seen: dict[str, list[bytes]] = {}
        self.events: list[str] = []
        self.revoked: list[TokenRevoked] = []

    async def answer(self, subject: str, message: Message | None) -> None:
        """Subscribe to `subject`; answer every request with `message` (None: never answer)."""

        async def handler(msg: Msg) -> None:
            self.seen.setdefault(subject, []).append(msg.data)
            if message is not None:
                await reply(self.nc, msg, message)
            self.events.append(f"replied {subject}")

        await self.nc.subscribe(subject, cb=handler)
        await self.nc.flush()

    async def any_revoked(self) -> bool:
        """Whether a revocation arrived yet."""
        return bool(self.revoked)

    async def watch_revocations(self) -> None:
        """Record every TokenRevoked published."""

        async def handler(msg: Msg) -> None:
            self.revoked.append(decode_model(TokenRevoked, msg.data))
            self.events.append("revoked")

        await self.nc.subscribe(subjects.TOKEN_REVOKED, cb=handler)
        await self.nc.flush()


@pytest.fixture
async def peers(nc: NATS) -> Peers:
    """Responders on the test's NATS, with revocations recorded."""
    p = Peers(nc)
    await p.watch_revocations()
    return p


async def _stored_hash(api: RunningApi, host: str) -> str | None:
    async with api.state.sessions() as session:
        agent = await crud.get_agent(session, host)
    return None if agent is None else agent.token_hash


async def _issue(api: RunningApi, host: str) -> str:
    async with api.state.sessions() as session:
        return await crud.issue_agent_token(session, host)


# ----------------------------------------------------------------------------- install


async def test_install_sends_the_wheel_and_stores_only_the_token_hash(
    api: RunningApi, peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker gets the wheel (sha256 matching), the pinned target and a token whose hash is stored."""
    await peers.answer(subjects.ssh_agent_op("h1", "install"), RUNNING)
    with caplog.at_level(logging.DEBUG):
        response = await api.client.post(
            "/api/agents/10.0.0.7/install", json={"prefix": "/tmp/scratch"}, headers=api.auth
        )
    assert response.status_code == 200, response.text
    body = response.json()
    token = body["token"]
    assert body["host_id"] == "h1"
    assert body["state"] == "running"
    assert body["systemd"] is True
    assert [s["name"] for s in body["steps"]] == ["sha256", "unit"]
    request = decode_model(AgentInstallRequest, peers.seen[subjects.ssh_agent_op("h1", "install")][0])
    assert request.token == token
    assert request.wheel_name == WHEEL_NAME
    assert request.wheel_sha256 == WHEEL_SHA
    assert hashlib.sha256(base64.b64decode(request.wheel_b64)).hexdigest() == WHEEL_SHA
    assert request.target.host_key == HOST_KEY
    assert request.prefix == "/tmp/scratch"
    assert request.mode == "auto"
    assert request.gateway_urls == ("ws://gw-a:8765/agent", "wss://gw-b/agent")
    assert await _stored_hash(api, "h1") == hash_token(token)
    assert peers.revoked == []  # no previous token
    assert token not in caplog.text
    assert "installing the agent on h1" in caplog.text


async def test_reinstall_revokes_the_previous_token(api: RunningApi, peers: Peers) -> None:
    """Installing again (upgrade) issues a new token and revokes the one it replaces."""
    await peers.answer(subjects.ssh_agent_op("h1", "install"), RUNNING)
    first = (await api.client.post("/api/agents/h1/install", headers=api.auth)).json()["token"]
    second = await api.client.post("/api/agents/h1/install", json={"mode": "systemd"}, headers=api.auth)
    assert second.status_code == 200
    assert await _stored_hash(api, "h1") == hash_token(second.json()["token"])
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(first))]


async def test_install_without_systemd_is_409_and_the_new_token_is_revoked(
    api: RunningApi, peers: Peers
) -> None:
    """state no_systemd: 409 with the steps and a hint to use direct; the previous token is restored."""
    old = await _issue(api, "h1")
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
    sent = decode_model(AgentInstallRequest, peers.seen[subjects.ssh_agent_op("h1", "install")][0])
    assert await _stored_hash(api, "h1") == hash_token(old)
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(sent.token))]


async def test_install_without_pinned_key_is_409(api: RunningApi, peers: Peers) -> None:
    """A host added without ssh_check cannot be installed: 409 telling how to fix it; nothing is sent."""
    await peers.answer(subjects.ssh_agent_op("h2", "install"), RUNNING)
    response = await api.client.post("/api/agents/h2/install", headers=api.auth)
    assert response.status_code == 409
    assert "ssh_check" in response.json()["detail"]
    assert peers.seen == {}
    assert await _stored_hash(api, "h2") is None


async def test_install_without_worker_is_503_and_leaves_no_token(api: RunningApi) -> None:
    """No SSH worker: 503, and the token issued for the attempt is withdrawn."""
    response = await api.client.post("/api/agents/h1/install", headers=api.auth)
    assert response.status_code == 503
    assert "SSH worker" in response.json()["detail"]
    assert await _stored_hash(api, "h1") is None


@pytest.mark.parametrize(("code", "status"), [(ErrorCode.AUTH_FAILED, 422), (ErrorCode.INTERNAL, 502)])
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


# ----------------------------------------------------------------------------- downloads


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


# ----------------------------------------------------------------------------- uninstall


async def test_uninstall_revokes_the_stored_hash_and_deletes_the_record(
    api: RunningApi, peers: Peers
) -> None:
    """The worker removes the agent; the record goes and the old hash is published as revoked."""
    token = await _issue(api, "h1")
    removed = AgentOpResult(steps=(InstallStep(name="remove", ok=True),), state="removed", systemd=True)
    await peers.answer(subjects.ssh_agent_op("h1", "uninstall"), removed)
    response = await api.client.post("/api/agents/h1/uninstall", json={"prefix": "/tmp/x"}, headers=api.auth)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "removed"
    assert response.json()["token_revoked"] is True
    sent = decode_model(AgentUninstallRequest, peers.seen[subjects.ssh_agent_op("h1", "uninstall")][0])
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


async def test_health_via_ssh_when_no_agent(api: RunningApi, peers: Peers, nc: NATS) -> None:
    """No gateway holds the host: the SSH worker runs `true` on the pinned target."""
    seen: list[SshExecRequest] = []

    async def handler(msg: Msg) -> None:
        request = decode_model(SshExecRequest, msg.data)
        seen.append(request)
        await reply(nc, msg, _result(request))

    await nc.subscribe(subjects.ssh_exec("h1"), cb=handler)
    await nc.flush()
    response = await api.client.post("/api/agents/h1/health", headers=api.auth)
    body = response.json()
    assert (body["connected"], body["via"], body["reachable"]) == (False, "ssh", True)
    assert body["latency_ms"] > 0
    assert seen[0].command == "true"
    assert seen[0].target is not None
    assert seen[0].target.host_key == HOST_KEY


def _result(request: SshExecRequest) -> Message:
    return ExecResult(command_id=request.command_id or "x", exit_code=0, duration_ms=1.0, via="ssh")


async def test_health_with_neither_path(api: RunningApi) -> None:
    """No gateway, no SSH worker: not connected, not reachable, via null."""
    response = await api.client.post("/api/agents/h1/health", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert (body["connected"], body["via"], body["reachable"]) == (False, None, False)


# ----------------------------------------------------------------------------- regenerate


async def test_regenerate_with_live_agent_rotates_then_revokes_the_old_hash(
    api: RunningApi, peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    """The live agent gets the new token (whose hash is stored); the old hash is revoked after its reply."""
    old = await _issue(api, "h1")
    await peers.answer(subjects.agent_rotate("h1"), RotateOk(host_id="h1"))
    with caplog.at_level(logging.DEBUG):
        response = await api.client.post("/api/agents/h1/regenerate-token", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert body["delivered"] == "session"
    rotate = decode_model(RotateRequest, peers.seen[subjects.agent_rotate("h1")][0])
    assert rotate.token == body["token"]
    assert await _stored_hash(api, "h1") == hash_token(body["token"])
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(old))]
    assert peers.events == [f"replied {subjects.agent_rotate('h1')}", "revoked"]
    assert body["token"] not in caplog.text


async def test_regenerate_with_offline_agent_configures_over_ssh(api: RunningApi, peers: Peers) -> None:
    """No session: revoke the old hash, then the worker rewrites the config with the new token."""
    old = await _issue(api, "h1")
    await peers.answer(subjects.ssh_agent_op("h1", "configure"), RUNNING)
    response = await api.client.post(
        "/api/agents/h1/regenerate-token",
        json={"prefix": "/tmp/p", "gateway_urls": ["ws://gw-c/agent"]},
        headers=api.auth,
    )
    body = response.json()
    assert response.status_code == 200
    assert body["delivered"] == "ssh"
    sent = decode_model(AgentConfigureRequest, peers.seen[subjects.ssh_agent_op("h1", "configure")][0])
    assert sent.token == body["token"]
    assert sent.prefix == "/tmp/p"
    assert sent.gateway_urls == ("ws://gw-c/agent",)
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(old))]
    assert peers.events == ["revoked", f"replied {subjects.ssh_agent_op('h1', 'configure')}"]


async def test_regenerate_when_everything_fails_still_answers_the_token(
    api: RunningApi, peers: Peers
) -> None:
    """No session, no worker: 200, delivered null, the token valid and a note saying what to do."""
    old = await _issue(api, "h1")
    response = await api.client.post("/api/agents/h1/regenerate-token", headers=api.auth)
    assert response.status_code == 200
    body = response.json()
    assert body["delivered"] is None
    assert "by hand" in body["note"]
    assert await _stored_hash(api, "h1") == hash_token(body["token"])
    await eventually(peers.any_revoked)
    assert peers.revoked == [TokenRevoked(host_id="h1", token_sha256=hash_token(old))]


# ----------------------------------------------------------------------------- hosts + install


async def test_add_host_with_install_agent(api: RunningApi, peers: Peers, nc: NATS) -> None:
    """install_agent runs the install after the check; its result (with the token) is under install."""

    async def probe(msg: Msg) -> None:
        await reply(nc, msg, SshProbeOk(host_key=HOST_KEY, fingerprint="SHA256:y"))

    await nc.subscribe(subjects.SSH_PROBE, cb=probe)
    await peers.answer(subjects.ssh_agent_op("h3", "install"), RUNNING)
    body = {"id": "h3", "address": "10.0.0.9", "install_agent": True, "install_mode": "direct"}
    response = await api.client.post("/api/hosts", json=body, headers=api.auth)
    assert response.status_code == 201, response.text
    install = response.json()["install"]
    assert install["state"] == "running"
    assert await _stored_hash(api, "h3") == hash_token(install["token"])
    sent = decode_model(AgentInstallRequest, peers.seen[subjects.ssh_agent_op("h3", "install")][0])
    assert sent.mode == "direct"
    failed = await api.client.post(
        "/api/hosts", json={"id": "h4", "address": "10.0.0.10", "install_agent": True}, headers=api.auth
    )
    assert failed.status_code == 201
    assert failed.json()["install"]["status"] == 503
    no_check = {"id": "h5", "address": "10.0.0.11", "install_agent": True, "ssh_check": False}
    assert (await api.client.post("/api/hosts", json=no_check, headers=api.auth)).status_code == 422


async def test_install_timeout_is_504_and_keeps_the_new_token(api: RunningApi, peers: Peers) -> None:
    """A worker that never answers: 504 (the install may have finished, so the host may hold the token)."""
    await peers.answer(subjects.ssh_agent_op("h1", "install"), None)
    response = await api.client.post("/api/agents/h1/install", headers=api.auth)
    assert response.status_code == 504
    assert response.json()["code"] == "timeout"
    sent = decode_model(AgentInstallRequest, peers.seen[subjects.ssh_agent_op("h1", "install")][0])
    assert await _stored_hash(api, "h1") == hash_token(sent.token)


async def test_install_script_missing_is_503(api: RunningApi, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the shared.install package the script endpoint answers 503 in JSON, not 500."""

    def missing() -> None:
        raise ImportError("shared.install")

    monkeypatch.setattr(downloads, "install_module", missing)
    response = await api.client.get("/agent/install.sh")
    assert response.status_code == 503
    assert "install.sh" in response.json()["detail"]
