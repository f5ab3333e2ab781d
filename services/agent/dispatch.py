"""Sans-I/O decisions of an agent session: a received frame in, actions out.

The client (`services.agent.client`) only reads, writes and awaits; what to do with each gateway frame is
decided here, so it is testable without a socket.
"""

from __future__ import annotations

import logging
import platform
import socket
from dataclasses import dataclass, field

from shared.errors import CloseCode, ProtocolError
from shared.ids import HostId
from shared.protocol import (
    Ack,
    CancelRequest,
    Exec,
    Hello,
    Message,
    OutputOn,
    Ping,
    Pong,
    ResultQuery,
    RotateToken,
    Welcome,
    decode_gateway_frame,
)

from . import __version__
from .results import SIGNATURE_ROOM, Outbox, Result, fit_result
from .stream import OUTPUT_STREAM
from .trust import AgentTrust

log = logging.getLogger(__name__)

CAPABILITIES = ("exec", "metrics", "ledger", "result_query", "cancel", OUTPUT_STREAM)


@dataclass(frozen=True)
class Send:
    """Send `message` to the gateway now."""

    message: Message


@dataclass(frozen=True)
class Run:
    """Start running `request` (through the ledger) in its own task."""

    request: Exec


@dataclass(frozen=True)
class Rotate:
    """Verify `request`, make and store a new token for later connections, then answer TokenRotated."""

    request: RotateToken


@dataclass(frozen=True)
class Query:
    """Answer a result query from the ledger (`Commands.answer`); nothing runs."""

    query: ResultQuery


@dataclass(frozen=True)
class Cancel:
    """Verify a signed cancel and kill the command it names (`Commands.cancel`), then send the answer."""

    request: CancelRequest


@dataclass(frozen=True)
class Close:
    """Close the connection with `code` and `reason`, then reconnect."""

    code: CloseCode
    reason: str


Action = Send | Run | Rotate | Query | Close | Cancel


@dataclass
class SessionState:
    """What one session remembers between frames."""

    welcome: Welcome
    last_received: float
    outbox: Outbox = field(default_factory=Outbox)
    output_stream: bool = False  # the gateway said `output_on`: it takes output chunks


def expect_welcome(raw: bytes | str) -> Welcome:
    """Decode the gateway's first frame; raise ProtocolError (1008) unless it is a Welcome."""
    frame = decode_gateway_frame(raw)
    if not isinstance(frame, Welcome):
        raise ProtocolError(CloseCode.POLICY_VIOLATION, f"expected welcome, got {frame.type}")
    return frame


def on_frame(state: SessionState, raw: bytes | str, now: float) -> list[Action]:
    """Decide what to do with one frame received from the gateway."""
    state.last_received = now
    try:
        frame = decode_gateway_frame(raw)
    except ProtocolError as exc:
        log.warning("protocol error from gateway: %s (closing with %d)", exc.message, exc.close_code)
        return [Close(exc.close_code, exc.message[:120])]
    if log.isEnabledFor(logging.DEBUG):
        log.debug("received %s", frame.type)
    if isinstance(frame, Ping):
        return [Send(Pong(id=frame.id))]
    if isinstance(frame, Exec):
        return [Run(frame)]
    if isinstance(frame, Ack):
        state.outbox.ack(frame.command_id)
        return []
    if isinstance(frame, Pong):
        return []
    if isinstance(frame, RotateToken):
        return [Rotate(frame)]
    if isinstance(frame, ResultQuery):
        return [Query(frame)]
    if isinstance(frame, CancelRequest):
        return [Cancel(frame)]
    if isinstance(frame, OutputOn):
        state.output_stream = True
        return []
    return [Close(CloseCode.POLICY_VIOLATION, "unexpected second welcome")]


def resend(state: SessionState, trust: AgentTrust) -> list[Send]:
    """After a welcome: every un-acked result again, each trimmed to the session's frame limit and signed."""
    return [Send(result_frame(state.welcome, r, trust)) for r in state.outbox.pending()]


def result_frame(welcome: Welcome, result: Result, trust: AgentTrust) -> Result:
    """`result` as it may be sent in this session: trimmed to `max_result_bytes`, signed by the agent."""
    return trust.seal(fit_result(result, welcome.max_result_bytes - SIGNATURE_ROOM))


def hello(
    host_id: HostId, capabilities: tuple[str, ...] = CAPABILITIES, trust: AgentTrust | None = None
) -> Hello:
    """The Hello frame describing this host and agent, signed when `trust` holds the agent's key."""
    frame = Hello(
        host_id=host_id,
        hostname=socket.gethostname()[:255],
        platform=platform.platform()[:255],
        agent_version=__version__,
        capabilities=capabilities,
    )
    return trust.sign_hello(frame) if trust is not None else frame
