"""One agent session's state and the gateway's pure decisions about it (sans-I/O).

A `Session` takes decoded frames and NATS requests and answers with actions (`Send`, `Publish`,
`Settle`, `Wake`, `Confirm`, `Close`); `services.gateway.server` carries them out. Nothing here reads a socket
or awaits: the only asyncio objects are the futures the shell's request tasks wait on.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from shared import signing, subjects
from shared.errors import CloseCode, ErrorCode, ProtocolError
from shared.ids import CommandId, GatewayId, HostId, SessionId, new_command_id, new_session_id
from shared.natsx import error
from shared.protocol import (
    MAX_CHUNK_BYTES,
    Ack,
    AgentFrame,
    CancelAnswer,
    CancelRequest,
    ErrorReply,
    Exec,
    ExecError,
    ExecRequest,
    ExecResult,
    Hello,
    Message,
    Metrics,
    MetricsEvent,
    OutputChunk,
    OutputOn,
    Ping,
    Pong,
    ResultAnswer,
    ResultQuery,
    RotateRequest,
    RotateToken,
    SessionClaim,
    TokenRevoked,
    TokenRotated,
    decode_agent_frame,
)
from shared.stream import COMMAND_BUDGET_BYTES
from shared.tokens import hashes_equal

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

C = TypeVar("C")
RESULT_HEADROOM = 1024  # bytes kept free for the envelope of a result frame
# Close code of a session whose agent took no frame within the send timeout (it stopped reading); the agent
# reconnects with backoff
SEND_TIMEOUT_CLOSE = CloseCode.SEND_TIMEOUT
NOT_SENT = "agent not connected here; nothing ran"  # `unavailable`: the request never reached an agent


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send `frame` to the agent."""

    frame: Message


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish `message` on the NATS `subject`."""

    subject: str
    message: Message


@dataclass(frozen=True, slots=True)
class Settle:
    """Answer every NATS request waiting on `pending` with `reply`, then wake its tasks."""

    pending: Pending
    reply: ExecResult | ErrorReply


@dataclass(frozen=True, slots=True)
class Wake:
    """Resolve a health-ping waiter: its Pong arrived."""

    future: asyncio.Future[None]


@dataclass(frozen=True, slots=True)
class Confirm:
    """Resolve a token-rotation waiter with the agent's answer."""

    future: asyncio.Future[TokenRotated | None]
    answer: TokenRotated

    def resolve(self) -> None:
        """Hand the answer to the waiting task (unless it gave up)."""
        if not self.future.done():
            self.future.set_result(self.answer)


@dataclass(frozen=True, slots=True)
class Answered:
    """Resolve a result-query waiter with the agent's answer."""

    future: asyncio.Future[ResultAnswer | None]
    answer: ResultAnswer

    def resolve(self) -> None:
        """Hand the answer to the waiting task (unless it gave up)."""
        if not self.future.done():
            self.future.set_result(self.answer)


@dataclass(frozen=True, slots=True)
class CancelAnswered:
    """Resolve a cancel waiter with the agent's answer."""

    future: asyncio.Future[CancelAnswer | None]
    answer: CancelAnswer

    def resolve(self) -> None:
        """Hand the answer to the waiting task (unless it gave up)."""
        if not self.future.done():
            self.future.set_result(self.answer)


@dataclass(frozen=True, slots=True)
class Close:
    """Close the agent's connection with `code`."""

    code: CloseCode
    reason: str


Action = Send | Publish | Settle | Wake | Confirm | Answered | Close | CancelAnswered


class Pending:
    """One command in flight to the agent and the NATS requests waiting for its result."""

    __slots__ = ("command_id", "connection", "future", "msgs", "sent")

    def __init__(self, command_id: CommandId, future: asyncio.Future[None]) -> None:
        self.command_id = command_id
        self.future = future  # done once settled; request tasks wait on it
        self.msgs: list[Msg] = []
        self.sent = False  # its Exec frame was handed to the connection: from then on it may run
        self.connection: int | None = None  # the NATS connection (reconnect count) its first request came by


@dataclass(frozen=True, slots=True)
class Busy:
    """Over the in-flight limit: answer `busy`, forward nothing."""

    reply: ErrorReply


@dataclass(frozen=True, slots=True)
class Joined:
    """The same command id is already in flight: wait for its result, send nothing."""

    pending: Pending


@dataclass(frozen=True, slots=True)
class Started:
    """A new command: send `frame` to the agent and wait on `pending`."""

    pending: Pending
    frame: Exec


Admission = Busy | Joined | Started
Rotation = tuple[RotateToken, "asyncio.Future[TokenRotated | None]"]
RESULT_QUERY = "result_query"  # the hello capability of an agent that answers result queries
CANCEL = "cancel"  # the hello capability of an agent that takes cancel frames (an older one would close)
OUTPUT_STREAM = "output_stream"  # the hello capability of an agent that streams output (`output_on`)
# what one command may stream through this gateway (characters of chunk data): the agent's own budget
# (`shared.stream`) with room for its replacement characters; an agent that ignores it is cut off here
STREAM_BUDGET_CHARS = COMMAND_BUDGET_BYTES + 64 * 1024


# ----------------------------------------------------------------------------- pure helpers


HELLO_MAX_AGE_S = signing.HELLO_MAX_AGE_S  # a signed hello's signed_at must be this close to our clock


def accept_hello(
    data: str | bytes, token_host: HostId, agent_key: str | None = None, now: float | None = None
) -> Hello:
    """Decode the first frame; raise ProtocolError unless it is a Hello for the token's host.

    With `agent_key` (the host's own key, as the token authority knows it) the hello must also be signed
    with that key within `HELLO_MAX_AGE_S`: a token alone, without the key made on the host, is not enough.
    """
    frame = decode_agent_frame(data)
    if not isinstance(frame, Hello):
        raise ProtocolError(CloseCode.POLICY_VIOLATION, f"first frame must be hello, got {frame.type}")
    if frame.host_id != token_host:
        raise ProtocolError(CloseCode.POLICY_VIOLATION, "hello host_id does not match the token's host")
    if agent_key is not None and signing.hello_problem(signing.parse_public(agent_key), frame, now):
        why = "hello is not signed by this host's agent key (or its clock is off)"
        raise ProtocolError(CloseCode.POLICY_VIOLATION, why)
    return frame


def max_result_bytes(max_frame_bytes: int, max_payload: int) -> int:
    """The largest result frame an agent may send: it must fit a WebSocket frame and a NATS message."""
    return min(max_frame_bytes, max_payload) - RESULT_HEADROOM


KEEPALIVE_PREFIX = "k"  # a keepalive ping's id: "k" + the gateway's monotonic send time in microseconds
MAX_RTT_S = 60.0  # a keepalive answered later than this (or "from the future") is not a measurement


def keepalive_id(now: float) -> str:
    """The id of a keepalive ping sent at `now` (monotonic seconds): its pong measures the round trip."""
    return f"{KEEPALIVE_PREFIX}{int(now * 1_000_000)}"


def keepalive_rtt_ms(pong_id: str | None, now: float) -> float | None:
    """The round trip in milliseconds of the keepalive `pong_id` answers, received at `now`; None when the
    id is not a keepalive's (a health probe's) or the time it claims is implausible."""
    if not pong_id or not pong_id.startswith(KEEPALIVE_PREFIX) or not pong_id[1:].isdigit():
        return None
    rtt = now - int(pong_id[1:]) / 1_000_000
    return round(rtt * 1000, 3) if 0 <= rtt <= MAX_RTT_S else None


def is_dead(last_seen: float, now: float, ping_interval: float, ping_timeout: float) -> bool:
    """Whether a session heard nothing for longer than ping interval + ping timeout."""
    return now - last_seen > ping_interval + ping_timeout


# ----------------------------------------------------------------------------- the session


class Session(Generic[C]):
    """A registered agent session; `conn` is the shell's connection object, never touched here."""

    __slots__ = (
        "cancels",
        "conn",
        "connected_at",
        "ended",
        "gateway_id",
        "hello",
        "host_id",
        "last_seen",
        "pending",
        "pings",
        "queries",
        "rotations",
        "rtt_ms",
        "session_id",
        "streamed",
        "sub",
        "tasks",
        "token_sha256",
    )

    def __init__(
        self,
        conn: C,
        hello: Hello,
        gateway_id: GatewayId,
        connected_at: float,
        last_seen: float,
        session_id: SessionId | None = None,
        token_sha256: str = "",
    ) -> None:
        self.conn = conn
        self.hello = hello
        self.host_id: HostId = hello.host_id
        self.gateway_id = gateway_id
        self.session_id = session_id or new_session_id()
        self.connected_at = connected_at  # wall clock: compared across gateways
        self.last_seen = last_seen  # monotonic: for dead-connection detection
        self.ended = False
        self.pending: dict[CommandId, Pending] = {}
        self.pings: dict[str, asyncio.Future[None]] = {}
        self.rotations: dict[str, asyncio.Future[TokenRotated | None]] = {}
        self.queries: dict[str, asyncio.Future[ResultAnswer | None]] = {}
        self.cancels: dict[str, asyncio.Future[CancelAnswer | None]] = {}  # by command id
        self.token_sha256 = token_sha256  # of the token this session authenticated with; never changes
        self.tasks: set[asyncio.Task[None]] = set()
        self.sub: Subscription | None = None
        self.streamed: dict[CommandId, int] = {}  # output characters published per command in flight
        self.rtt_ms: float | None = None  # the last keepalive's round trip (`keepalive_rtt_ms`)

    def claim(self) -> SessionClaim:
        """The claim this session announces to every gateway."""
        return SessionClaim(
            host_id=self.host_id,
            session_id=self.session_id,
            gateway_id=self.gateway_id,
            connected_at=self.connected_at,
        )

    def superseded_by(self, claim: SessionClaim) -> bool:
        """Whether `claim` is for a newer session of this host (newest ``(connected_at, id)`` wins)."""
        if claim.host_id != self.host_id or claim.session_id == self.session_id:
            return False
        return (self.connected_at, self.session_id) < (claim.connected_at, claim.session_id)

    def revoked_by(self, revoked: TokenRevoked) -> bool:
        """Whether `revoked` ends this session: same host, and its token hash (or every token of the host)."""
        if revoked.host_id != self.host_id:
            return False
        if revoked.token_sha256 is None:
            return True
        return bool(self.token_sha256) and hashes_equal(revoked.token_sha256, self.token_sha256)

    def start_rotation(self, request: RotateRequest, max_in_flight: int) -> Rotation | ErrorReply:
        """The RotateToken frame (the request's id and signature, unchanged) and the future its
        TokenRotated resolves; a typed `busy` when over the limit or that rotation is already in flight."""
        rotation_id = request.command_id
        if len(self.rotations) >= max_in_flight:
            return error(ErrorCode.BUSY, "too many token rotations in flight")
        if rotation_id in self.rotations:
            return error(ErrorCode.BUSY, f"rotation {rotation_id} is already in flight", rotation_id)
        future: asyncio.Future[TokenRotated | None] = asyncio.get_running_loop().create_future()
        self.rotations[rotation_id] = future
        return RotateToken(rotation_id=rotation_id, signature=request.signature), future

    def start_query(
        self, query: ResultQuery, max_in_flight: int
    ) -> tuple[ResultQuery, asyncio.Future[ResultAnswer | None]] | ErrorReply:
        """The frame to send (the request itself: the API's signature passes through) and the future the
        agent's answer resolves; a typed error when the agent does not answer queries or too many wait."""
        if RESULT_QUERY not in self.hello.capabilities:
            why = f"the agent (version {self.hello.agent_version}) does not answer result queries"
            return error(ErrorCode.UNAVAILABLE, why, query.command_id)
        if len(self.queries) >= max_in_flight:
            return error(ErrorCode.BUSY, "too many result queries in flight", query.command_id)
        if query.query_id in self.queries:
            return error(ErrorCode.BUSY, f"query {query.query_id} is already in flight", query.command_id)
        future: asyncio.Future[ResultAnswer | None] = asyncio.get_running_loop().create_future()
        self.queries[query.query_id] = future
        return query, future

    def start_cancel(
        self, request: CancelRequest, max_in_flight: int
    ) -> tuple[CancelRequest, asyncio.Future[CancelAnswer | None]] | ErrorReply:
        """The frame to send (the request itself: the API's signature passes through) and the future the
        agent's answer resolves; a typed error when the agent takes no cancels or too many wait."""
        if CANCEL not in self.hello.capabilities:
            why = f"the agent (version {self.hello.agent_version}) does not take cancels"
            return error(ErrorCode.UNAVAILABLE, why, request.command_id)
        if len(self.cancels) >= max_in_flight:
            return error(ErrorCode.BUSY, "too many cancels in flight", request.command_id)
        if request.command_id in self.cancels:
            why = f"a cancel of {request.command_id} is already in flight"
            return error(ErrorCode.BUSY, why, request.command_id)
        future: asyncio.Future[CancelAnswer | None] = asyncio.get_running_loop().create_future()
        self.cancels[request.command_id] = future
        return request, future

    def handle(self, frame: AgentFrame) -> list[Action]:
        """Decide what a frame received after the hello leads to."""
        if isinstance(frame, ExecResult):
            return self._settle(frame.command_id, frame)
        if isinstance(frame, ExecError):
            reply = error(frame.code, frame.description, frame.command_id)
            return self._settle(frame.command_id, reply)
        if isinstance(frame, Ping):
            return [Send(Pong(id=frame.id))]
        if isinstance(frame, Pong):
            if (rtt := keepalive_rtt_ms(frame.id, time.monotonic())) is not None:
                self.rtt_ms = rtt
                return []
            waiter = self.pings.pop(frame.id, None) if frame.id is not None else None
            return [Wake(waiter)] if waiter is not None else []
        if isinstance(frame, Metrics):
            event = MetricsEvent(
                host_id=self.host_id,
                gateway_id=self.gateway_id,
                sample=frame.sample,
                agent_rtt_ms=self.rtt_ms,
            )
            return [Publish(subjects.metrics(self.host_id), event)]
        if isinstance(frame, TokenRotated):
            rotation = self.rotations.pop(frame.rotation_id, None)
            return [Confirm(rotation, frame)] if rotation is not None else []  # late: its request is gone
        if isinstance(frame, ResultAnswer):
            query = self.queries.pop(frame.query_id, None)
            return [Answered(query, frame)] if query is not None else []  # late: its request is gone
        if isinstance(frame, CancelAnswer):
            cancel = self.cancels.pop(frame.command_id, None)
            return [CancelAnswered(cancel, frame)] if cancel is not None else []  # late: its request is gone
        if isinstance(frame, OutputChunk):
            return self._output(frame)
        return [Close(CloseCode.POLICY_VIOLATION, "unexpected hello")]

    def output_on(self) -> OutputOn | None:
        """The frame that tells the agent this gateway takes output chunks (None: it did not announce
        ``output_stream``, so it never gets a frame it does not know)."""
        if OUTPUT_STREAM not in self.hello.capabilities:
            return None
        return OutputOn(max_chunk_bytes=MAX_CHUNK_BYTES)

    def _output(self, chunk: OutputChunk) -> list[Action]:
        """Publish an output chunk of a command in flight here, within the per-command budget; a chunk of
        a command this session does not wait on (or past the budget) is dropped: not authoritative."""
        if chunk.command_id not in self.pending:
            return []
        spent = self.streamed.get(chunk.command_id, 0) + len(chunk.data)
        if spent > STREAM_BUDGET_CHARS:
            return []
        self.streamed[chunk.command_id] = spent
        return [Publish(subjects.output(self.host_id, chunk.command_id), chunk)]

    def _settle(self, command_id: CommandId, reply: ExecResult | ErrorReply) -> list[Action]:
        """A result: answer its waiting requests, or publish it when nobody waits; Ack it either way."""
        self.streamed.pop(command_id, None)
        ack = Send(Ack(command_id=command_id))
        pending = self.pending.pop(command_id, None)
        if pending is not None:
            return [Settle(pending, reply), ack]
        if isinstance(reply, ExecResult):
            return [Publish(subjects.result(self.host_id), reply), ack]
        return [ack]

    def admit_exec(self, request: ExecRequest, msg: Msg, max_in_flight: int) -> Admission:
        """Decide whether an exec request starts a command, joins one in flight, or is refused."""
        command_id = request.command_id or new_command_id()
        pending = self.pending.get(command_id)
        if pending is None:
            if len(self.pending) >= max_in_flight:
                return Busy(error(ErrorCode.BUSY, f"{max_in_flight} commands in flight", command_id))
            pending = Pending(command_id, asyncio.get_running_loop().create_future())
            self.pending[command_id] = pending
            pending.msgs.append(msg)
            frame = Exec(
                command_id=command_id,
                command=request.command,
                timeout=request.timeout,
                signature=request.signature,  # passed through unchanged: the agent verifies it
            )
            return Started(pending, frame)
        pending.msgs.append(msg)
        return Joined(pending)

    def give_up(self, pending: Pending, msg: Msg) -> bool:
        """Stop waiting for `msg` (it timed out); return whether it still needed an answer."""
        try:
            pending.msgs.remove(msg)
        except ValueError:
            return False
        if not pending.msgs and self.pending.get(pending.command_id) is pending:
            del self.pending[pending.command_id]  # a late result goes to warlock.result.<host>
        return True

    def end(self) -> list[Pending]:
        """Mark the session ended, wake its ping waiters, hand back every pending command to fail."""
        self.ended = True
        pending = list(self.pending.values())
        self.pending.clear()
        self.streamed.clear()
        for waiter in self.pings.values():
            if not waiter.done():
                waiter.set_result(None)  # the waiting task sees `ended` and answers disconnected
        self.pings.clear()
        for rotation in self.rotations.values():
            if not rotation.done():
                rotation.set_result(None)  # no answer: the waiting task answers disconnected
        self.rotations.clear()
        for query in self.queries.values():
            if not query.done():
                query.set_result(None)  # no answer: the waiting task answers disconnected
        self.queries.clear()
        for cancel in self.cancels.values():
            if not cancel.done():
                cancel.set_result(None)  # no answer: the waiting task answers disconnected
        self.cancels.clear()
        return pending
