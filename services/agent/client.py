"""The agent's connection loop: dial a gateway, say hello, then serve until the session ends; repeat.

Per session, three tasks run side by side and the first to end cancels the others: a reader (answers
pings, starts commands, takes acks), a pinger (application pings; closes a silent connection) and a
metrics pusher. Commands run in tasks owned by the `Agent`, not the session: a dropped connection does not
cancel them; their results wait in the outbox (on disk, so also across a restart) and are re-sent after
the next welcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from shared.errors import CloseCode, ProtocolError
from shared.protocol import Message, Metrics, OutputChunk, Ping, RotateToken, TokenRotated, encode
from shared.tokens import fingerprint, generate_token, hash_token

from . import __version__, dispatch, metrics
from .backoff import Outcome, ReconnectPolicy, outcome_of_close
from .commands import Commands
from .config import AgentSettings, is_loopback_url, outbox_dir
from .ledger import Ledger, Result
from .outbox import OutboxStore
from .results import Outbox
from .stream import STREAMER, Streamer
from .tokenstore import TokenStore
from .trust import AgentTrust

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 8 * 1024 * 1024
FIRST_METRICS_DELAY_S = 1.0
SHUTDOWN_GRACE_S = 5.0


def open_outbox(settings: AgentSettings) -> Outbox:
    """The agent's outbox on disk (`config.outbox_dir`), with what it kept before a restart loaded."""
    path = outbox_dir(settings)
    outbox = Outbox(max_bytes=settings.outbox_max_bytes, store=OutboxStore(path, settings.host_id))
    if kept := outbox.open():
        log.info("outbox %s: %d un-acked result(s) kept from before; re-sent on the next session", path, kept)
    return outbox


class Agent:
    """One agent: reconnects forever, runs commands at most once, pushes metrics."""

    def __init__(
        self,
        settings: AgentSettings,
        ledger: Ledger,
        *,
        policy: ReconnectPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        shutdown_grace: float = SHUTDOWN_GRACE_S,
        token_store: TokenStore | None = None,
        trust: AgentTrust,
        tls: ssl.SSLContext | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.settings = settings  # replaced (not mutated) when the token is rotated
        self.trust = trust
        self.tls = tls  # for wss:// URLs: only the pinned CA (None: the system's CAs)
        self.token_store = token_store or TokenStore(config_path=None, from_env=False)
        self.ledger = ledger
        self.policy = policy or ReconnectPolicy(
            initial=settings.backoff_initial,
            maximum=settings.backoff_max,
            superseded=settings.superseded_backoff,
        )
        self.clock = clock
        self.shutdown_grace = shutdown_grace
        if outbox is None:  # `open_outbox` raises OSError when its directory is unusable
            outbox = open_outbox(settings)
        self.outbox = outbox
        for result in outbox.pending():  # a result kept just before a crash: its id finished
            ledger.learn(result)
        self.stopping = asyncio.Event()
        self.commands = Commands(
            ledger,
            self.outbox,
            self._deliver,
            trust=trust,
            limit=settings.max_concurrent_commands,
            max_output=settings.max_output_bytes,
        )
        self.streamer = Streamer(self._send_output)
        self._state: dispatch.SessionState | None = None
        self._ws: ClientConnection | None = None
        self._url_index = 0
        self._fingerprint = fingerprint(hash_token(settings.token.get_secret_value()))

    def stop(self) -> None:
        """Ask the agent to close its session (1000), finish running commands and return from `run`."""
        self.stopping.set()

    async def run(self) -> None:
        """Connect, serve and reconnect until `stop` is called."""
        urls = self.settings.gateway_urls
        log.info(
            "agent %s %s starting; token fingerprint %s; gateways %s; public key %s; trusting %d key(s)",
            self.settings.host_id,
            __version__,
            self._fingerprint,
            ", ".join(urls),
            self.trust.public_key,
            len(self.trust.trusted),
        )
        for url in urls:
            if url.startswith("ws://") and not is_loopback_url(url):
                log.warning(
                    "insecure = true: %s is plain ws://; anyone on the path can read the traffic", url
                )
        metrics.prime()
        try:
            while not self.stopping.is_set():
                url = urls[self._url_index % len(urls)]
                outcome, session_s = await self._connect(url)
                if outcome is Outcome.STOPPED or self.stopping.is_set():
                    break
                self._url_index += 1
                delay = self.policy.next_delay(outcome, session_s)
                log.info("reconnecting in %.1fs (%s)", delay, outcome)
                await self.pause(delay)
        finally:
            await self.commands.finish(self.shutdown_grace)

    async def pause(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if the agent is asked to stop."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self.stopping.wait()

    # ------------------------------------------------------------------ one connection

    async def _connect(self, url: str) -> tuple[Outcome, float]:
        """Open one connection to `url` and serve it; return how it ended and how long the session lasted."""
        headers = {"Authorization": f"Bearer {self.settings.token.get_secret_value()}"}
        tls: dict[str, Any] = {"ssl": self.tls} if self.tls is not None and url.startswith("wss://") else {}
        try:
            async with connect(
                url,
                **tls,
                additional_headers=headers,
                compression=None,
                ping_interval=None,
                max_size=MAX_FRAME_BYTES,
                open_timeout=self.settings.connect_timeout,
                close_timeout=self.settings.ping_timeout,
            ) as ws:
                return await self._session(ws, url)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                log.error("token rejected by %s (HTTP 401); token fingerprint %s", url, self._fingerprint)
                return Outcome.AUTH_REJECTED, 0.0
            log.warning("gateway %s refused the upgrade: HTTP %d", url, status)
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            log.warning("cannot connect to %s: %s", url, exc or type(exc).__name__)
        except ConnectionClosed as exc:
            return self._closed(url, exc), 0.0
        return Outcome.CONNECT_FAILED, 0.0

    async def _session(self, ws: ClientConnection, url: str) -> tuple[Outcome, float]:
        """Say hello, wait for the welcome, then serve until one of the session's tasks ends."""
        await self._send(ws, dispatch.hello(self.settings.host_id, trust=self.trust))
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                welcome = dispatch.expect_welcome(await ws.recv())
        except TimeoutError:
            log.warning("no welcome from %s within %.1fs", url, self.settings.connect_timeout)
            return Outcome.CONNECT_FAILED, 0.0
        except ProtocolError as exc:
            log.warning("bad first frame from %s: %s", url, exc.message)
            await ws.close(exc.close_code, exc.message[:120])
            return Outcome.CONNECT_FAILED, 0.0
        log.info("session %s established with %s", welcome.session_id, url)
        started = self.clock()
        state = dispatch.SessionState(welcome=welcome, last_received=started, outbox=self.outbox)
        self._state, self._ws = state, ws
        try:
            outcome = await self._serve(ws, url, state)
        finally:
            self._state = self._ws = None
        return outcome, self.clock() - started

    async def _serve(self, ws: ClientConnection, url: str, state: dispatch.SessionState) -> Outcome:
        """Run reader, pinger, metrics pusher and the stop watcher; the first to end cancels the rest."""
        for action in dispatch.resend(state, self.trust):
            await self._send(ws, action.message)
        if pending := len(self.outbox):
            log.info("re-sent %d un-acked result(s)", pending)
        jobs: list[Coroutine[Any, Any, Outcome]] = [
            self._reader(ws, url, state),
            self._pinger(ws, url, state),
            self._metrics(ws),
            self._watch_stop(ws),
        ]
        tasks = [asyncio.create_task(job) for job in jobs]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            outcome = results[tasks.index(task)]
            if isinstance(outcome, Outcome):
                return outcome
            if isinstance(outcome, ConnectionClosed):
                return self._closed(url, outcome)
            log.error("session task failed", exc_info=outcome if isinstance(outcome, BaseException) else None)
        return Outcome.CLOSED

    async def _reader(self, ws: ClientConnection, url: str, state: dispatch.SessionState) -> Outcome:
        """Read frames and act on them until the connection ends."""
        try:
            async for raw in ws:
                for action in dispatch.on_frame(state, raw, self.clock()):
                    if isinstance(action, dispatch.Send):
                        await self._send(ws, action.message)
                    elif isinstance(action, dispatch.Run):
                        token = STREAMER.set(self.streamer)  # the command's task streams its output
                        self.commands.start(action.request)
                        STREAMER.reset(token)
                    elif isinstance(action, dispatch.Rotate):
                        await self._send(ws, await self._rotate_safely(action.request))
                    elif isinstance(action, dispatch.Query):
                        answer = self.commands.answer(action.query, state.welcome.max_result_bytes)
                        await self._send(ws, answer)
                    elif isinstance(action, dispatch.Cancel):
                        await self._send(ws, self.commands.cancel(action.request))
                    else:
                        await ws.close(action.code, action.reason)
                        return Outcome.CLOSED
        except ConnectionClosed as exc:
            return self._closed(url, exc)
        self._log_close(url, ws.close_code, ws.close_reason)
        return outcome_of_close(ws.close_code)

    async def _pinger(self, ws: ClientConnection, url: str, state: dispatch.SessionState) -> Outcome:
        """Ping every interval; close the connection if nothing arrived for interval + timeout."""
        interval = min(self.settings.ping_interval, state.welcome.ping_interval)
        silence = interval + self.settings.ping_timeout
        next_ping, count = self.clock() + interval, 0
        while True:
            now = self.clock()
            if now - state.last_received >= silence:
                log.warning("nothing from %s for %.1fs; reconnecting", url, now - state.last_received)
                await ws.close(CloseCode.PING_TIMEOUT, "ping timeout")
                return Outcome.CLOSED
            if now >= next_ping:
                count += 1
                await self._send(ws, Ping(id=str(count)))
                next_ping = now + interval
            await asyncio.sleep(max(0.01, min(next_ping, state.last_received + silence) - self.clock()))

    async def _metrics(self, ws: ClientConnection) -> Outcome:
        """Push a metrics sample shortly after the welcome, then every metrics interval."""
        interval = self.settings.metrics_interval
        await asyncio.sleep(min(FIRST_METRICS_DELAY_S, interval))
        while True:
            try:
                sample = await metrics.sample_async()
            except Exception:
                log.exception("metrics sample failed")
            else:
                await self._send(ws, Metrics(sample=sample))
            await asyncio.sleep(interval)

    async def _watch_stop(self, ws: ClientConnection) -> Outcome:
        """When asked to stop: let running commands finish (results still go out), then close with 1000."""
        await self.stopping.wait()
        if pending := len(self.commands):
            log.info("stopping: waiting up to %.0fs for %d command(s)", self.shutdown_grace, pending)
            await self.commands.wait(self.shutdown_grace)
        await ws.close(CloseCode.NORMAL, "agent stopping")
        return Outcome.STOPPED

    async def _send(self, ws: ClientConnection, message: Message) -> None:
        """Send one frame as text, bounded by ping interval + timeout."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sending %s", getattr(message, "type", type(message).__name__))
        async with asyncio.timeout(self.settings.ping_interval + self.settings.ping_timeout):
            await ws.send(encode(message), text=True)

    def _closed(self, url: str, exc: ConnectionClosed) -> Outcome:
        """Log why the gateway ended the connection and map it to an outcome."""
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        self._log_close(url, code, reason)
        return outcome_of_close(code)

    def _log_close(self, url: str, code: int | None, reason: str | None) -> None:
        """One log line per closed session, at the level its close code deserves."""
        if code == CloseCode.SUPERSEDED:
            log.warning(
                "session with %s superseded by a newer session for host %s; waiting %.0fs",
                url,
                self.settings.host_id,
                self.settings.superseded_backoff,
            )
        elif code == CloseCode.TOKEN_REVOKED:
            log.warning(
                "gateway %s closed the session: token revoked; reconnecting with token %s",
                url,
                self._fingerprint,
            )
        else:
            level = logging.INFO if code in (CloseCode.NORMAL, CloseCode.GOING_AWAY) else logging.WARNING
            log.log(level, "connection to %s closed (code %s%s)", url, code, f": {reason}" if reason else "")

    # ------------------------------------------------------------------ token rotation

    async def _rotate_safely(self, request: RotateToken) -> TokenRotated:
        """`rotate`, with an unexpected failure answered ok=False (the session stays up)."""
        try:
            return await self.rotate(request)
        except Exception:
            log.exception("token rotation %s failed", request.rotation_id)
            return TokenRotated(rotation_id=request.rotation_id, ok=False, description="internal error")

    async def rotate(self, request: RotateToken) -> TokenRotated:
        """Verify a signed rotation, make a new token here and store it where the current one came from.

        On success the new token is used from the next connection, and the answer carries its hash signed
        by the agent (the token itself never leaves the host). A refused rotation changes nothing; its
        description starts with the typed code (``unsigned: ...``) so the gateway can answer with it.
        """
        rotation_id = request.rotation_id
        refused = self.trust.check_rotate(request)
        if refused is None:
            assert request.signature is not None
            refused = self.ledger.claim(rotation_id, keep_until=request.signature.not_after)
        if refused is not None:
            description = f"{refused.code}: {refused.description}"[:1024]
            return TokenRotated(rotation_id=rotation_id, ok=False, description=description)
        token = generate_token()
        token_sha256 = hash_token(token)
        new_fingerprint = fingerprint(token_sha256)
        problem = await asyncio.to_thread(self.token_store.store, token)
        if problem is not None:
            log.warning("token rotation %s refused: %s", rotation_id, problem)
            return TokenRotated(rotation_id=rotation_id, ok=False, description=problem[:1024])
        self.settings = self.settings.model_copy(update={"token": SecretStr(token)})
        log.info(
            "token rotated (%s): fingerprint %s -> %s, stored in %s; used from the next connection",
            rotation_id,
            self._fingerprint,
            new_fingerprint,
            self.token_store.config_path,
        )
        self._fingerprint = new_fingerprint
        signature = self.trust.sign_rotated(rotation_id, token_sha256)
        return TokenRotated(rotation_id=rotation_id, ok=True, token_sha256=token_sha256, signature=signature)

    # ------------------------------------------------------------------ results

    async def _send_output(self, chunk: OutputChunk) -> bool:
        """Send an output chunk if the session up now takes them; False when it could not leave."""
        ws, state = self._ws, self._state
        if ws is None or state is None or not state.output_stream:
            return False
        try:
            await self._send(ws, chunk)
        except (ConnectionClosed, TimeoutError):
            return False
        return True

    async def _deliver(self, result: Result) -> None:
        """Send a finished command's result if a session is up (it stays in the outbox until acked)."""
        ws, state = self._ws, self._state
        if ws is None or state is None:
            log.info("command %s finished while disconnected; result kept for re-sending", result.command_id)
            return
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await self._send(ws, dispatch.result_frame(state.welcome, result, self.trust))
