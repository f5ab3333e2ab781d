"""Unit tests of the gateway's token rotation and revocation decisions and the cache's revocation memory."""

from __future__ import annotations

import asyncio

from services.gateway.auth import TokenCache
from services.gateway.rekey import refusal
from services.gateway.session import Confirm, Session
from shared import signing
from shared.errors import ErrorCode
from shared.ids import CommandId, GatewayId, HostId, SessionId
from shared.protocol import ErrorReply, Hello, RotateRequest, TokenRevoked, TokenRotated
from shared.tokens import generate_token, hash_token

HELLO = Hello(host_id="web-1", hostname="web-1.test", platform="linux", agent_version="1.0")
OLD, NEW = generate_token(), generate_token()


def new_session(token_sha256: str = hash_token(OLD)) -> Session[None]:
    """A session of web-1 that authenticated with `token_sha256`."""
    return Session(None, HELLO, GatewayId("gw-1"), 1.0, 0.0, SessionId("s-1"), token_sha256=token_sha256)


def test_revoked_by_matches_host_and_hash() -> None:
    """A revocation ends the session only for its host, and only for its token hash (or all, with None)."""
    session = new_session()
    assert session.revoked_by(TokenRevoked(host_id="web-1", token_sha256=hash_token(OLD)))
    assert session.revoked_by(TokenRevoked(host_id="web-1", token_sha256=None))
    assert not session.revoked_by(TokenRevoked(host_id="web-1", token_sha256=hash_token(NEW)))
    assert not session.revoked_by(TokenRevoked(host_id="web-2", token_sha256=hash_token(OLD)))
    assert not session.revoked_by(TokenRevoked(host_id="web-2"))
    assert not new_session("").revoked_by(TokenRevoked(host_id="web-1", token_sha256=hash_token(OLD)))


def rotate_request(command_id: str = "rot-1") -> RotateRequest:
    """A rotate request signed by a throwaway API key (the gateway never checks it)."""
    key = signing.generate()
    sig = signing.sign_command(key, "rotate", {"command_id": command_id}, "web-1")
    return RotateRequest(command_id=CommandId(command_id), signature=sig)


async def test_rotation_is_confirmed_by_its_token_rotated() -> None:
    """start_rotation gives a RotateToken frame with the request's id and signature, unchanged, and no
    token; its TokenRotated resolves it, a stray one is ignored."""
    session = new_session()
    request = rotate_request()
    started = session.start_rotation(request, 2)
    assert not isinstance(started, ErrorReply)
    frame, future = started
    assert (frame.rotation_id, frame.signature) == (request.command_id, request.signature)
    assert "token" not in frame.model_dump()
    assert session.handle(TokenRotated(rotation_id="someone-else", ok=True)) == []
    answer = TokenRotated(rotation_id=frame.rotation_id, ok=False, description="read-only")
    assert session.handle(answer) == [Confirm(future, answer)]
    assert session.rotations == {}
    assert session.handle(answer) == []  # a late duplicate


async def test_rotation_limit_and_end_wakes_waiters() -> None:
    """Over the in-flight limit (or the same id twice) start_rotation refuses with `busy`; ending the
    session resolves waiters with None."""
    session = new_session()
    first = session.start_rotation(rotate_request("a"), 2)
    assert not isinstance(first, ErrorReply)
    again = session.start_rotation(rotate_request("a"), 2)
    assert isinstance(again, ErrorReply)
    assert again.code == ErrorCode.BUSY
    assert not isinstance(session.start_rotation(rotate_request("b"), 2), ErrorReply)
    over = session.start_rotation(rotate_request("c"), 2)
    assert isinstance(over, ErrorReply)
    assert over.code == ErrorCode.BUSY
    session.end()
    assert first[1].done()
    assert first[1].result() is None
    assert session.rotations == {}
    await asyncio.sleep(0)


def test_refusals_keep_the_agents_typed_code() -> None:
    """A TokenRotated refusal starting with a signature code is answered with that code, else exec_failed."""
    assert refusal("unsigned: rotate is unsigned").code == ErrorCode.UNSIGNED
    assert refusal("replay: seen").code == ErrorCode.REPLAY
    assert refusal("busy: x").code == ErrorCode.EXEC_FAILED
    plain = refusal("token is set by the environment; update it there")
    assert plain.code == ErrorCode.EXEC_FAILED
    assert "environment" in plain.description


def test_cache_revoke_by_hash_and_by_host() -> None:
    """revoke drops the hash (or every entry of the host) and later puts of a revoked token are ignored."""
    now = [100.0]
    cache = TokenCache(ttl=30, size=10, clock=lambda: now[0], horizon=60)
    web1, web2 = HostId("web-1"), HostId("web-2")
    cache.put(hash_token(OLD), web1)
    cache.put(hash_token(NEW), web1)
    cache.put("c" * 64, web2)
    cache.revoke(web1, hash_token(OLD))
    assert cache.get(hash_token(OLD)) is None
    assert cache.get(hash_token(NEW)) == web1
    cache.put(hash_token(OLD), web1, asked_at=50.0)  # an answer that was in flight: not cached again
    assert cache.get(hash_token(OLD)) is None
    assert cache.revoked_since(web1, hash_token(OLD), 0.0)
    assert not cache.revoked_since(web1, hash_token(NEW), 0.0)
    cache.revoke(web1, None)
    assert cache.get(hash_token(NEW)) is None
    assert cache.get("c" * 64) == web2
    assert cache.revoked_since(web1, hash_token(NEW), 99.0)  # checked before the host revocation
    assert not cache.revoked_since(web1, hash_token(NEW), 101.0)  # a fresh check after it
    now[0] = 101.0
    cache.put(hash_token(NEW), web1, asked_at=101.0)
    assert cache.get(hash_token(NEW)) == web1


def test_cache_forgets_revocations_after_the_horizon() -> None:
    """Revocation memory is bounded in time: after `horizon` seconds it is pruned on the next revoke."""
    now = [0.0]
    cache = TokenCache(ttl=30, size=10, clock=lambda: now[0], horizon=60)
    cache.revoke(HostId("web-1"), hash_token(OLD))
    now[0] = 61.0
    cache.revoke(HostId("web-2"), hash_token(NEW))
    assert not cache.revoked_since(HostId("web-1"), hash_token(OLD), 0.0)
    assert cache.revoked_since(HostId("web-2"), hash_token(NEW), 0.0)
