"""NATS helpers shared by the services on NATS (never imported by the agent).

Request/reply workers are shaped like NATS micro: every reply is a protocol model; an error is an
`ErrorReply` with the micro error headers set, so ``nats req`` shows the code and description.
"""

from __future__ import annotations

import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import Request

from shared.errors import ErrorCode
from shared.protocol import ErrorReply, Message, encode

log = logging.getLogger(__name__)

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"

# Numeric codes in the micro error header, by our error code (HTTP-like, as micro suggests).
_NUMERIC = {
    ErrorCode.BAD_REQUEST: "400",
    ErrorCode.UNAUTHORIZED: "401",
    ErrorCode.BUSY: "429",
    ErrorCode.TIMEOUT: "504",
    ErrorCode.DISCONNECTED: "502",
    ErrorCode.UNKNOWN_RESULT: "409",
    ErrorCode.EXEC_FAILED: "500",
    ErrorCode.UNAVAILABLE: "503",
    ErrorCode.NOT_FOUND: "404",
    ErrorCode.CONNECT_FAILED: "502",
    ErrorCode.AUTH_FAILED: "403",
    ErrorCode.HOST_KEY_MISMATCH: "495",
    ErrorCode.INTERNAL: "500",
}


def error_headers(message: Message) -> dict[str, str] | None:
    """The micro error headers for an ErrorReply; None for any other message."""
    if not isinstance(message, ErrorReply):
        return None
    return {ERROR_HEADER: message.description[:200], ERROR_CODE_HEADER: _NUMERIC.get(message.code, "500")}


async def reply(nc: NATS, msg: Msg, message: Message) -> None:
    """Answer `msg` with `message`; an ErrorReply also sets the micro error headers."""
    if not msg.reply:
        log.debug("no reply subject on %s; answer dropped", msg.subject)
        return
    await nc.publish(msg.reply, encode(message), headers=error_headers(message))


async def respond(request: Request, message: Message) -> None:
    """Answer a NATS micro request with `message`, with the micro error headers on an ErrorReply."""
    await request.respond(encode(message), headers=error_headers(message))


def error(code: ErrorCode, description: str, command_id: str | None = None) -> ErrorReply:
    """Build a typed error reply."""
    return ErrorReply.model_validate({"code": code, "description": description, "command_id": command_id})
