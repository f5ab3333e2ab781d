"""`warlock api-key create`, `warlock agent-token`, `warlock signing-keys` and `warlock req`'s signing against
the API's database (and a real nats-server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.api.store import crud
from services.ctl.cli import main
from shared import signing, subjects
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

    from services.dev.procs import BIN, Proc

    key_file = tmp_path / "state" / "api-key"
    env = {
        **nats_server.env("api"),
        "WARLOCK_API_PORT": "0",
        "WARLOCK_API_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
        "WARLOCK_API_API_KEY_FILE": str(key_file),
        "WARLOCK_API_SIGNING_KEY_FILE": str(tmp_path / "signing.key"),
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
    assert f"signing key {signing.key_id(signing.load_private(tmp_path / 'signing.key'))} created in" in log
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    assert "PRIVATE KEY" not in log
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
    from services.dev.procs import free_port

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


async def test_keys_and_signed_req(
    tmp_path: Path,
    nats_server: NatsServer,
    database: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`warlock signing-keys create` writes a 0600 private key and prints its path and id (never the key);
    `warlock req` on an agent exec subject is rewritten to the ops subject, signed with that key, run once
    and recorded as operator:NAME; without a key it refuses; after `keys revoke` the API says forbidden."""
    from nats.aio.msg import Msg

    from shared.natsx import reply
    from tests.support.fakeagent import AgentKey, checked_request, register_agent_key

    monkeypatch.setenv("WARLOCK_API_DATABASE_URL", database)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("WARLOCK_OPERATOR_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .warlock/dev.json here
    monkeypatch.setenv(
        "WARLOCK_NATS_NKEY_FILE", str(nats_server.nkey_file("operator"))
    )  # `req` is the operator
    key_file = tmp_path / "keys" / "alice.key"
    code, out, _ = await _cli(["signing-keys", "create", "alice", "--out", str(key_file)], capsys)
    assert code == 0, out
    key = signing.load_private(key_file)  # 0600, else this raises
    assert str(key_file) in out
    assert signing.key_id(key) in out
    assert "PRIVATE" not in out
    code, out, _ = await _cli(["signing-keys", "create", "bob"], capsys)
    assert code == 0
    assert (tmp_path / "config" / "warlock" / "bob.key").exists()
    code, _, err = await _cli(
        ["signing-keys", "create", "alice", "--out", str(tmp_path / "other.key")], capsys
    )
    assert (code, "exists" in err) == (1, True)
    assert not (tmp_path / "other.key").exists()
    code, _, err = await _cli(["signing-keys", "create", "../evil"], capsys)
    assert (code, "bad key name" in err) == (1, True)

    agent = AgentKey()
    async with running_api(api_settings(tmp_path, nats_server.url, database)) as api:
        body = {"id": "h1", "address": "10.1.1.1", "ssh_check": False}
        assert (await api.client.post("/api/hosts", json=body, headers=api.auth)).status_code == 201
        await register_agent_key(api, "h1", agent.public_key)
        nc = await nats_server.connect("gateway")
        seen: list[str | None] = []

        async def answer(msg: Msg) -> None:
            request = checked_request(api, "h1", msg.data)
            seen.append(request.command_id)
            await reply(nc, msg, agent.result("h1", command_id=request.command_id, stdout="hi\n"))

        await nc.subscribe(subjects.agent_exec("h1"), cb=answer)
        await nc.flush()
        try:
            req = ["req", "warlock.agent.h1.exec", '{"command": "echo hi"}', "--server", nats_server.url]
            code, out, err = await _cli([*req, "--key", str(key_file)], capsys)
            assert code == 0, err
            assert "sending to warlock.ops.h1.exec instead" in err
            result = json.loads(out)
            assert (result["type"], result["stdout"], result["via"]) == ("result", "hi\n", "agent")
            assert seen == [result["command_id"]]
            row = (await api.client.get(f"/api/commands/{result['command_id']}", headers=api.auth)).json()
            assert (row["requested_by"], row["status"]) == ("operator:alice", "succeeded")

            code, out, err = await _cli(req, capsys)  # no key anywhere
            assert code == 2
            assert "warlock signing-keys create" in err
            assert len(seen) == 1

            code, out, _ = await _cli(["signing-keys", "list"], capsys)
            assert code == 0
            lines = out.splitlines()
            assert [line.split()[0] for line in lines[1:]] == ["alice", "bob"]
            code, out, _ = await _cli(["signing-keys", "revoke", "alice"], capsys)
            assert (code, "revoked" in out) == (0, True)
            monkeypatch.setenv("WARLOCK_OPERATOR_KEY", str(key_file))
            code, out, err = await _cli(req, capsys)
            assert code == 0, err
            refused = json.loads(out)
            assert (refused["type"], refused["code"]) == ("error", "forbidden")
            assert len(seen) == 1
        finally:
            await nc.close()
