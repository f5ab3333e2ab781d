"""`warlock api-key create` and `warlock agent-token` against the API's database."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.api import crud
from services.api.cli import main
from shared.tokens import hash_token
from tests.support.db import api_settings, running_api
from tests.support.natsserver import NatsServer


async def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    import asyncio

    code = await asyncio.to_thread(main, argv)  # the CLI runs its own event loop
    out, err = capsys.readouterr()
    return code, out.strip(), err


async def test_cli_creates_api_keys_and_agent_tokens(
    tmp_path: Path,
    nats_server: NatsServer,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The printed API key authenticates; the printed agent token's hash is what the database holds."""
    monkeypatch.setenv("WARLOCK_API_DATABASE_URL", database)
    code, key, _ = await _cli(["api-key", "create", "--name", "ops"], capsys)
    assert code == 0
    assert len(key) == 64
    code, _, err = await _cli(["api-key", "create", "--name", "ops"], capsys)
    assert code == 1
    assert "exists" in err
    code, _, err = await _cli(["agent-token", "h1"], capsys)
    assert code == 1
    assert "unknown host" in err

    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        auth = {"Authorization": f"Bearer {key}"}
        created = await api.client.post(
            "/api/hosts", json={"id": "h1", "address": "10.1.1.1", "ssh_check": False}, headers=auth
        )
        assert created.status_code == 201
        assert api.key == ""  # a key existed already: no bootstrap key was written
        code, token, _ = await _cli(["agent-token", "10.1.1.1"], capsys)
        assert code == 0
        async with api.state.sessions() as session:
            assert await crud.host_for_token_hash(session, hash_token(token)) == "h1"
            agent = await crud.get_agent(session, "h1")
        assert agent is not None
        assert agent.token_hash == hash_token(token)


async def test_warlock_api_process_logs_its_contract_lines(tmp_path: Path, nats_server: NatsServer) -> None:
    """`warlock-api` logs the key file path and `api listening on http://host:port` once, then serves."""
    import httpx

    from tests.support.procs import BIN, Proc

    key_file = tmp_path / "state" / "api-key"
    env = {
        **nats_server.env("api"),
        "WARLOCK_API_PORT": "0",
        "WARLOCK_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
        "WARLOCK_API_API_KEY_FILE": str(key_file),
    }
    proc = Proc("api", [str(BIN / "warlock-api")], tmp_path, env=env)
    try:
        port = int(proc.wait_for(r"api listening on http://127\.0\.0\.1:(\d+)").group(1))
        key = key_file.read_text().strip()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            health = await client.get("/healthz")
            hosts = await client.get("/api/hosts", headers={"Authorization": f"Bearer {key}"})
    finally:
        code = proc.stop()
    assert health.status_code == 200
    assert hosts.status_code == 200
    assert code in (0, -15)  # uvicorn re-raises the signal after a graceful shutdown
    log = proc.log()
    assert "Application shutdown complete" in log
    assert f"api key written to {key_file}" in log
    assert proc.count("api listening on") == 1
    assert key not in log


async def test_agent_token_without_nats_prints_the_token_and_exits_3(
    tmp_path: Path,
    nats_server: NatsServer,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A first token needs no NATS (exit 0). Replacing one with NATS unreachable still prints the new,
    valid token, but says on stderr that the live session was not closed, and exits 3."""
    from tests.support.procs import free_port

    monkeypatch.setenv("WARLOCK_API_DATABASE_URL", database)
    monkeypatch.setenv("WARLOCK_NATS_URL", f"nats://127.0.0.1:{free_port()}")  # nothing listens there
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        created = await api.client.post(
            "/api/hosts", json={"id": "h1", "address": "10.1.1.1", "ssh_check": False}, headers=api.auth
        )
        assert created.status_code == 201
        code, first, err = await _cli(["agent-token", "h1"], capsys)
        assert (code, err) == (0, "")
        code, second, err = await _cli(["agent-token", "h1"], capsys)
        assert code == 3
        assert len(second) == 64
        assert second != first
        assert "was not closed" in err
        assert "unreachable" in err
        assert first not in err
        assert second not in err
        async with api.state.sessions() as session:
            assert await crud.host_for_token_hash(session, hash_token(second)) == "h1"
            assert await crud.host_for_token_hash(session, hash_token(first)) is None
