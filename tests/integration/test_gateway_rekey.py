"""Token rotation and revocation through a real gateway, nats-server and token authority (fake agent)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from services.gateway.server import Gateway
from shared import signing, subjects
from shared.errors import CloseCode, ErrorCode
from shared.ids import CommandId
from shared.protocol import (
    ErrorReply,
    Ping,
    Pong,
    RotateOk,
    RotateRequest,
    RotateToken,
    TokenRevoked,
    TokenRotated,
    decode_rotate_reply,
    encode,
)
from shared.tokens import generate_token, hash_token
from tests.integration.gateway_fixtures import (
    Fleet,
    agent,
    agent_url,
    api_client,
    nats_server,
    running_gateway,
    synced,
    token_authority,
)

HOSTS = ("web-1", "web-2")


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One nats-server for this module."""
    with nats_server(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture
async def fleet(nats_url: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    """Hosts with fresh tokens, served by a token authority."""
    hosts = Fleet(tmp_path / "tokens.json", HOSTS)
    async with token_authority(nats_url, hosts.path):
        yield hosts


@pytest.fixture
async def api(nats_url: str) -> AsyncIterator[NATS]:
    """A NATS client playing the API."""
    nc = await api_client(nats_url)
    yield nc
    await nc.close()


@pytest.fixture
async def gateway(nats_url: str, fleet: Fleet) -> AsyncIterator[Gateway]:
    """An in-process gateway with a short rotation timeout."""
    async with running_gateway(nats_url, rotate_timeout=0.5) as gw:
        yield gw


async def rotate(api: NATS, host: str, body: bytes) -> RotateOk | ErrorReply:
    """Send a rotate request for `host` and decode the answer."""
    return decode_rotate_reply((await api.request(subjects.agent_rotate(host), body, timeout=5)).data)


async def upgrade_status(gateway: Gateway, token: str) -> int | None:
    """The HTTP status of an upgrade attempt with `token` (None if it was accepted)."""
    try:
        async with connect(agent_url(gateway), additional_headers={"Authorization": f"Bearer {token}"}):
            return None
    except InvalidStatus as exc:
        return exc.response.status_code


def rotate_body(command_id: str = "rot-1", host: str = "web-1") -> tuple[RotateRequest, bytes]:
    """A rotate request signed by a throwaway API key (the gateway passes it on, never checks it)."""
    key = signing.generate()
    sig = signing.sign_command(key, "rotate", {"command_id": command_id}, host)
    request = RotateRequest(command_id=CommandId(command_id), signature=sig)
    return request, encode(request)


async def test_rotation_round_trip(
    gateway: Gateway, fleet: Fleet, api: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent gets RotateToken with the request's id and signature, unchanged (no token); its answer's
    token hash and signature become RotateOk; no token is logged."""
    caplog.set_level(logging.DEBUG, logger="services.gateway")
    new = generate_token()
    request, body = rotate_body()
    async with agent(gateway, "web-1", fleet.tokens["web-1"]) as fake:
        reply = asyncio.ensure_future(rotate(api, "web-1", body))
        frame = await fake.recv()
        assert frame == RotateToken(rotation_id=request.command_id, signature=request.signature)
        sig = "s" * 86
        await fake.send(
            TokenRotated(rotation_id=frame.rotation_id, ok=True, token_sha256=hash_token(new), signature=sig)
        )
        assert await reply == RotateOk(host_id="web-1", token_sha256=hash_token(new), signature=sig)
        unsigned = asyncio.ensure_future(rotate(api, "web-1", rotate_body("rot-2")[1]))
        frame = await fake.recv()
        assert isinstance(frame, RotateToken)
        await fake.send(TokenRotated(rotation_id=frame.rotation_id, ok=True))  # no hash: not a RotateOk
        answer = await unsigned
        assert isinstance(answer, ErrorReply)
        assert answer.code == ErrorCode.INTERNAL
    assert new not in caplog.text
    assert fleet.tokens["web-1"] not in caplog.text
    assert "the agent stored new token" in caplog.text


async def test_rotation_refused_by_agent_is_typed(gateway: Gateway, fleet: Fleet, api: NATS) -> None:
    """ok=False from the agent → typed exec_failed carrying the agent's description, or the signature
    code the agent refused it with."""
    async with agent(gateway, "web-1", fleet.tokens["web-1"]) as fake:
        for command_id, description, code in (
            ("r-fs", "read-only fs", ErrorCode.EXEC_FAILED),
            ("r-sig", "bad_signature: rotate: the signature does not match", ErrorCode.BAD_SIGNATURE),
        ):
            reply = asyncio.ensure_future(rotate(api, "web-1", rotate_body(command_id)[1]))
            frame = await fake.recv()
            assert isinstance(frame, RotateToken)
            await fake.send(TokenRotated(rotation_id=frame.rotation_id, ok=False, description=description))
            answer = await reply
            assert isinstance(answer, ErrorReply)
            assert answer.code == code
            assert description.rpartition(": ")[2] in answer.description


async def test_rotation_bad_body_timeout_and_disconnect(gateway: Gateway, fleet: Fleet, api: NATS) -> None:
    """A bad body → bad_request (nothing sent); no answer → timeout; the agent leaving → disconnected."""
    async with agent(gateway, "web-1", fleet.tokens["web-1"]) as fake:
        bad = await rotate(api, "web-1", b'{"command_id": "has space"}')
        assert isinstance(bad, ErrorReply)
        assert bad.code == ErrorCode.BAD_REQUEST
        silent = await rotate(api, "web-1", rotate_body("r-silent")[1])
        assert isinstance(silent, ErrorReply)
        assert silent.code == ErrorCode.TIMEOUT
        assert isinstance(await fake.recv(), RotateToken)  # the only frame: the bad body sent nothing
        await fake.send(TokenRotated(rotation_id="late", ok=True))  # a stray answer is ignored
        await fake.send(Ping(id="alive"))
        assert await fake.recv() == Pong(id="alive")
        reply = asyncio.ensure_future(rotate(api, "web-1", rotate_body("r-gone")[1]))
        assert isinstance(await fake.recv(), RotateToken)
        await fake.ws.close()
    gone = await reply
    assert isinstance(gone, ErrorReply)
    assert gone.code == ErrorCode.DISCONNECTED


async def test_revocation_closes_matching_session_4003_and_drops_cache(
    gateway: Gateway, fleet: Fleet, api: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """Revoking the session's token hash closes it with 4003 in < 5 s; the old token then gets 401."""
    caplog.set_level(logging.INFO, logger="services.gateway")
    old = fleet.tokens["web-1"]
    async with agent(gateway, "web-1", old) as fake:
        assert gateway.auth.cache.get(hash_token(old)) == "web-1"  # cached: would be accepted for 30 s
        fleet.tokens["web-1"] = generate_token()
        fleet.write()  # the authority now knows only the new token
        revoked = TokenRevoked(host_id="web-1", token_sha256=hash_token(old))
        await api.publish(subjects.TOKEN_REVOKED, encode(revoked))
        assert await fake.close_code(timeout=5) == CloseCode.TOKEN_REVOKED
    assert gateway.auth.cache.get(hash_token(old)) is None
    assert await upgrade_status(gateway, old) == 401
    assert "closing 4003: token revoked" in caplog.text
    async with agent(gateway, "web-1", fleet.tokens["web-1"]):
        assert "web-1" in gateway.sessions


async def test_revocation_of_other_hash_or_host_leaves_session(
    gateway: Gateway, fleet: Fleet, api: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    """Another hash of the same host, another host, or an undecodable body: the session stays open."""
    caplog.set_level(logging.INFO, logger="services.gateway")
    async with agent(gateway, "web-1", fleet.tokens["web-1"]) as fake:
        for body in (
            encode(TokenRevoked(host_id="web-1", token_sha256=hash_token(generate_token()))),
            encode(TokenRevoked(host_id="web-2")),
            b'{"type": "token_revoked", "host_id": "web-1", "token_sha256": "nope"}',
        ):
            await api.publish(subjects.TOKEN_REVOKED, body)
        await synced(api)
        await fake.send(Ping(id="still-here"))
        assert await fake.recv() == Pong(id="still-here")
        assert fake.ws.close_code is None
        assert "ignoring undecodable revocation" in caplog.text
        await api.publish(subjects.TOKEN_REVOKED, encode(TokenRevoked(host_id="web-1")))
        assert await fake.close_code(timeout=5) == CloseCode.TOKEN_REVOKED


async def test_every_gateway_hears_revocations(nats_url: str, fleet: Fleet, api: NATS) -> None:
    """Two gateways: the one holding the session closes it, whichever would have got a queued message."""
    async with (
        running_gateway(nats_url) as gw1,
        running_gateway(nats_url) as gw2,
        agent(gw2, "web-2", fleet.tokens["web-2"]) as fake,
    ):
        assert "web-2" not in gw1.sessions
        revoked = TokenRevoked(host_id="web-2", token_sha256=hash_token(fleet.tokens["web-2"]))
        await api.publish(subjects.TOKEN_REVOKED, encode(revoked))
        assert await fake.close_code(timeout=5) == CloseCode.TOKEN_REVOKED
