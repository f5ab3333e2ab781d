"""Upgrade-time auth, /healthz, the token-file authority and the ``warlock-gateway`` CLI, on real servers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from services.gateway.server import Gateway
from shared import subjects
from shared.errors import ErrorCode
from shared.protocol import ErrorReply, TokenOk, TokenVerifyRequest, decode_token_reply, encode
from shared.tokens import generate_token, hash_token
from tests.integration.gateway_fixtures import (
    Fleet,
    agent,
    agent_url,
    api_client,
    nats_server,
    running_gateway,
    token_authority,
)
from tests.support.natsserver import role_env


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One nats-server for this module."""
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture
async def gw_client(nats_url: str) -> AsyncIterator[NATS]:
    """A NATS client playing a gateway (the role that asks the token authority)."""
    nc = await api_client(nats_url, "gateway")
    yield nc
    await nc.close()


async def http_get(port: int, path: str) -> tuple[int, dict[str, object]]:
    """A plain HTTP/1.1 GET on the gateway port; return status and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def upgrade_status(gateway: Gateway, headers: dict[str, str]) -> int:
    """Try to upgrade with `headers`; return the HTTP status of the refusal."""
    with pytest.raises(InvalidStatus) as info:
        await connect(agent_url(gateway), additional_headers=headers)
    return info.value.response.status_code


async def test_missing_malformed_or_unknown_token_is_401(nats_url: str, tmp_path: Path) -> None:
    """No header, a malformed one, or a token the authority does not know: 401 and no session."""
    fleet = Fleet(tmp_path / "tokens.json", ("web-1",))
    async with token_authority(nats_url, fleet.path), running_gateway(nats_url) as gateway:
        assert await upgrade_status(gateway, {}) == 401
        assert await upgrade_status(gateway, {"Authorization": "Basic abc"}) == 401
        assert await upgrade_status(gateway, {"Authorization": f"Bearer {fleet.tokens['web-1']}x"}) == 401
        assert await upgrade_status(gateway, {"Authorization": f"Bearer {generate_token()}"}) == 401
        assert gateway.sessions == {}
        async with agent(gateway, "web-1", fleet.tokens["web-1"]) as fake:
            assert fake.welcome is not None


async def test_authority_down_is_503_and_healthz_and_404(nats_url: str) -> None:
    """Without a token authority the upgrade gets 503; /healthz is 200 JSON; other paths 404."""
    async with running_gateway(nats_url, gateway_id="gw-health") as gateway:
        assert await upgrade_status(gateway, {"Authorization": f"Bearer {generate_token()}"}) == 503
        status, body = await http_get(gateway.port, "/healthz")
        assert status == 200
        assert body == {"status": "ok", "gateway_id": "gw-health", "sessions": 0, "nats": "connected"}
        status, body = await http_get(gateway.port, "/nope")
        assert status == 404


async def test_positive_answers_are_cached(nats_url: str, tmp_path: Path) -> None:
    """Once verified, a token is accepted from the cache while the authority is away."""
    fleet = Fleet(tmp_path / "tokens.json", ("web-1",))
    async with running_gateway(nats_url) as gateway:
        async with token_authority(nats_url, fleet.path), agent(gateway, "web-1", fleet.tokens["web-1"]):
            pass
        async with agent(gateway, "web-1", fleet.tokens["web-1"]) as fake:
            assert fake.welcome is not None


async def test_token_file_authority_answers_and_reloads(
    nats_url: str, gw_client: NATS, tmp_path: Path
) -> None:
    """The dev authority maps a hash to its host, refuses unknown hashes and bad bodies, and reloads."""
    fleet = Fleet(tmp_path / "tokens.json", ("web-1",))
    async with token_authority(nats_url, fleet.path):

        async def verify(token: str) -> TokenOk | ErrorReply:
            body = encode(TokenVerifyRequest(token_sha256=hash_token(token)))
            return decode_token_reply((await gw_client.request(subjects.TOKEN_VERIFY, body, timeout=5)).data)

        assert await verify(fleet.tokens["web-1"]) == TokenOk(host_id="web-1")
        unknown = await verify(generate_token())
        assert isinstance(unknown, ErrorReply)
        assert unknown.code == ErrorCode.UNAUTHORIZED
        bad = decode_token_reply(
            (await gw_client.request(subjects.TOKEN_VERIFY, b'{"x": 1}', timeout=5)).data
        )
        assert isinstance(bad, ErrorReply)
        assert bad.code == ErrorCode.BAD_REQUEST
        old = fleet.tokens["web-1"]
        fleet.tokens["web-1"] = generate_token()
        fleet.tokens["web-2"] = generate_token()
        fleet.write()
        assert await verify(fleet.tokens["web-2"]) == TokenOk(host_id="web-2")
        assert await verify(fleet.tokens["web-1"]) == TokenOk(host_id="web-1")
        assert isinstance(await verify(old), ErrorReply)


def test_cli_config_error_exits_2() -> None:
    """A bad setting prints one line naming the field and exits 2, no traceback."""
    env = {**os.environ, "WARLOCK_GATEWAY_PORT": "not-a-port"}
    proc = subprocess.run(
        [sys.executable, "-c", "from services.gateway.cli import main; main()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("warlock-gateway: config error: port (WARLOCK_GATEWAY_PORT): ")
    assert "Traceback" not in proc.stderr


async def test_cli_serves_and_exits_0_on_sigterm(nats_url: str) -> None:
    """The CLI logs the listening line (parsed for the port), answers /healthz, exits 0 on SIGTERM."""
    env = {
        **os.environ,
        **role_env(nats_url, "gateway"),
        "WARLOCK_GATEWAY_PORT": "0",
        "WARLOCK_GATEWAY_GATEWAY_ID": "gw-cli",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from services.gateway.cli import main; main()", "run",
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(10):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "gateway exited early"
            found = re.search(r"gateway (\S+) listening on ws://127\.0\.0\.1:(\d+)/agent", line)
            if found:
                break
    assert found.group(1) == "gw-cli"
    status, body = await http_get(int(found.group(2)), "/healthz")
    assert (status, body["gateway_id"]) == (200, "gw-cli")
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        rest = await proc.stderr.read()
        assert await proc.wait() == 0
    assert b"Traceback" not in rest
