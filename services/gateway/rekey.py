"""Token rotation and revocation, gateway side.

Rotation: a request on ``warlock.agent.<host>.rotate`` ({command_id, signature}: no token) becomes a
`RotateToken` frame with the same id and signature, unchanged (the gateway does not verify and cannot
sign). The agent checks the API's signature, makes itself a new token, stores it and answers
`TokenRotated` with the new token's hash signed by its own key; the gateway answers `RotateOk` with that
hash and signature (the API checks it against the agent's pinned key), or a typed error. A token never
passes through a gateway. Revocation: every gateway listens on ``warlock.auth.revoked`` (no queue group);
a revoked token hash leaves the cache and the sessions opened with it close with 4003.

Tokens are never logged: only `shared.tokens.fingerprint` of a hash.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from services.gateway.auth import TokenCache
from services.gateway.bridge import Bridge, GwSession, session_log
from shared.errors import CloseCode, ErrorCode, ProtocolError
from shared.natsx import error
from shared.protocol import (
    ErrorReply,
    RotateOk,
    RotateRequest,
    RotateToken,
    TokenRevoked,
    TokenRotated,
    decode_model,
)
from shared.tokens import fingerprint

log = logging.getLogger("services.gateway")


def refusal(description: str) -> ErrorReply:
    """The typed error for a rotation the agent refused: its own code when the description starts with one
    of the codes after which nothing changed (``unsigned: ...``), else `exec_failed`."""
    code, sep, rest = description.partition(": ")
    if sep and code in _REFUSAL_CODES:
        return error(ErrorCode(code), f"the agent refused the rotation: {rest}")
    return error(ErrorCode.EXEC_FAILED, f"the agent could not store a new token: {description}")


_REFUSAL_CODES = frozenset(
    code.value
    for code in (
        ErrorCode.UNSIGNED,
        ErrorCode.UNKNOWN_KEY,
        ErrorCode.BAD_SIGNATURE,
        ErrorCode.WRONG_HOST,
        ErrorCode.EXPIRED,
        ErrorCode.REPLAY,
    )
)


class Rekeyer:
    """Carries out token rotations for this gateway's sessions and applies revocations."""

    def __init__(self, bridge: Bridge, cache: TokenCache, timeout: float) -> None:
        self.bridge = bridge
        self.cache = cache
        self.timeout = timeout

    async def start_rotation(self, session: GwSession, msg: Msg) -> None:
        """Admit a rotate request and hand the round trip to a session task (never awaits the agent)."""
        try:
            request = decode_model(RotateRequest, msg.data)
        except ProtocolError as exc:
            await self.bridge.answer(msg, error(ErrorCode.BAD_REQUEST, exc.message))
            return
        started = session.start_rotation(request, self.bridge.settings.max_in_flight)
        if isinstance(started, ErrorReply):
            await self.bridge.answer(msg, started)
            return
        frame, future = started
        self.bridge.track(session, self._await_rotation(session, msg, frame, future))

    async def _await_rotation(
        self, session: GwSession, msg: Msg, frame: RotateToken, future: asyncio.Future[TokenRotated | None]
    ) -> None:
        """Send RotateToken, wait for the agent's TokenRotated, answer RotateOk or a typed error."""
        slog = session_log(session)
        slog.info("token rotation %s: asking the agent to make a new token", frame.rotation_id)
        await self.bridge.send(session, frame)
        try:
            async with asyncio.timeout(self.timeout):
                answer = await future
        except TimeoutError:
            session.rotations.pop(frame.rotation_id, None)
            slog.warning("token rotation %s: no answer within %gs", frame.rotation_id, self.timeout)
            description = f"the agent did not confirm the new token within {self.timeout:g}s; it may have"
            await self.bridge.answer(msg, error(ErrorCode.TIMEOUT, f"{description} stored it"))
            return
        if answer is None:
            slog.warning("token rotation %s: the agent disconnected", frame.rotation_id)
            description = "the agent disconnected before confirming the new token; it may have stored it"
            await self.bridge.answer(msg, error(ErrorCode.DISCONNECTED, description))
        elif answer.ok and answer.token_sha256 is not None and answer.signature is not None:
            slog.info(
                "token rotation %s: the agent stored new token %s",
                frame.rotation_id,
                fingerprint(answer.token_sha256),
            )
            rotated = RotateOk(
                host_id=session.host_id, token_sha256=answer.token_sha256, signature=answer.signature
            )
            await self.bridge.answer(msg, rotated)
        elif answer.ok:
            slog.warning("token rotation %s: the agent's answer has no signed token hash", frame.rotation_id)
            description = "the agent confirmed a new token without its signed hash (an agent too old?)"
            await self.bridge.answer(msg, error(ErrorCode.INTERNAL, description))
        else:
            slog.warning("token rotation %s: refused by the agent: %s", frame.rotation_id, answer.description)
            await self.bridge.answer(msg, refusal(answer.description))

    async def on_revoked(self, msg: Msg) -> None:
        """A token was revoked: forget it, and close with 4003 the session that authenticated with it."""
        try:
            revoked = decode_model(TokenRevoked, msg.data)
        except ProtocolError as exc:
            log.warning("ignoring undecodable revocation on %s: %s", msg.subject, exc.message)
            return
        self.cache.revoke(revoked.host_id, revoked.token_sha256)
        which = "every token" if revoked.token_sha256 is None else fingerprint(revoked.token_sha256)
        session = self.bridge.sessions.get(revoked.host_id)
        if session is None or session.ended or not session.revoked_by(revoked):
            log.info("token revoked for host %s (%s): no session here uses it", revoked.host_id, which)
            return
        session_log(session).warning("closing 4003: token revoked (%s)", which)
        await self.bridge.retire(session, CloseCode.TOKEN_REVOKED, "token revoked")
