"""The browser stream: ``POST /api/ws-tickets`` (API key) and ``GET /api/ws?ticket=...`` (a WebSocket).

A browser cannot set an ``Authorization`` header on a WebSocket, and an API key must never travel in a URL:
the page asks for a ticket with its key, then opens the socket with it. A ticket works once, for
`ws_ticket_ttl` seconds, on any API instance of the database (`services.api.store.tickets`). The edge lets
WebSocket scopes through (`services.api.http.edge` checks ``http`` scopes only): this route checks the
ticket itself, and the key it was issued to, at connect and then periodically (`BrowserHub.check_keys`).

Close codes, always after the handshake, so the browser sees them (a refused handshake is a bare 403):

    4401  no, unknown, used or expired ticket (sent before anything else)
    4403  the ticket's API key was revoked, has expired or was deleted (reason ``API key revoked`` /
          ``API key expired`` / ``API key deleted``); at connect, or within the auth cache TTL after
    4408  too slow: the connection's send queue filled up (`ws_send_queue_frames` / `ws_send_queue_bytes`)
    1003  a binary frame          1007  a frame that is not JSON
    1008  JSON that is not an object with a known ``type``
    1009  a frame over `ws_max_frame_bytes`
    1011  an unexpected error on the server
    1013  the database could not check the ticket: try again

Client → server: ``{"type": "subscribe" | "unsubscribe", "topic": "presence" | "metrics" | "output" |
"commands", "host"?: id, "command_id"?: id (output: required; commands: optional), "id"?: int or
string}`` or ``{"type": "ping", "id"?}``; the server answers ``{"type": "ack", "id"}``,
``{"type": "pong", "id", "at": <server Unix time>}`` or ``{"type": "error", "id", "code", "detail"}``, always
with the request's id (a client matches replies to requests by it). Server → client:
``{"type": "event", "topic", "host", "data"}``.

An output subscription with ``"after": <seq>`` (0: from the start) replays: the command's stored chunks
after that seq, then its live ones, in order, each once, with no gap (`OutputHub.follow`, the stream behind
``GET /api/commands/{id}/stream``), and last ``{"command_id", "end": true, "outcome"}``. A page can start a
command, learn its id, and still see the output from the first byte; after a reconnect it asks again with
the last seq it got. Without ``after`` the subscription is live only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, WebSocket
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from services.api.errors import NotFound, RateLimited
from services.api.fleet.browser import (
    KEY_CLOSE_CODE,
    TOPICS,
    BrowserConn,
    BrowserHub,
    TicketHolder,
    TicketStore,
    Topic,
)
from services.api.fleet.output import ChunkEvent, EndEvent, Event, OutputHub
from services.api.http.auth import READ
from services.api.http.deps import api_key_info
from shared.ids import is_command_id, is_host_id

log = logging.getLogger(__name__)

router = APIRouter(tags=["browser stream"])

BAD_TICKET = 4401
TOO_SLOW = 4408
TRY_AGAIN = 1013
REQUESTS = ("subscribe", "unsubscribe", "ping")
CLOSE_TIMEOUT_S = 2.0


class WsTicket(BaseModel):
    """A one-time ticket for ``GET /api/ws?ticket=...``."""

    ticket: str
    expires_in: float  # seconds


@router.post("/ws-tickets", status_code=201, response_model=WsTicket, dependencies=[READ])
async def issue_ticket(request: Request) -> WsTicket:
    """A single-use ticket for the browser stream, valid ``expires_in`` seconds on any API instance,
    carrying this key's name, role and scope."""
    key = api_key_info(request)
    app_state_of(request).require_db()
    book: TicketStore = request.app.state.browser_tickets
    ticket = await book.issue(TicketHolder(key.name, key.role.value, dict(key.scope) if key.scope else None))
    if ticket is None:
        what = f"API key {key.name!r} has {book.max_per_key} browser stream tickets outstanding"
        raise RateLimited(f"{what}: use one, or retry once they expire", max(1, round(book.ttl)))
    return WsTicket(ticket=ticket, expires_in=book.ttl)


class BadFrame(Exception):
    """A frame that ends the connection, with its close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _frame(**values: Any) -> str:
    return json.dumps(values, separators=(",", ":"))


def _output_frame(host: str, data: dict[str, Any]) -> str:
    return _frame(type="event", topic="output", host=host, data=data)


class Session:
    """One browser connection: reads its requests, keeps its subscriptions and replays, writes its queue."""

    def __init__(self, websocket: WebSocket, hub: BrowserHub, conn: BrowserConn) -> None:
        self.ws = websocket
        self.hub = hub
        self.conn = conn
        self.output: OutputHub | None = getattr(websocket.app.state, "output", None)
        self.replays: dict[str, asyncio.Task[None]] = {}  # command id → its replaying output stream
        settings = app_state_of(websocket).settings
        self.max_frame = settings.ws_max_frame_bytes
        self.max_subs = settings.ws_max_subscriptions

    async def write(self) -> None:
        """Send queued frames until cancelled."""
        while True:
            await self.ws.send_text(await self.conn.next_frame())

    async def read(self) -> None:
        """Handle frames until the browser goes; `BadFrame` on a protocol violation."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                raise BadFrame(1003, "binary frames are not accepted: send JSON text")
            if len(text) > self.max_frame or len(text.encode("utf-8", "replace")) > self.max_frame:
                raise BadFrame(1009, f"frame larger than {self.max_frame} bytes")
            try:
                request = json.loads(text)
            except ValueError:
                raise BadFrame(1007, "frame is not valid JSON") from None
            if not isinstance(request, dict) or request.get("type") not in REQUESTS:
                raise BadFrame(
                    1008, 'expected a JSON object with "type": "subscribe", "unsubscribe" or "ping"'
                )
            await self.handle(request)

    async def handle(self, request: dict[str, Any]) -> None:
        """Answer one request: a ping with a pong, a subscribe / unsubscribe with an ack or an error frame;
        each with the request's id."""
        rid = request.get("id")
        if rid is not None and not (
            (isinstance(rid, int) and not isinstance(rid, bool) and abs(rid) < 2**53)
            or (isinstance(rid, str) and len(rid) <= 64)
        ):
            self.conn.offer(
                _frame(type="error", id=None, code="bad_id", detail="id: an integer or a short string")
            )
            return
        if request["type"] == "ping":
            self.conn.offer(_frame(type="pong", id=rid, at=time.time()))
            return
        problem = await self._apply(request)
        if problem is None:
            self.conn.offer(_frame(type="ack", id=rid))
        else:
            self.conn.offer(_frame(type="error", id=rid, code=problem[0], detail=problem[1]))

    def close(self) -> None:
        """Stop every replay (the connection is ending)."""
        for task in self.replays.values():
            task.cancel()
        self.replays.clear()

    async def _replay(self, command_id: str, host: str, events: AsyncIterator[Event], rid: Any) -> None:
        """Queue `events` (an output stream from the store, then live) as output events; the end as one
        ``{"command_id", "end": true, "outcome"}`` event. A full queue ends it (the connection is dropped)."""
        try:
            async for event in events:
                if isinstance(event, ChunkEvent):
                    data: dict[str, Any] = {
                        "command_id": command_id,
                        "seq": event.seq,
                        "stream": event.stream,
                        "data": event.data,
                        "truncated": event.truncated,
                    }
                elif isinstance(event, EndEvent):
                    data = {"command_id": command_id, "end": True, "outcome": event.outcome}
                else:
                    continue  # keepalive: the socket has its own
                if not self.conn.offer(_output_frame(host, data)):
                    return
        except (SQLAlchemyError, OSError) as exc:
            log.warning("browser output replay of %s failed: %s", command_id, type(exc).__name__)
            detail = (
                f"the output of {command_id} could not be read: subscribe again with after = the last seq"
            )
            self.conn.offer(_frame(type="error", id=rid, code="unavailable", detail=detail))
        finally:
            if self.replays.get(command_id) is asyncio.current_task():
                del self.replays[command_id]

    async def _apply_replay(self, request: dict[str, Any], command_id: str) -> tuple[str, str] | None:
        """An output subscription with ``after``: the stored chunks after that seq, then live ones, then
        the outcome (`OutputHub.follow`: in order, each once, no gap), whenever it is asked."""
        after, host, rid = request.get("after"), request.get("host"), request.get("id")
        if isinstance(after, bool) or not isinstance(after, int) or not 0 <= after < 2**31:
            return "bad_after", "after: the last seq already received (0: from the start)"
        if request["type"] == "unsubscribe":
            task = self.replays.pop(command_id, None)
            if task is not None:
                task.cancel()
            return None
        if self.output is None:
            return "unavailable", "this instance keeps no command output"
        if command_id not in self.replays and len(self.conn.topics) + len(self.replays) >= self.max_subs:
            return "too_many_subscriptions", f"at most {self.max_subs} subscriptions per connection"
        try:
            ran_on, events = await self.output.follow(command_id, after)
        except NotFound:
            return "unknown_command", f"no command {command_id}"
        except (SQLAlchemyError, OSError) as exc:
            log.warning("browser output replay of %s not started: %s", command_id, type(exc).__name__)
            return "unavailable", "the database is unavailable: retry"
        if host is not None and host != ran_on:
            return "bad_host", f"command {command_id} ran on host {ran_on!r}, not {host!r}"
        scope = self.conn.holder.scope
        if scope and not await self.hub.host_in_scope(scope, ran_on):
            return (
                "out_of_scope",
                f"host {ran_on!r} is outside the scope of API key {self.conn.holder.key_name!r}",
            )
        previous = self.replays.pop(command_id, None)
        if previous is not None:
            previous.cancel()  # asked again (e.g. from another seq): the new one replaces it
        self.replays[command_id] = asyncio.create_task(
            self._replay(command_id, ran_on, events, rid), name="browser-output-replay"
        )
        return None

    async def _apply(self, request: dict[str, Any]) -> tuple[str, str] | None:
        topic, host, command_id = request.get("topic"), request.get("host"), request.get("command_id")
        if topic not in TOPICS:
            return "unknown_topic", f"topic: one of {', '.join(TOPICS)}"
        if host is not None and not (isinstance(host, str) and is_host_id(host)):
            return "bad_host", "host: a host id ([a-z0-9_-]{1,63})"
        if command_id is not None and not (isinstance(command_id, str) and is_command_id(command_id)):
            return "bad_command_id", "command_id: a command id"
        if topic == "output" and command_id is None:
            return "bad_command_id", "the output topic needs a command_id"
        if topic in ("presence", "metrics") and command_id is not None:
            return "bad_command_id", f"the {topic} topic takes no command_id"
        if "after" in request:
            if topic != "output" or not isinstance(command_id, str):
                return "bad_after", "after: only on the output topic"
            return await self._apply_replay(request, command_id)
        sub = Topic(topic, host, command_id)
        if request["type"] == "unsubscribe":
            self.conn.topics.discard(sub)
            return None
        scope = self.conn.holder.scope
        if scope and host is not None and not await self.hub.host_in_scope(scope, host):
            return (
                "out_of_scope",
                f"host {host!r} is outside the scope of API key {self.conn.holder.key_name!r}",
            )
        if sub not in self.conn.topics and len(self.conn.topics) >= self.max_subs:
            return "too_many_subscriptions", f"at most {self.max_subs} subscriptions per connection"
        self.conn.topics.add(sub)
        return None


class HideQueryStrings(logging.Filter):
    """Drops the query string from uvicorn's WebSocket lines (``"WebSocket /api/ws?ticket=..." [accepted]``):
    a ticket is a credential for its few seconds and never reaches a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the path argument of a ``WebSocket`` line; let every record through."""
        if isinstance(record.msg, str) and "WebSocket" in record.msg and isinstance(record.args, tuple):
            record.args = tuple(a.split("?", 1)[0] if isinstance(a, str) else a for a in record.args)
        return True


def hide_query_strings() -> None:
    """Install `HideQueryStrings` on uvicorn's logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, HideQueryStrings) for f in logger.filters):
        logger.addFilter(HideQueryStrings())


def app_state_of(connection: WebSocket | Request) -> Any:
    """The app's `ApiState` (set by the lifespan)."""
    return connection.app.state.api


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close with `code`, not waiting long on a browser that does not read."""
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code, reason), CLOSE_TIMEOUT_S)


def add_websocket(app: FastAPI) -> None:
    """Add ``/api/ws`` to `app` directly: its authority is the ticket (issued to a read key), not a role
    declaration, and the edge lets WebSocket scopes through (see the module's docstring)."""
    app.add_api_websocket_route("/api/ws", browser_stream)


async def browser_stream(websocket: WebSocket) -> None:
    """The browser stream (see the module's docstring); authenticated by a one-time ticket."""
    book: TicketStore | None = getattr(websocket.app.state, "browser_tickets", None)
    hub: BrowserHub | None = getattr(websocket.app.state, "browser_hub", None)
    await websocket.accept()
    try:
        holder = await book.consume(websocket.query_params.get("ticket", "")) if book is not None else None
    except (SQLAlchemyError, OSError) as exc:
        log.warning("browser stream ticket not checked: database unavailable: %s", type(exc).__name__)
        await _close(websocket, TRY_AGAIN, "database unavailable: retry with a new ticket")
        return
    if holder is None or hub is None:
        await _close(websocket, BAD_TICKET, "no valid ticket: POST /api/ws-tickets for one")
        return
    problem = await hub.key_problem(holder.key_name)  # revoked since the ticket was issued
    if problem is not None:
        await _close(websocket, KEY_CLOSE_CODE, f"API key {problem}")
        return
    settings = app_state_of(websocket).settings
    conn = BrowserConn(holder, settings.ws_send_queue_frames, settings.ws_send_queue_bytes)
    session = Session(websocket, hub, conn)
    hub.add(conn)
    reader = asyncio.create_task(session.read(), name="browser-read")
    writer = asyncio.create_task(session.write(), name="browser-write")
    slow = asyncio.create_task(conn.slow.wait(), name="browser-slow")
    ended = asyncio.create_task(conn.ended.wait(), name="browser-ended")
    try:
        await asyncio.wait({reader, writer, slow, ended}, return_when=asyncio.FIRST_COMPLETED)
        for task in (reader, writer, slow, ended):
            task.cancel()
        results = await asyncio.gather(reader, writer, slow, ended, return_exceptions=True)
        bad = results[0]
        if conn.ended.is_set():
            code, reason = conn.ending
            log.info("browser stream of key %r ended: %s", holder.key_name, reason)
            hub.remove(conn, "key")
            await _close(websocket, code, reason)
        elif conn.slow.is_set():
            log.info("browser stream of key %r dropped: too slow", holder.key_name)
            hub.remove(conn, "slow")  # counted now: the close below may wait for a browser that never reads
            await _close(websocket, TOO_SLOW, "too slow: send queue full")
        elif isinstance(bad, BadFrame):
            hub.remove(conn, "protocol")
            await _close(websocket, bad.code, bad.reason)
        elif not isinstance(bad, WebSocketDisconnect | asyncio.CancelledError) and isinstance(bad, Exception):
            log.warning("browser stream ended: %s", type(bad).__name__)
            await _close(websocket, 1011, "internal error")
        else:
            await _close(websocket, 1000, "")
    finally:
        session.close()
        hub.remove(conn)
