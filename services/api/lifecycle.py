"""The agent lifecycle: install, uninstall, health and token regeneration, over NATS.

    install     token issued (hash stored) ─▶ warlock.ssh.<host>.install ─▶ running: old token revoked
                                                                        └─▶ no_systemd / error: new token
                                                                            revoked, previous hash restored
    uninstall   warlock.ssh.<host>.uninstall ─▶ record deleted ─▶ TokenRevoked(old hash)
    health      warlock.agent.<host>.ping ─▶ pong (via agent) │ no responders ─▶ SSH `true` (via ssh)
    regenerate  new hash stored ─▶ warlock.agent.<host>.rotate ─▶ rotate_ok ─▶ TokenRevoked(old hash)
                                                              └─▶ else: TokenRevoked(old hash), then
                                                                  warlock.ssh.<host>.configure

The new token is valid before the old one is revoked, so an agent that got it over its session reconnects
on it at once (gateways close the old session with 4003 when they see the revocation). Tokens never reach
a log line: the request models hide them in their repr and nothing here formats one.
"""

from __future__ import annotations

import asyncio
import base64
import logging

import nats.errors
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api import crud
from services.api.agent_health import check_health
from services.api.agent_models import (
    AgentHealthPublic,
    AgentInstallBody,
    AgentInstallPublic,
    AgentPrefixBody,
    AgentRegenerateBody,
    AgentUninstallPublic,
    TokenRegeneratedPublic,
    steps_json,
    steps_of,
)
from services.api.errors import (
    ApiError,
    Conflict,
    RemoteFailed,
    RemoteTimeout,
    SshCheckFailed,
    WorkerUnavailable,
)
from services.api.models import Host
from services.api.runner import ssh_target
from services.api.settings import ApiSettings
from services.api.wheel import WheelSource
from shared import subjects
from shared.errors import ErrorCode, ProtocolError
from shared.protocol import (
    AgentConfigureRequest,
    AgentInstallRequest,
    AgentOpResult,
    AgentUninstallRequest,
    ErrorReply,
    InstallStep,
    Message,
    RotateOk,
    RotateRequest,
    TokenRevoked,
    decode_agent_op_reply,
    decode_rotate_reply,
    encode,
)
from shared.tokens import fingerprint, hash_token

log = logging.getLogger(__name__)

# Typed errors meaning the worker could not reach or log in to the host (the operator fixes the host): 422.
SSH_REFUSED = frozenset({ErrorCode.CONNECT_FAILED, ErrorCode.AUTH_FAILED, ErrorCode.HOST_KEY_MISMATCH})
NO_KEY = "the host has no pinned SSH host key: add the host with ssh_check first"
DIRECT_HINT = 'retry with {"mode": "direct"} to start the agent without systemd'


class AgentLifecycle:
    """Installs, removes, checks and re-keys agents; one per app."""

    def __init__(
        self,
        nc: NATS,
        sessions: async_sessionmaker[AsyncSession],
        settings: ApiSettings,
        wheels: WheelSource,
    ) -> None:
        self.nc = nc
        self.sessions = sessions
        self.settings = settings
        self.wheels = wheels
        self._locks: dict[str, asyncio.Lock] = {}  # one lifecycle operation per host at a time (per API)

    def _lock(self, host_id: str) -> asyncio.Lock:
        return self._locks.setdefault(host_id, asyncio.Lock())

    # ------------------------------------------------------------------------- plumbing

    async def _agent_op(self, host_id: str, op: str, request: Message, wait: float) -> AgentOpResult:
        """One request to the SSH worker; its typed errors become 422 / 502, no worker 503, silence 504."""
        try:
            msg = await self.nc.request(subjects.ssh_agent_op(host_id, op), encode(request), timeout=wait)
        except nats.errors.NoRespondersError as exc:
            raise WorkerUnavailable(f"no SSH worker is running: cannot {op} the agent") from exc
        except nats.errors.TimeoutError as exc:
            raise RemoteTimeout(
                f"the SSH worker did not finish {op} within {wait:g}s; it may still be running on the host",
                code=ErrorCode.TIMEOUT,
            ) from exc
        except nats.errors.MaxPayloadError as exc:
            raise RemoteFailed(
                f"the {op} request is larger than the NATS server's max_payload (the agent wheel is sent "
                "inside it): raise max_payload",
                code=ErrorCode.BAD_REQUEST,
            ) from exc
        except nats.errors.Error as exc:
            raise WorkerUnavailable(f"NATS unavailable: {type(exc).__name__}") from exc
        try:
            reply = decode_agent_op_reply(msg.data)
        except ProtocolError as exc:
            raise RemoteFailed(
                f"the SSH worker sent a bad reply: {exc.message}", code=ErrorCode.INTERNAL
            ) from exc
        if isinstance(reply, ErrorReply):
            kind = SshCheckFailed if reply.code in SSH_REFUSED else RemoteFailed
            raise kind(f"agent {op} failed ({reply.code}): {reply.description}", code=str(reply.code))
        return reply

    async def health(self, host: Host) -> AgentHealthPublic:
        """Ping the agent through its gateway; without a session, check SSH reachability instead."""
        return await check_health(self.nc, self.sessions, self.settings, host)

    async def revoke(self, host_id: str, token_hash: str | None) -> bool:
        """Publish the revocation of `token_hash` (None: every token of the host): gateways close the
        sessions opened with it (4003) and forget it. False when it could not be published."""
        which = "every token" if token_hash is None else f"token {fingerprint(token_hash)}"
        try:
            await self.nc.publish(
                subjects.TOKEN_REVOKED, encode(TokenRevoked(host_id=host_id, token_sha256=token_hash))
            )
            await self.nc.flush(timeout=5)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("revocation of %s of %s not published: %s", which, host_id, exc)
            return False
        log.info("%s of %s revoked", which, host_id)
        return True

    async def _undo_token(self, host_id: str, new_hash: str, previous: str | None) -> None:
        """Make a token that was never handed out invalid again, restoring the host's previous one."""
        async with self.sessions() as session:
            await crud.restore_agent_token(session, host_id, new_hash, previous)
        await self.revoke(host_id, new_hash)

    def _gateway_urls(self, urls: list[str] | None) -> tuple[str, ...]:
        return tuple(urls) if urls else tuple(self.settings.gateway_url_list())

    # ------------------------------------------------------------------------- install / uninstall

    async def install(self, host: Host, body: AgentInstallBody) -> AgentInstallPublic:
        """Issue a token, have the SSH worker install (or upgrade) the agent; the token is returned once."""
        async with self._lock(host.id):
            return await self._install(host, body)

    async def _install(self, host: Host, body: AgentInstallBody) -> AgentInstallPublic:
        if not host.host_key:
            raise Conflict(NO_KEY, code="no_host_key")
        wheel = await self.wheels.get()
        async with self.sessions() as session:
            token, previous = await crud.replace_agent_token(session, host.id)
        new_hash = hash_token(token)
        request = AgentInstallRequest(
            target=ssh_target(host),
            host_id=host.id,
            token=token,
            gateway_urls=self._gateway_urls(body.gateway_urls),
            wheel_name=wheel.name,
            wheel_b64=base64.b64encode(wheel.data).decode(),
            wheel_sha256=wheel.sha256,
            prefix=body.prefix,
            mode=body.mode,
        )
        log.info(
            "installing the agent on %s (mode %s, prefix %s, %s)", host.id, body.mode, body.prefix, wheel.name
        )
        try:
            result = await self._agent_op(host.id, "install", request, self.settings.install_timeout)
        except RemoteTimeout:
            raise  # the install may have finished: the host may hold the new token, so it stays valid
        except ApiError:
            await self._undo_token(host.id, new_hash, previous)
            raise
        if result.state == "no_systemd":
            await self._undo_token(host.id, new_hash, previous)
            raise Conflict(
                f"{host.id} does not run systemd: nothing was installed; {DIRECT_HINT}",
                code="no_systemd",
                extra={"steps": steps_json(result.steps), "hint": DIRECT_HINT},
            )
        if result.state not in ("running", "stopped"):
            await self._undo_token(host.id, new_hash, previous)
            raise RemoteFailed(
                f"the install ended in state {result.state!r}",
                code=ErrorCode.INTERNAL,
                extra={"steps": steps_json(result.steps)},
            )
        if previous is not None and previous != new_hash:
            await self.revoke(host.id, previous)
        log.info("agent installed on %s: %s (systemd %s)", host.id, result.state, result.systemd)
        return AgentInstallPublic(
            host_id=host.id,
            token=token,
            state=result.state,
            systemd=result.systemd,
            steps=steps_of(result.steps),
        )

    async def uninstall(self, host: Host, body: AgentPrefixBody) -> AgentUninstallPublic:
        """Remove the agent over SSH (a clean host is fine), then delete its record and revoke its token."""
        async with self._lock(host.id):
            return await self._uninstall(host, body)

    async def _uninstall(self, host: Host, body: AgentPrefixBody) -> AgentUninstallPublic:
        state: str | None = None
        steps: tuple[InstallStep, ...] = ()
        note: str | None = None
        if host.host_key:
            request = AgentUninstallRequest(target=ssh_target(host), prefix=body.prefix)
            result = await self._agent_op(host.id, "uninstall", request, self.settings.agent_op_timeout)
            state, steps = result.state, result.steps
            if state == "not_installed":
                note = "the host was already clean"
        else:
            note = f"{NO_KEY}; the agent's files were not removed (see the README to remove them by hand)"
        async with self.sessions() as session:
            _, token_hash = await crud.delete_agent(session, host.id)
        revoked = token_hash is not None and await self.revoke(host.id, token_hash)
        log.info("agent of %s uninstalled (%s)", host.id, state or "files not touched")
        return AgentUninstallPublic(
            host_id=host.id, state=state, steps=steps_of(steps), token_revoked=revoked, note=note
        )

    # ------------------------------------------------------------------------- token regeneration

    async def _rotate(self, host_id: str, token: str) -> str | None:
        """Hand `token` to the live agent; None when it stored it, else why not."""
        wait = self.settings.rotate_timeout
        try:
            msg = await self.nc.request(
                subjects.agent_rotate(host_id), encode(RotateRequest(token=token)), timeout=wait
            )
        except nats.errors.NoRespondersError:
            return "the agent is not connected"
        except nats.errors.TimeoutError:
            return f"the agent did not confirm the new token within {wait:g}s"
        except nats.errors.Error as exc:
            return f"NATS unavailable: {type(exc).__name__}"
        try:
            reply = decode_rotate_reply(msg.data)
        except ProtocolError as exc:
            return f"bad rotate reply: {exc.message}"
        if isinstance(reply, RotateOk):
            return None
        return f"the agent refused the new token ({reply.code}: {reply.description})"

    async def regenerate(self, host: Host, body: AgentRegenerateBody) -> TokenRegeneratedPublic:
        """New token (valid at once), old one revoked; delivered over the session, else over SSH."""
        async with self._lock(host.id):
            return await self._regenerate(host, body)

    async def _regenerate(self, host: Host, body: AgentRegenerateBody) -> TokenRegeneratedPublic:
        async with self.sessions() as session:
            token, previous = await crud.replace_agent_token(session, host.id)
        why = await self._rotate(host.id, token)
        if previous is not None:
            await self.revoke(host.id, previous)
        if why is None:
            log.info("new token of %s delivered over its session", host.id)
            return TokenRegeneratedPublic(host_id=host.id, token=token, delivered="session")
        manual = "write the token into the agent's config by hand and restart it"
        if not host.host_key:
            note = f"{why}; {NO_KEY.split(':')[0]}, so its config was not rewritten: {manual}"
            return TokenRegeneratedPublic(host_id=host.id, token=token, delivered=None, note=note)
        request = AgentConfigureRequest(
            target=ssh_target(host),
            host_id=host.id,
            token=token,
            gateway_urls=self._gateway_urls(body.gateway_urls),
            prefix=body.prefix,
        )
        try:
            result = await self._agent_op(host.id, "configure", request, self.settings.agent_op_timeout)
        except ApiError as exc:
            note = f"{why}; rewriting the config over SSH failed ({exc.detail}): {manual}"
            log.warning("new token of %s not delivered: %s", host.id, note)
            return TokenRegeneratedPublic(host_id=host.id, token=token, delivered=None, note=note)
        steps = steps_of(result.steps)
        if result.state not in ("running", "stopped"):
            note = f"{why}; the config was not rewritten over SSH (state {result.state}): {manual}"
            return TokenRegeneratedPublic(
                host_id=host.id, token=token, delivered=None, steps=steps, note=note
            )
        log.info("new token of %s written over SSH (%s)", host.id, why)
        return TokenRegeneratedPublic(host_id=host.id, token=token, delivered="ssh", steps=steps, note=why)
