"""The gateway's I/O shell: the WebSocket server, upgrade-time auth, one handler per agent, the pinger.

Decisions live in `services.gateway.session`; the NATS side in `services.gateway.bridge`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
from nats import micro
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.micro.request import Request
from nats.micro.service import Service
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from services.gateway import gateway_version, metrics
from services.gateway.auth import Authenticator, TokenCache
from services.gateway.bridge import Bridge, GwSession, session_log
from services.gateway.rekey import Rekeyer
from services.gateway.session import Session, accept_hello, is_dead, keepalive_id, max_result_bytes
from services.gateway.settings import GatewaySettings, somaxconn, tls_context
from services.gateway.upgrade import AGENT_PATH, UpgradeGate, peer_of
from shared import subjects
from shared.errors import CloseCode, ProtocolError
from shared.ids import HostId
from shared.logs import ContextAdapter
from shared.protocol import GatewayHeartbeat, Ping, PresenceConnected, Welcome, decode_agent_frame, encode

log = logging.getLogger("services.gateway")
SERVICE_NAME = "warlock-gateway"


def close_info(exc: ConnectionClosed) -> tuple[str, int | None]:
    """A log-friendly reason and the close code of a closed connection."""
    if exc.rcvd is not None:
        return f"agent closed: {exc.rcvd.reason or 'no reason'}", exc.rcvd.code
    if exc.sent is not None:
        return f"closed: {exc.sent.reason or 'no reason'}", exc.sent.code
    return "connection lost", None


def forget_handshake(conn: ServerConnection) -> None:
    """Drop the upgrade's headers, which websockets keeps for the whole connection: the bearer token
    needs no copy in memory once checked, and they are ~3 KiB of every idle session's ~24 KiB."""
    if conn.request is not None:
        conn.request.headers.clear()
    if conn.response is not None:
        conn.response.headers.clear()
        conn.response.body = b""


class SharedSync:
    """`Bridge.sync` shared by the sessions registering at once (a group commit).

    A caller's SUB is already written when it calls; it waits for a sync that begins after its call, so
    the server has processed that SUB when it returns. Callers arriving while a sync runs share the next
    one: in a connect storm two round trips serve every session registered meanwhile instead of two each.
    """

    def __init__(self, sync: Callable[[], Awaitable[None]]) -> None:
        self._sync = sync
        self._next: asyncio.Future[None] | None = None
        self._driver: asyncio.Task[None] | None = None

    async def __call__(self) -> None:
        """Return once a sync that began after this call has completed."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        future = self._next
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(), name="shared-sync")
        await asyncio.shield(future)

    async def _drive(self) -> None:
        while self._next is not None:
            future, self._next = self._next, None
            try:
                await self._sync()
            finally:
                if not future.done():
                    future.set_result(None)


class Gateway:
    """One gateway: call `start`, then `stop` (or use `async with`)."""

    def __init__(self, nc: NATS, settings: GatewaySettings) -> None:
        self.nc = nc
        self.settings = settings
        self.tls = tls_context(settings)  # wss:// when a certificate and key are configured
        self.bridge = Bridge(nc, settings)
        metrics.watch_sessions(self.bridge)  # warlock_gateway_sessions
        cache = TokenCache(settings.token_cache_ttl, settings.token_cache_size)
        self.auth = Authenticator(nc, cache, settings.verify_timeout)
        self.gate = UpgradeGate(nc, self.bridge, self.auth)
        self.rekey = Rekeyer(self.bridge, cache, settings.rotate_timeout)
        self.sync = SharedSync(self.bridge.sync)
        self.bridge.verbs["rotate"] = self.rekey.start_rotation
        self.port = 0
        self._server: Server | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None
        self._claims: Subscription | None = None
        self._revocations: Subscription | None = None
        self._service: Service | None = None

    @property
    def sessions(self) -> dict[HostId, GwSession]:
        """The live sessions, by host."""
        return self.bridge.sessions

    async def __aenter__(self) -> Gateway:
        """Start serving."""
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Shut down gracefully."""
        await self.stop()

    async def start(self) -> None:
        """Subscribe to claims and revocations, register the micro service, listen, start the pinger."""
        s = self.settings
        self._claims = await self.nc.subscribe(subjects.SESSION_CLAIMS, cb=self.bridge.on_claim)
        self._revocations = await self.nc.subscribe(subjects.TOKEN_REVOKED, cb=self.rekey.on_revoked)
        self._service = await micro.add_service(
            self.nc, name=SERVICE_NAME, version=gateway_version(), metadata={"gateway_id": s.gateway_id}
        )
        await self._service.add_endpoint(
            name="sessions", subject=subjects.gateway_sessions(s.gateway_id), handler=self._sessions_endpoint
        )
        self._server = await serve(
            self._handle,
            s.host,
            s.port,
            # GET /metrics answered first, everything else by the gate
            process_request=metrics.MetricsRoute(self.gate, s.metrics, AGENT_PATH),
            compression=None,
            ping_interval=None,
            max_size=s.max_frame_bytes,
            max_queue=4,
            close_timeout=s.close_timeout,
            ssl=self.tls,
            backlog=s.backlog,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._pinger = asyncio.create_task(self._ping_loop())
        self._heart = asyncio.create_task(self._heartbeat_loop())
        await self.bridge.sync()
        scheme = "wss" if self.tls is not None else "ws"
        if self.tls is None and s.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "serving plain ws:// on %s: agents refuse it unless configured insecure; set "
                "WARLOCK_GATEWAY_TLS_CERT_FILE and WARLOCK_GATEWAY_TLS_KEY_FILE (or terminate TLS in front)",
                s.host,
            )
        cap = somaxconn()
        if cap is not None and s.backlog > cap:
            log.warning(
                "WARLOCK_GATEWAY_BACKLOG=%d is capped by the kernel at net.core.somaxconn=%d; raise it with "
                "sysctl to admit a bigger connect storm",
                s.backlog,
                cap,
            )
        log.info(
            "gateway %s listening on %s://%s:%d%s (accept backlog %d)",
            s.gateway_id,
            scheme,
            s.host,
            self.port,
            AGENT_PATH,
            s.backlog if cap is None else min(s.backlog, cap),
        )

    async def stop(self) -> None:
        """Stop accepting, unsubscribe every host, drain in-flight requests, close agents with 1001."""
        bridge, s = self.bridge, self.settings
        if bridge.stopping:
            return
        bridge.stopping = True
        log.info("gateway %s stopping: %d sessions", s.gateway_id, len(bridge.sessions))
        if self._server is not None:
            self._server.server.close()  # stop listening; open connections stay
        if self._heart is not None:  # silent from now on: APIs time this gateway's sessions out if it dies
            self._heart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heart
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
        await bridge.unsubscribe_all()  # queued requests: `unavailable`; in-flight ones may finish
        in_flight = {task for session in bridge.sessions.values() for task in session.tasks}
        if in_flight:
            await asyncio.wait(in_flight, timeout=s.drain_timeout)
        for session in list(bridge.sessions.values()):
            await bridge.retire(session, CloseCode.GOING_AWAY, "gateway shutting down")
        if self._server is not None:
            self._server.close(True, CloseCode.GOING_AWAY, "gateway shutting down")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(s.close_timeout + 1.0):
                    await self._server.wait_closed()
        await bridge.wait_closers(s.close_timeout + 1.0)
        with contextlib.suppress(nats.errors.Error):
            if self._service is not None:
                await self._service.stop()
            if self._claims is not None:
                await self._claims.unsubscribe()
            if self._revocations is not None:
                await self._revocations.unsubscribe()
        log.info("gateway %s stopped", s.gateway_id)

    async def _sessions_endpoint(self, request: Request) -> None:
        """Micro endpoint: this gateway's id and connected host ids, as JSON."""
        body = {"gateway_id": self.settings.gateway_id, "hosts": sorted(self.bridge.sessions)}
        await request.respond(json.dumps(body).encode())

    # ------------------------------------------------------------------------- WebSocket

    async def _handle(self, conn: ServerConnection) -> None:
        """One agent connection: hello, registration, frames until it closes, then cleanup."""
        forget_handshake(conn)
        plog = ContextAdapter(log, {"host": conn.username, "peer": peer_of(conn)})
        try:
            async with asyncio.timeout(self.settings.auth_timeout):
                data = await conn.recv()
            host = HostId(conn.username)
            hello = accept_hello(data, host, self.auth.agent_key(host))
        except TimeoutError:
            plog.warning("closing 4001: no hello within %gs", self.settings.auth_timeout)
            await conn.close(CloseCode.AUTH_TIMEOUT, "no hello in time")
            return
        except ProtocolError as exc:
            plog.warning("closing %d: %s", exc.close_code, exc.message)
            await conn.close(exc.close_code, exc.message[:120])
            return
        except ConnectionClosed as exc:
            self._log_closed(plog, exc, "before hello")
            return
        loop = asyncio.get_running_loop()
        creds = self.gate.credentials(conn)
        token_sha256 = creds.token_sha256 if creds is not None else ""
        session = Session(
            conn, hello, self.bridge.gateway_id, time.time(), loop.time(), token_sha256=token_sha256
        )
        if creds is not None and self.auth.cache.revoked_since(
            session.host_id, token_sha256, creds.checked_at
        ):
            plog.warning("closing 4003: token revoked during the upgrade")
            await conn.close(CloseCode.TOKEN_REVOKED, "token revoked")
            return
        if await self._register(session):
            reason, code = await self._serve(session)
            await self.bridge.end(session, reason, code)
        if session.tasks:
            await asyncio.wait(set(session.tasks))

    async def _register(self, session: GwSession) -> bool:
        """Take over the host, claim it, subscribe its requests, publish presence, send Welcome."""
        bridge, nc, host = self.bridge, self.nc, session.host_id
        if bridge.stopping:
            await session.conn.close(CloseCode.GOING_AWAY, "gateway shutting down")
            return False
        old = bridge.sessions.get(host)
        bridge.sessions[host] = session
        if old is not None:
            await bridge.retire(old, CloseCode.SUPERSEDED, "superseded by a newer session on this gateway")
        hello = session.hello
        connected = PresenceConnected(
            host_id=host,
            session_id=session.session_id,
            gateway_id=bridge.gateway_id,
            hostname=hello.hostname,
            platform=hello.platform,
            agent_version=hello.agent_version,
            at=session.connected_at,
            signed_at=hello.signed_at,  # the agent's signature, passed through: the API checks it
            signature=hello.signature,
        )
        try:
            await nc.publish(subjects.session_claim(host), encode(session.claim()))
            session.sub = await nc.subscribe(
                subjects.agent_requests(host),
                queue=subjects.GATEWAY_QUEUE,
                cb=bridge.request_callback(session),
            )
            await nc.publish(subjects.presence(host), encode(connected))
        except nats.errors.Error as exc:
            session_log(session).warning("closing 1011: NATS unavailable (%s)", type(exc).__name__)
            await bridge.end(session, "NATS unavailable", int(CloseCode.INTERNAL_ERROR))
            await session.conn.close(CloseCode.INTERNAL_ERROR, "NATS unavailable")
            return False
        await self.sync()  # the subscription is live on the server before the agent hears Welcome
        if session.ended:  # superseded while registering
            await bridge.unsubscribe(session)
            return False
        max_payload = nc.max_payload or self.settings.max_frame_bytes
        welcome = Welcome(
            session_id=session.session_id,
            gateway_id=bridge.gateway_id,
            ping_interval=self.settings.ping_interval,
            max_result_bytes=max_result_bytes(self.settings.max_frame_bytes, max_payload),
        )
        await bridge.send(session, welcome)
        if (output_on := session.output_on()) is not None and not session.ended:
            await bridge.send(session, output_on)  # this gateway takes output chunks
        if session.ended:  # the welcome itself timed out (see Bridge.send)
            return False
        metrics.session_started()
        session_log(session).info(
            "session started: hostname=%s platform=%s agent=%s",
            hello.hostname,
            hello.platform,
            hello.agent_version,
        )
        return True

    async def _serve(self, session: GwSession) -> tuple[str, int | None]:
        """Read frames until the connection ends; return why it ended and its close code."""
        conn, bridge, plog = session.conn, self.bridge, session_log(session)
        loop = asyncio.get_running_loop()
        try:
            async for data in conn:
                session.last_seen = loop.time()
                try:
                    frame = decode_agent_frame(data)
                except ProtocolError as exc:
                    plog.warning("closing %d: %s", exc.close_code, exc.message)
                    await bridge.end(session, f"protocol error: {exc.message}", int(exc.close_code))
                    await bridge.hang_up(conn, exc.close_code, exc.message[:120])
                    return "protocol error", int(exc.close_code)
                if plog.isEnabledFor(logging.DEBUG):
                    plog.debug("frame %s", frame.type)
                close = await bridge.apply(session, session.handle(frame))
                if close is not None:
                    plog.warning("closing %d: %s", close.code, close.reason)
                    await bridge.end(session, close.reason, int(close.code))
                    await bridge.hang_up(conn, close.code, close.reason)
                    return close.reason, int(close.code)
        except ConnectionClosed as exc:
            self._log_closed(plog, exc, "")
            return close_info(exc)
        return f"agent closed: {conn.close_reason or 'no reason'}", conn.close_code

    def _log_closed(self, plog: ContextAdapter, exc: ConnectionClosed, when: str) -> None:
        """Log a connection that closed under us; an oversized frame is a WARNING, once."""
        if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
            plog.warning("closing 1009: frame over %d bytes %s", self.settings.max_frame_bytes, when)
        elif plog.isEnabledFor(logging.DEBUG):
            plog.debug("connection closed %s: %s", when, close_info(exc)[0])

    async def _heartbeat_loop(self) -> None:
        """Say every heartbeat_interval that this gateway is alive (a NATS failure is logged by publish)."""
        s = self.settings
        subject = subjects.gateway_heartbeat(s.gateway_id)
        while True:
            beat = GatewayHeartbeat(
                gateway_id=s.gateway_id,
                sessions=len(self.bridge.sessions),
                interval=s.heartbeat_interval,
                at=time.time(),
            )
            await self.bridge.publish(subject, beat)
            await asyncio.sleep(s.heartbeat_interval)

    async def _ping_loop(self) -> None:
        """Ping every session each ping_interval; close with 4002 those silent for interval + timeout."""
        s, bridge = self.settings, self.bridge
        loop = asyncio.get_running_loop()
        tick = min(1.0, s.ping_interval / 2, s.ping_timeout / 2)
        next_ping = loop.time() + s.ping_interval
        while True:
            await asyncio.sleep(tick)
            try:
                now = loop.time()
                for session in list(bridge.sessions.values()):
                    if is_dead(session.last_seen, now, s.ping_interval, s.ping_timeout):
                        silent = now - session.last_seen
                        session_log(session).warning("closing 4002: nothing received for %.1fs", silent)
                        await bridge.retire(session, CloseCode.PING_TIMEOUT, "ping timeout")
                if now >= next_ping:
                    next_ping = now + s.ping_interval
                    frame = encode(Ping(id=keepalive_id(time.monotonic())))  # its pongs give each rtt_ms
                    broadcast([session.conn for session in bridge.sessions.values()], frame, text=True)
            except Exception:
                log.exception("pinger iteration failed")
