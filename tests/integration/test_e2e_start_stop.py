"""Start and stop in every state: NATS absent at start, NATS gone while serving, database down.

Real processes throughout (API, gateway, SSH worker, token authority, agent, nats-server). Every service
must stop on SIGTERM within its drain timeout, retry NATS with one log line per attempt (no traceback),
and the API must open its port and say why NATS is missing while it retries.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from services.dev.files import ensure_ssh_key
from services.dev.procs import BIN, Proc, free_port
from tests.support.natsserver import NatsServer
from tests.support.stack import Api, Stack

pytestmark = pytest.mark.e2e

DRAIN_S = 2  # drain timeouts the services get here; each must be gone within DRAIN_S + SLACK_S
SLACK_S = 6.0
NATS_FAILED = r"NATS at \S+: ConnectionRefusedError"


def stop_cleanly(proc: Proc, seconds: float) -> None:
    """SIGTERM `proc`: it must exit 0 within `seconds` (else it is SIGKILLed) and have logged no traceback."""
    proc.signal(signal.SIGTERM)
    try:
        code = proc.popen.wait(seconds)
    except Exception:
        proc.kill()
        raise AssertionError(f"{proc.name} ignored SIGTERM for {seconds}s:\n{proc.log()[-3000:]}") from None
    assert code == 0, f"{proc.name} exited {code}:\n{proc.log()[-2000:]}"
    assert "Traceback" not in proc.log(), proc.log()[-3000:]


def assert_nats_failure_logged_once(proc: Proc) -> None:
    """A failing NATS is logged once per reason (and again after 30 s), not once per attempt."""
    assert 1 <= proc.count(NATS_FAILED) <= 2, proc.log()[-3000:]


def env_for(stack: Stack, role: str = "api", **extra: str) -> dict[str, str]:
    """The stack's environment for `role` with every drain timeout shortened to DRAIN_S."""
    drains = {
        "WARLOCK_GATEWAY_DRAIN_TIMEOUT": str(DRAIN_S),
        "WARLOCK_SSH_DRAIN_TIMEOUT": str(DRAIN_S),
        "WARLOCK_API_SHUTDOWN_TIMEOUT": str(DRAIN_S),
    }
    return stack.env(role, **drains, **extra)


def start_services(stack: Stack, tmp_path: Path, db_url: str, authority: bool = True) -> dict[str, Proc]:
    """API, gateway, SSH worker (and the file token authority), without waiting for them to be ready."""
    key = ensure_ssh_key(tmp_path / "ssh" / "id_ed25519")
    api_env = env_for(
        stack,
        WARLOCK_API_PORT="0",
        WARLOCK_API_DATABASE_URL=db_url,
        WARLOCK_API_API_KEY_FILE=str(tmp_path / "api-key"),
        WARLOCK_API_SIGNING_KEY_FILE=str(stack.signer.key_file),
    )
    gateway_env = env_for(stack, "gateway", WARLOCK_GATEWAY_PORT="0")
    procs = {
        "api": stack.start("api", [str(BIN / "warlock-api")], api_env),
        "gateway": stack.start("gateway", [str(BIN / "warlock-gateway")], gateway_env),
        "worker": stack.start(
            "worker",
            [str(BIN / "warlock-fallback-ssh")],
            env_for(
                stack,
                "ssh-worker",
                WARLOCK_SSH_KEY_FILE=str(key),
                WARLOCK_SSH_TRUSTED_KEYS=stack.signer.public_key,
            ),
        ),
    }
    if authority:
        argv = [str(BIN / "warlock"), "token-authority", "--file", str(stack.tokens_file)]
        procs["authority"] = stack.start("authority", argv, env_for(stack))
    return procs


async def test_api_serves_503_naming_nats_until_nats_appears(tmp_path: Path) -> None:
    """No NATS at start: the API listens, /healthz and exec answer 503 naming NATS; then NATS comes up."""
    port = free_port()
    stack = Stack(tmp_path, f"nats://127.0.0.1:{port}")
    nats_server: NatsServer | None = None
    try:
        api = Api(
            stack.start(
                "api",
                [str(BIN / "warlock-api")],
                env_for(
                    stack,
                    WARLOCK_API_PORT="0",
                    WARLOCK_API_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
                    WARLOCK_API_API_KEY_FILE=str(tmp_path / "api-key"),
                ),
            ),
            "sqlite",
            tmp_path / "api-key",
        )
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            health = await http.get("/healthz")
            assert health.status_code == 503
            assert health.json()["nats"].startswith("unavailable: ConnectionRefusedError")
            assert health.json()["database"] == "ok"
            answer = await http.post("/api/hosts/h1/exec", json={"command": "true"}, headers=api.auth)
            assert answer.status_code == 503
            assert "NATS unavailable" in answer.json()["detail"]
            assert (await http.get("/api/hosts", headers=api.auth)).status_code == 200  # no NATS needed

            nats_server = NatsServer(tmp_path, port=port)
            for _ in range(100):
                health = await http.get("/healthz")
                if health.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert health.json() == {"status": "ok", "nats": "ok", "database": "ok"}
        assert api.proc.count("NATS connected to") == 1
        assert_nats_failure_logged_once(api.proc)
        stop_cleanly(api.proc, DRAIN_S + SLACK_S)
    finally:
        stack.close()
        if nats_server is not None:
            nats_server.stop()


async def test_every_service_stops_on_sigterm_while_waiting_for_nats(tmp_path: Path) -> None:
    """Never connected: each service logs one line per reason, no traceback, and stops at once on SIGTERM."""
    stack = Stack(tmp_path, f"nats://127.0.0.1:{free_port()}")
    try:
        procs = start_services(stack, tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
        agent = stack.start_agent(
            "agent", "h1", "0" * 64, [f"ws://127.0.0.1:{free_port()}/agent"], wait=False
        )
        for proc in procs.values():
            proc.wait_for(NATS_FAILED, timeout=20)
        agent.wait_for("cannot connect to", timeout=20)
        await asyncio.sleep(5)  # a few retries: still one line per reason
        for proc in procs.values():
            assert_nats_failure_logged_once(proc)
        for proc in [*procs.values(), agent]:
            stop_cleanly(proc, SLACK_S)
    finally:
        stack.close()


async def test_every_service_stops_within_its_drain_timeout_after_nats_died(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """NATS killed under a serving stack: every service notices, and SIGTERM stops each within its drain."""
    stack = Stack(tmp_path, nats_server.url)
    try:
        db_url = f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
        procs = start_services(stack, tmp_path, db_url, authority=False)
        api = Api(procs["api"], db_url, tmp_path / "api-key")
        procs["worker"].wait_for(r"ssh fallback worker \S+ ready")
        gateway_url = procs["gateway"].wait_for(r"listening on (ws://\S+/agent)").group(1)
        async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=10) as http:
            body = {"id": "h1", "address": "127.0.0.1", "ssh_check": False}
            assert (await http.post("/api/hosts", json=body)).status_code == 201
        agent = stack.start_agent("agent", "h1", stack.agent_token(api, "h1"), [gateway_url])

        nats_server.proc.kill()
        for proc in procs.values():
            proc.wait_for("NATS disconnected", timeout=20)
        for proc in [*procs.values(), agent]:
            stop_cleanly(proc, DRAIN_S + SLACK_S)
    finally:
        stack.close()


async def test_api_stops_on_sigterm_while_the_database_is_down(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """PostgreSQL unreachable: the API listens, answers 503 naming the database, and stops on SIGTERM."""
    stack = Stack(tmp_path, nats_server.url)
    try:
        db_url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"
        proc = start_services(stack, tmp_path, db_url)["api"]
        url = proc.wait_for(r"api listening on (http://\S+)", timeout=60).group(1)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            health = await http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["nats"] == "ok"
        assert health.json()["database"].startswith("error: ")
        stop_cleanly(proc, DRAIN_S + SLACK_S)
    finally:
        stack.close()
