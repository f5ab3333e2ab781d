"""NATS helpers shared by the services on NATS (never imported by the agent).

Request/reply workers are shaped like NATS micro: every reply is a protocol model; an error is an
`ErrorReply` with the micro error headers set, so ``nats req`` shows the code and description.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import Request

from shared import subjects
from shared.errors import ErrorCode
from shared.protocol import ErrorReply, Message, encode

if TYPE_CHECKING:
    from shared.settings import NatsSettings

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
    ErrorCode.UNSIGNED: "401",
    ErrorCode.UNKNOWN_KEY: "401",
    ErrorCode.BAD_SIGNATURE: "401",
    ErrorCode.WRONG_HOST: "403",
    ErrorCode.EXPIRED: "401",
    ErrorCode.REPLAY: "409",
    ErrorCode.FORBIDDEN: "403",
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


# ----------------------------------------------------------------------------- the connection

RETRY_WAIT_S = 2  # between connection attempts (nats-py's reconnect_time_wait)
CONNECT_TIMEOUT_S = 2  # one attempt's TCP connect + handshake
REPEAT_LOG_S = 30.0  # the same failure again is logged at most this often
# Called with (role, event) on every link's "error" (a failed attempt), "disconnected" and "reconnected":
# `shared.metrics` appends its counter here (this module imports no metrics library).
LINK_HOOKS: list[Callable[[str, str], None]] = []


def describe(exc: BaseException) -> str:
    """One line naming an exception: its class and message (never a traceback)."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tls_context(ca_file: Path) -> ssl.SSLContext:
    """A client TLS context that verifies the NATS server against the CA(s) in `ca_file`."""
    return ssl.create_default_context(cafile=str(ca_file))


def client_options(role: str, nkey_file: Path | None = None, ca_file: Path | None = None) -> dict[str, Any]:
    """`nats.connect` options for connecting as `role`: its nkey seed file (the server refuses anonymous
    clients), its own reply-inbox prefix (`subjects.inbox_prefix`: the server lets a role subscribe only
    to its own replies) and, with `ca_file`, TLS verified against that CA."""
    options: dict[str, Any] = {"inbox_prefix": subjects.inbox_prefix(role)}
    if nkey_file is not None:
        options["nkeys_seed"] = str(nkey_file)
    if ca_file is not None:
        options["tls"] = tls_context(ca_file)
    return options


def settings_options(settings: NatsSettings, role: str) -> dict[str, Any]:
    """`client_options` for `role` from a service's settings (``WARLOCK_NATS_NKEY_FILE`` / ``_CA_FILE``)."""
    return client_options(role, settings.nats_nkey_file, settings.nats_ca_file)


def is_permission_error(exc: BaseException) -> bool:
    """Whether `exc` is the server refusing a publish or subscribe this identity may not make."""
    return "permissions violation" in str(exc).lower()


def is_authorization_error(exc: BaseException) -> bool:
    """Whether `exc` is the server refusing this connection's credentials."""
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization violation" in str(exc).lower()


class NatsLink:
    """A service's NATS connection, made without blocking anyone's shutdown.

    `connect` retries until NATS answers or `stop` is set; every failed attempt, disconnect and reconnect
    is one log line (a failure that repeats is logged again every `REPEAT_LOG_S` with its count, so a
    long outage does not flood the log), and `problem` keeps the last reason for health endpoints.
    Once connected, nats-py reconnects by itself forever.

    It connects as `role` (``api``, ``gateway``, ``ssh-worker``; `shared.permissions`): with the role's
    nkey seed file and reply-inbox prefix, and TLS against `ca_file` when given. The server refusing the
    credentials, or a publish / subscribe the role may not make, is one log line saying so, never a
    traceback; a refused publish or subscribe leaves the connection up.
    """

    def __init__(
        self,
        servers: list[str],
        name: str,
        logger: logging.Logger,
        role: str = "api",
        nkey_file: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.nc = NATS()
        self.servers = servers
        self.name = name
        self.log = logger
        self.role = role
        self.nkey_file = nkey_file
        self.options = client_options(role, nkey_file, ca_file)
        self.violations = 0  # publishes / subscriptions the server refused
        self.problem: str | None = "not connected yet"
        self.failures = 0
        self.failed = asyncio.Event()  # set by the first failed attempt (start-up waits for it, or success)
        self._logged: tuple[str, float] | None = None
        self._violations_logged: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: NatsSettings, name: str, logger: logging.Logger, role: str) -> NatsLink:
        """A link for `role` with the servers, nkey file and CA of `settings`."""
        return cls(
            settings.nats_servers(), name, logger, role, settings.nats_nkey_file, settings.nats_ca_file
        )

    @property
    def connected(self) -> bool:
        """Whether the connection is up now."""
        return self.nc.is_connected

    def state(self) -> str:
        """``ok``, or ``unavailable: <why>`` (for health endpoints)."""
        return "ok" if self.nc.is_connected else f"unavailable: {self.problem or 'reconnecting'}"

    async def connect(self, stop: asyncio.Event | None = None) -> bool:
        """Connect, retrying every `RETRY_WAIT_S`, until connected (True) or `stop` is set (False)."""
        attempt = asyncio.ensure_future(
            self.nc.connect(
                servers=self.servers,
                name=self.name,
                connect_timeout=CONNECT_TIMEOUT_S,
                reconnect_time_wait=RETRY_WAIT_S,
                max_reconnect_attempts=-1,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                **self.options,
            )
        )
        waiters: set[asyncio.Future[Any]] = {attempt}
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        if stopped is not None:
            waiters.add(stopped)
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if attempt.cancelled() or attempt.exception() is not None:
            if not attempt.cancelled():
                self.problem = describe(attempt.exception())  # type: ignore[arg-type]
                self.log.error("NATS at %s: %s", ", ".join(self.servers), self.problem)
            await self.nc.close()
            return False
        self.problem = None
        self.log.info("NATS connected to %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")
        return True

    async def close(self, drain_s: float = 5.0) -> None:
        """Drain the connection if it is up (at most `drain_s` seconds), else just close it."""
        if self.nc.is_closed:
            return
        if self.nc.is_connected:
            try:
                async with asyncio.timeout(drain_s):
                    await self.nc.drain()
                return
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                self.log.warning("NATS drain failed (%s); closing", describe(exc))
        try:
            await self.nc.close()
        except Exception as exc:  # nats-py flushes into a transport that may be gone (uvloop: RuntimeError)
            self.log.info("NATS connection closed (%s)", describe(exc))

    async def _on_error(self, exc: Exception) -> None:
        if is_permission_error(exc):
            self._permission_refused(exc)
            return
        self._report("error")
        self.failures += 1
        self.failed.set()
        reason = describe(exc)
        if is_authorization_error(exc):
            where = (
                f"nkey file {self.nkey_file}" if self.nkey_file else "no nkey file (WARLOCK_NATS_NKEY_FILE)"
            )
            reason = f"authorization violation: the server refused role {self.role}'s credentials ({where})"
        self.problem = reason
        now = time.monotonic()
        if self._logged is None or self._logged[0] != reason or now - self._logged[1] >= REPEAT_LOG_S:
            self._logged = (reason, now)
            self.log.warning(
                "NATS at %s: %s (%d failed attempt%s; retrying every %gs)",
                ", ".join(self.servers),
                reason,
                self.failures,
                "" if self.failures == 1 else "s",
                RETRY_WAIT_S,
            )

    def _permission_refused(self, exc: Exception) -> None:
        """One line per refused subject (again at most every `REPEAT_LOG_S`): what role may not do what."""
        self.violations += 1
        what = str(exc).split(":", 1)[-1].strip()[:200]
        now = time.monotonic()
        last = self._violations_logged.get(what)
        if last is None or now - last >= REPEAT_LOG_S:
            if len(self._violations_logged) >= 1000:
                self._violations_logged.clear()
            self._violations_logged[what] = now
            self.log.error("NATS refused role %s: %s (see shared/permissions.py)", self.role, what)

    def _report(self, event: str) -> None:
        """Tell `LINK_HOOKS` about `event` (a hook's failure is logged, never raised into nats-py)."""
        for hook in LINK_HOOKS:
            try:
                hook(self.role, event)
            except Exception as exc:
                self.log.warning("NATS link hook failed: %s", describe(exc))

    async def _on_disconnected(self) -> None:
        self._report("disconnected")
        if self.problem is None:
            self.problem = "disconnected; reconnecting"
        if self.nc.is_reconnecting:
            self.log.warning("NATS disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        self._report("reconnected")
        self.problem, self.failures, self._logged = None, 0, None
        url = self.nc.connected_url
        self.log.info("NATS reconnected to %s", url.netloc if url else "?")
