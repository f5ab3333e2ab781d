"""The NATS side of the gateway: per-host request subscriptions, claims, presence, carrying out actions.

Request callbacks never await an agent: nats-py runs one subscription's callbacks one at a time, so a
callback admits the request, and a task owned by the session sends the frame, waits and replies.

A request is answered exactly once, also when its session ends: one the agent may have received gets
`disconnected` ("may have run"); one that never reached it (still queued in the session's subscription, or
admitted but not yet sent) gets `unavailable` ("nothing ran"). Every send to an agent is bounded by the
send timeout, so no agent that stops reading can hold a request, a drain or a shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from services.gateway import metrics
from services.gateway.session import (
    NOT_SENT,
    SEND_TIMEOUT_CLOSE,
    Action,
    Answered,
    Busy,
    CancelAnswered,
    Close,
    Confirm,
    Joined,
    Pending,
    Publish,
    Send,
    Session,
    Settle,
    Started,
    Wake,
)
from services.gateway.settings import GatewaySettings
from shared import subjects
from shared.errors import CloseCode, ErrorCode, InvalidIdError, ProtocolError
from shared.ids import CommandId, GatewayId, HostId
from shared.logs import ContextAdapter
from shared.metrics import count_error
from shared.natsx import error, reply
from shared.protocol import (
    CancelAnswer,
    CancelRequest,
    ErrorReply,
    ExecRequest,
    ExecResult,
    Message,
    Ping,
    PingReply,
    PingRequest,
    PresenceDisconnected,
    ResultAnswer,
    ResultQuery,
    SessionClaim,
    decode_model,
    encode,
)

log = logging.getLogger("services.gateway")
GwSession = Session[ServerConnection]
VerbHandler = Callable[[GwSession, Msg], Awaitable[None]]
QUEUE_DRAIN_LIMIT_S = 5.0  # bound on answering what an unsubscribed subscription still holds


def session_log(session: GwSession) -> ContextAdapter:
    """A logger that prefixes the session's host, id and peer."""
    peer = session.conn.remote_address
    where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
    return ContextAdapter(log, {"host": session.host_id, "session": session.session_id[:8], "peer": where})


def command_id_of(verb: str, msg: Msg) -> CommandId | None:
    """The command id of an exec request (for its reply), if it has a valid one."""
    if verb != "exec":
        return None
    try:
        return decode_model(ExecRequest, msg.data).command_id
    except ProtocolError:
        return None


class Bridge:
    """Holds this gateway's sessions by host and connects them to NATS."""

    def __init__(self, nc: NATS, settings: GatewaySettings) -> None:
        self.nc = nc
        self.settings = settings
        self.gateway_id = GatewayId(settings.gateway_id)
        self.sessions: dict[HostId, GwSession] = {}
        self.stopping = False
        self._closers: set[asyncio.Task[None]] = set()
        # verb of ``warlock.agent.<host>.<verb>`` → its handler (the gateway adds "rotate")
        self.verbs: dict[str, VerbHandler] = {
            "exec": self._start_exec,
            "ping": self._start_ping,
            "result": self._start_query,
            "cancel": self._start_cancel,
        }

    # ------------------------------------------------------------------------- NATS output

    async def publish(self, subject: str, message: Message) -> None:
        """Publish `message`; a NATS failure is logged, never raised into a session."""
        try:
            await self.nc.publish(subject, encode(message))
        except nats.errors.Error as exc:
            log.warning("publish on %s failed: %s", subject, type(exc).__name__)

    async def answer(self, msg: Msg, message: Message) -> None:
        """Reply to a NATS request; a NATS failure is logged, never raised."""
        try:
            await reply(self.nc, msg, message)
        except nats.errors.Error as exc:
            log.warning("reply on %s failed: %s", msg.subject, type(exc).__name__)

    async def sync(self) -> None:
        """Return once the server has processed everything sent so far (a NATS failure is ignored).

        nats-py 2.16 writes flush()'s PING straight to the socket, ahead of commands still buffered,
        so one PONG does not prove a fresh SUB arrived; after a second round trip it has. While NATS is
        down there is nothing to wait for (and waiting would stall a shutdown 4 s per session).
        """
        if not self.nc.is_connected:
            return
        with contextlib.suppress(nats.errors.Error):
            await self.nc.flush(timeout=2)
            await self.nc.flush(timeout=2)

    def connection(self) -> int:
        """Which NATS connection this is: how many times nats-py has reconnected so far."""
        return int(self.nc.stats.get("reconnects", 0))

    async def settle(
        self, pending: Pending, answer: ExecResult | ErrorReply, host_id: str | None = None
    ) -> None:
        """Answer every request waiting on `pending`, then wake their tasks.

        Requests that came by an earlier NATS connection cannot be answered: the connection now up did
        not receive them, and the server refuses a reply it did not see the request of (``allow_responses``
        is per client connection). Their result is published as a late result instead
        (``warlock.result.<host>``), from which the API settles the run (verified by the agent's signature
        like any result); an error is not (the API's wait ends `timed_out`: the command may have run).
        """
        if isinstance(answer, ErrorReply):
            count_error(answer.code)  # warlock_errors_total{code}
        msgs, pending.msgs = pending.msgs, []
        if msgs and pending.connection is not None and pending.connection != self.connection():
            log.info("command %s: NATS reconnected since its request came", pending.command_id)
            if host_id is not None and isinstance(answer, ExecResult):
                await self.publish(subjects.result(host_id), answer)
            msgs = []
        for msg in msgs:
            await self.answer(msg, answer)
        if not pending.future.done():
            pending.future.set_result(None)

    # ------------------------------------------------------------------------- agent output

    async def send(self, session: GwSession, frame: Message) -> None:
        """Send a frame to the agent; a closed connection is left to the connection handler.

        A frame the agent does not take within the send timeout (its socket and our write buffer are
        full: it stopped reading) ends the session with close code 4004; its requests are answered.
        """
        try:
            async with asyncio.timeout(self.settings.send_timeout):
                await session.conn.send(encode(frame), text=True)
        except ConnectionClosed:
            pass
        except TimeoutError:
            if not session.ended:
                limit = self.settings.send_timeout
                session_log(session).warning(
                    "closing %d: the agent took no frame for %gs", SEND_TIMEOUT_CLOSE, limit
                )
                await self.retire(
                    session, SEND_TIMEOUT_CLOSE, f"send timeout: the agent read nothing for {limit:g}s"
                )

    async def apply(self, session: GwSession, actions: list[Action]) -> Close | None:
        """Carry out a session's actions in order; return the Close among them, if any."""
        for action in actions:
            if isinstance(action, Send):
                await self.send(session, action.frame)
            elif isinstance(action, Publish):
                await self.publish(action.subject, action.message)
            elif isinstance(action, Settle):
                await self.settle(action.pending, action.reply, session.host_id)
            elif isinstance(action, Wake):
                if not action.future.done():
                    action.future.set_result(None)
            elif isinstance(action, Confirm | Answered | CancelAnswered):
                action.resolve()
            else:
                return action
        return None

    # ------------------------------------------------------------------------- session lifecycle

    async def end(self, session: GwSession, reason: str, code: int | None) -> None:
        """End a session once: unsubscribe, fail its pending requests, publish disconnected presence."""
        if session.ended:
            return
        pending = session.end()
        if self.sessions.get(session.host_id) is session:
            del self.sessions[session.host_id]
        await self.unsubscribe(session)  # what its subscription still held is answered `unavailable`
        for entry in pending:
            if entry.sent:
                description = "the agent disconnected; the command may have run"
                await self.settle(entry, error(ErrorCode.DISCONNECTED, description, entry.command_id))
            else:  # admitted, but its task had not sent it yet (and now never will)
                await self.settle(entry, error(ErrorCode.UNAVAILABLE, NOT_SENT, entry.command_id))
        event = PresenceDisconnected(
            host_id=session.host_id,
            session_id=session.session_id,
            gateway_id=self.gateway_id,
            reason=reason[:255],
            close_code=code,
            at=time.time(),
        )
        await self.publish(subjects.presence(session.host_id), event)
        metrics.session_ended(code)
        session_log(session).info("session ended: %s (close code %s)", reason, code)

    async def unsubscribe(self, session: GwSession) -> None:
        """Drop the session's request subscription (new requests then find no responder); the requests
        already routed to it are answered by its callback (`unavailable` once the session ended)."""
        sub, session.sub = session.sub, None
        if sub is not None:
            await self.release([sub])

    async def unsubscribe_all(self) -> None:
        """`unsubscribe` every session at once (one pair of round trips for all: a shutdown)."""
        subs = []
        for session in self.sessions.values():
            if session.sub is not None:
                subs.append(session.sub)
                session.sub = None
        await self.release(subs)

    async def release(self, subs: list[Subscription]) -> None:
        """Unsubscribe `subs` without dropping a request the server already routed to them.

        nats-py's `unsubscribe()` discards a subscription's queued messages and those still on the way,
        whose callers then wait their whole timeout; its `drain()` trusts one PING, which nats-py 2.16
        writes ahead of the UNSUB still buffered (see `sync`). So, with nats-py's internals (pinned by
        tests/integration/test_gateway_drain.py): send each UNSUB, wait two round trips (the server then
        stopped routing, and everything it routed before is in the queues), let each callback work through
        its queue, and only then forget the subscription.
        """
        nc = self.nc
        live = [sub for sub in subs if not sub._closed]
        if not live or nc.is_closed:
            return
        for sub in live:
            sub._closed = True  # nats-py: no unsubscribe()/drain() of it any more
            if nc.is_connected:
                try:
                    await nc._send_unsubscribe(sub._id)
                except nats.errors.Error as exc:
                    log.warning("unsubscribe from %s failed: %s", sub.subject, type(exc).__name__)
        await self.sync()  # the server stops routing to us before the agent hears its close
        current = asyncio.current_task()
        for sub in live:
            if sub._wait_for_msgs_task is not None and sub._wait_for_msgs_task is not current:
                try:
                    async with asyncio.timeout(QUEUE_DRAIN_LIMIT_S):
                        await sub._pending_queue.join()
                except TimeoutError:
                    log.warning("%d requests on %s left unanswered", sub.pending_msgs, sub.subject)
            sub._stop_processing()
            nc._remove_sub(sub._id)

    async def retire(self, session: GwSession, code: CloseCode | int, reason: str) -> None:
        """End a session from outside its handler and close its connection in an owned task."""
        await self.end(session, reason, int(code))
        task = asyncio.create_task(self.hang_up(session.conn, code, reason[:120]))
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def hang_up(self, conn: ServerConnection, code: CloseCode | int, reason: str) -> None:
        """Close `conn` with `code`; abort the TCP connection when the closing handshake cannot finish
        within the close timeout (websockets waits for a full write buffer to drain before it counts)."""
        try:
            async with asyncio.timeout(self.settings.close_timeout):
                await conn.close(code, reason)
        except TimeoutError:
            conn.transport.abort()

    async def wait_closers(self, within: float) -> None:
        """Wait up to `within` seconds for the connection-closing tasks started by `retire`."""
        if self._closers:
            await asyncio.wait(set(self._closers), timeout=within)

    def track(self, session: GwSession, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in a task owned by `session` (awaited before its handler returns)."""
        task = asyncio.create_task(coro)
        session.tasks.add(task)
        task.add_done_callback(session.tasks.discard)

    # ------------------------------------------------------------------------- NATS input

    async def on_claim(self, msg: Msg) -> None:
        """Newest session wins: close ours if the claim is newer; re-announce ours if it is older."""
        try:
            claim = decode_model(SessionClaim, msg.data)
        except ProtocolError as exc:
            log.debug("ignoring bad claim on %s: %s", msg.subject, exc.message)
            return
        session = self.sessions.get(claim.host_id)
        if session is None or session.ended or claim.session_id == session.session_id:
            return
        if session.superseded_by(claim):
            reason = f"superseded by a newer session on gateway {claim.gateway_id}"
            await self.retire(session, CloseCode.SUPERSEDED, reason)
        elif claim.gateway_id != self.gateway_id:
            await self.publish(subjects.session_claim(session.host_id), session.claim())

    def request_callback(self, session: GwSession) -> Callable[[Msg], Awaitable[None]]:
        """The callback of `session`'s request subscription."""

        async def on_request(msg: Msg) -> None:
            await self.on_agent_request(session, msg)

        return on_request

    async def on_agent_request(self, session: GwSession, msg: Msg) -> None:
        """Dispatch a request on ``warlock.agent.<host>.<verb>`` without awaiting the agent.

        Requests still queued when `session` ends are answered `unavailable` here: they go to no other
        session (not even a newer one of the same host here, which may not have been welcomed yet).
        """
        try:
            _, verb = subjects.parse_agent_request(msg.subject)
        except InvalidIdError as exc:
            await self.answer(msg, error(ErrorCode.BAD_REQUEST, str(exc)))
            return
        handler = self.verbs.get(verb)
        if session.ended or self.stopping:
            await self.answer(msg, error(ErrorCode.UNAVAILABLE, NOT_SENT, command_id_of(verb, msg)))
        elif handler is None:
            await self.answer(msg, error(ErrorCode.BAD_REQUEST, f"unknown verb {verb[:40]!r}"))
        else:
            await handler(session, msg)

    async def _start_exec(self, session: GwSession, msg: Msg) -> None:
        """Admit an exec request and hand the wait to a session task."""
        try:
            request = decode_model(ExecRequest, msg.data)
        except ProtocolError as exc:
            await self.answer(msg, error(ErrorCode.BAD_REQUEST, exc.message))
            return
        admission = session.admit_exec(request, msg, self.settings.max_in_flight)
        if isinstance(admission, Started):
            admission.pending.connection = self.connection()
        if isinstance(admission, Busy):
            await self.answer(msg, admission.reply)
            return
        frame = admission.frame if isinstance(admission, Started) else None
        if isinstance(admission, Joined | Started):
            wait = request.timeout + self.settings.exec_grace
            self.track(session, self._await_exec(session, admission.pending, msg, frame, wait))

    async def _await_exec(
        self, session: GwSession, pending: Pending, msg: Msg, frame: Message | None, wait: float
    ) -> None:
        """Send the Exec frame (if new), wait for the result; answer `timeout` when it does not come."""
        if frame is not None:
            if session.ended:  # it ended before this task ran: `end` answered `unavailable`
                return
            pending.sent = True  # set just before the write: send() hands the frame over before it awaits
            await self.send(session, frame)
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(pending.future)
        except TimeoutError:
            if session.give_up(pending, msg):
                description = f"no result within {wait:g}s; the command may have run"
                await self.answer(msg, error(ErrorCode.TIMEOUT, description, pending.command_id))

    async def _start_ping(self, session: GwSession, msg: Msg) -> None:
        """Admit a health ping and hand the round trip to a session task."""
        try:
            decode_model(PingRequest, msg.data)
        except ProtocolError as exc:
            await self.answer(msg, error(ErrorCode.BAD_REQUEST, exc.message))
            return
        if len(session.pings) >= self.settings.max_in_flight:
            await self.answer(msg, error(ErrorCode.BUSY, "too many health pings in flight"))
            return
        ping_id = uuid.uuid4().hex[:16]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session.pings[ping_id] = waiter
        self.track(session, self._await_ping(session, msg, ping_id, waiter))

    async def _await_ping(
        self, session: GwSession, msg: Msg, ping_id: str, waiter: asyncio.Future[None]
    ) -> None:
        """Ping the agent and answer with the round trip time, or a typed timeout / disconnected."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.send(session, Ping(id=ping_id))
        try:
            async with asyncio.timeout(self.settings.agent_ping_timeout):
                await waiter
        except TimeoutError:
            session.pings.pop(ping_id, None)
            await self.answer(msg, error(ErrorCode.TIMEOUT, "the agent did not answer the ping"))
            return
        if session.ended:
            await self.answer(msg, error(ErrorCode.DISCONNECTED, "the agent disconnected"))
            return
        answer = PingReply(
            host_id=session.host_id,
            session_id=session.session_id,
            gateway_id=self.gateway_id,
            agent_version=session.hello.agent_version,
            agent_rtt_ms=(loop.time() - started) * 1000.0,
        )
        await self.answer(msg, answer)

    async def _start_query(self, session: GwSession, msg: Msg) -> None:
        """Admit a result query (read-only: the agent answers from its ledger) and hand the round trip to a
        session task. The API's signature passes through unchanged; the agent verifies it."""
        try:
            query = decode_model(ResultQuery, msg.data)
        except ProtocolError as exc:
            await self.answer(msg, error(ErrorCode.BAD_REQUEST, exc.message))
            return
        started = session.start_query(query, self.settings.max_in_flight)
        if isinstance(started, ErrorReply):
            await self.answer(msg, started)
            return
        frame, future = started
        self.track(session, self._await_query(session, msg, frame, future))

    async def _await_query(
        self, session: GwSession, msg: Msg, frame: ResultQuery, future: asyncio.Future[ResultAnswer | None]
    ) -> None:
        """Send the query; answer with the agent's ResultAnswer as it is, or typed timeout / disconnected."""
        await self.send(session, frame)
        try:
            async with asyncio.timeout(self.settings.agent_ping_timeout):
                answer = await future
        except TimeoutError:
            session.queries.pop(frame.query_id, None)
            await self.answer(msg, error(ErrorCode.TIMEOUT, "the agent did not answer the result query"))
            return
        if answer is None:
            await self.answer(msg, error(ErrorCode.DISCONNECTED, "the agent disconnected"))
            return
        await self.answer(msg, answer)

    async def _start_cancel(self, session: GwSession, msg: Msg) -> None:
        """Admit a cancel and hand the round trip to a session task. The API's signature passes through
        unchanged; the agent verifies it before it kills anything."""
        try:
            request = decode_model(CancelRequest, msg.data)
        except ProtocolError as exc:
            await self.answer(msg, error(ErrorCode.BAD_REQUEST, exc.message))
            return
        started = session.start_cancel(request, self.settings.max_in_flight)
        if isinstance(started, ErrorReply):
            await self.answer(msg, started)
            return
        frame, future = started
        self.track(session, self._await_cancel(session, msg, frame, future))

    async def _await_cancel(
        self, session: GwSession, msg: Msg, frame: CancelRequest, future: asyncio.Future[CancelAnswer | None]
    ) -> None:
        """Send the cancel; answer with the agent's CancelAnswer (a refusal as its typed error), or a typed
        timeout / disconnected."""
        await self.send(session, frame)
        try:
            async with asyncio.timeout(self.settings.agent_ping_timeout):
                answer = await future
        except TimeoutError:
            session.cancels.pop(frame.command_id, None)
            await self.answer(msg, error(ErrorCode.TIMEOUT, "the agent did not answer the cancel"))
            return
        if answer is None:
            await self.answer(msg, error(ErrorCode.DISCONNECTED, "the agent disconnected", frame.command_id))
            return
        if answer.state == "refused":
            code = answer.code or ErrorCode.BAD_REQUEST
            await self.answer(msg, error(code, answer.description or "cancel refused", frame.command_id))
            return
        await self.answer(msg, answer)
