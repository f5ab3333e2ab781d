"""The agent lifecycle: install, uninstall, health, token regeneration and pull tokens, over NATS.

    install     signed warlock.ssh.<host>.install ─▶ running: the host made the agent's key and token;
                the reply's public key and token hash are stored, the previous token revoked
                                                   └─▶ no_systemd / error: nothing stored, nothing revoked
    uninstall   signed warlock.ssh.<host>.uninstall ─▶ record deleted ─▶ TokenRevoked(old hash)
    health      warlock.agent.<host>.ping ─▶ pong (via agent) │ no responders ─▶ signed SSH `true` (via ssh)
    regenerate  signed warlock.agent.<host>.rotate ─▶ rotate_ok signed by the agent's own key ─▶ its new
                hash stored, TokenRevoked(old hash)
                └─▶ else: signed warlock.ssh.<host>.configure (new token made on the host) ─▶ hash stored
    pull token  a one-time token for a host that pulls its install (shown once); enrollment reopened

No token travels on NATS: every agent token is made on its host (install, configure, rotation) and only
its SHA-256 comes back, checked by the agent's signature or carried over the pinned SSH channel. The only
token the API makes is the pull token, which goes API → operator over HTTP. Every request that changes a
host is signed (`ApiSigner`); the SSH worker and the agent verify it before acting.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from services.api.errors import (
    Conflict,
    DependencyUnavailable,
    DomainError,
    NotFound,
    RemoteFailed,
    RemoteTimeout,
    SshCheckFailed,
    WorkerUnavailable,
)
from services.api.fleet.agent_health import check_health
from services.api.fleet.runner import ssh_target
from services.api.fleet.signer import ApiSigner
from services.api.fleet.wheel import WheelSource
from services.api.http.schemas import (
    AgentHealthPublic,
    AgentInstallBody,
    AgentInstallPublic,
    AgentPrefixBody,
    AgentRegenerateBody,
    AgentUninstallPublic,
    PullTokenPublic,
    TokenRegeneratedPublic,
    steps_json,
    steps_of,
)
from services.api.settings import ApiSettings
from services.api.store import crud
from services.api.store.hostlock import HostLocks
from services.api.store.models import AgentConnection, AgentStatus, Host, utcnow
from shared import signing, subjects
from shared.errors import ErrorCode, ProtocolError
from shared.ids import new_command_id
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
from shared.tokens import fingerprint, generate_token, hash_token

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
        signer: ApiSigner,
    ) -> None:
        self.nc = nc
        self.sessions = sessions
        self.settings = settings
        self.wheels = wheels
        self.signer = signer
        self.rotations_refused = 0  # rotate_ok replies whose agent signature did not verify
        self.locks = HostLocks(sessions)  # one operation per host at a time, across API instances

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
        return await check_health(self.nc, self.sessions, self.settings, self.signer, host)

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

    async def _store_credentials(self, host_id: str, token_hash: str, public_key: str | None) -> str | None:
        """Store the host's token hash (and the agent's public key, when known); return the hash replaced."""
        async with self.sessions() as session:
            if await session.get(Host, host_id) is None:
                raise NotFound(f"host {host_id} was deleted meanwhile")
            agent = await session.get(AgentConnection, host_id)
            if agent is None:
                agent = AgentConnection(host_id=host_id, status=AgentStatus.DISCONNECTED)
            previous = agent.token_hash
            agent.token_hash = token_hash
            if public_key is not None:
                agent.public_key = public_key
            agent.updated_at = utcnow()
            session.add(agent)
            await session.commit()
        return previous

    async def _agent_record(self, host_id: str) -> AgentConnection | None:
        async with self.sessions() as session:
            return await session.get(AgentConnection, host_id)

    def _ca_pem(self) -> str | None:
        """The CA agents pin (WARLOCK_API_AGENT_CA_FILE), read at each use; None when unset."""
        path: Path | None = self.settings.agent_ca_file
        if path is None:
            return None
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DependencyUnavailable(
                f"WARLOCK_API_AGENT_CA_FILE {path} unreadable: {type(exc).__name__}"
            ) from exc
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise DependencyUnavailable(f"WARLOCK_API_AGENT_CA_FILE {path} is not a PEM certificate")
        return text

    def _gateway_urls(self, urls: list[str] | None) -> tuple[str, ...]:
        return tuple(urls) if urls else tuple(self.settings.gateway_url_list())

    # ------------------------------------------------------------------------- install / uninstall

    async def install(self, host: Host, body: AgentInstallBody) -> AgentInstallPublic:
        """Issue a token, have the SSH worker install (or upgrade) the agent; the token is returned once."""
        async with self.locks.hold(host.id):
            return await self._install(host, body)

    async def _install(self, host: Host, body: AgentInstallBody) -> AgentInstallPublic:
        if not host.host_key:
            raise Conflict(NO_KEY, code="no_host_key")
        wheel = await self.wheels.get()
        request = AgentInstallRequest(
            command_id=new_command_id(),
            target=ssh_target(host),
            host_id=host.id,
            gateway_urls=self._gateway_urls(body.gateway_urls),
            trusted_keys=self.signer.trusted_keys,
            ca_pem=self._ca_pem(),
            wheel_name=wheel.name,
            wheel_b64=base64.b64encode(wheel.data).decode(),
            wheel_sha256=wheel.sha256,
            prefix=body.prefix,
            mode=body.mode,
        )
        log.info(
            "installing the agent on %s (mode %s, prefix %s, %s)", host.id, body.mode, body.prefix, wheel.name
        )
        signed = self.signer.sign("install", request, host.id)
        result = await self._agent_op(host.id, "install", signed, self.settings.install_timeout)
        if result.state == "no_systemd":
            raise Conflict(
                f"{host.id} does not run systemd: nothing was installed; {DIRECT_HINT}",
                code="no_systemd",
                extra={"steps": steps_json(result.steps), "hint": DIRECT_HINT},
            )
        if result.state not in ("running", "stopped"):
            raise RemoteFailed(
                f"the install ended in state {result.state!r}",
                code=ErrorCode.INTERNAL,
                extra={"steps": steps_json(result.steps)},
            )
        if result.token_sha256 is None or result.agent_public_key is None:
            raise RemoteFailed(
                "the install did not report the agent's public key and token hash (an agent without "
                "`warlock-agent keygen`?); nothing was stored",
                code=ErrorCode.INTERNAL,
                extra={"steps": steps_json(result.steps)},
            )
        previous = await self._store_credentials(host.id, result.token_sha256, result.agent_public_key)
        if previous is not None and previous != result.token_sha256:
            await self.revoke(host.id, previous)
        log.info(
            "agent installed on %s: %s (systemd %s), key %s, token %s",
            host.id,
            result.state,
            result.systemd,
            signing.key_id(result.agent_public_key),
            fingerprint(result.token_sha256),
        )
        return AgentInstallPublic(
            host_id=host.id,
            agent_public_key=result.agent_public_key,
            state=result.state,
            systemd=result.systemd,
            steps=steps_of(result.steps),
        )

    async def uninstall(self, host: Host, body: AgentPrefixBody) -> AgentUninstallPublic:
        """Remove the agent over SSH (a clean host is fine), then delete its record and revoke its token."""
        async with self.locks.hold(host.id):
            return await self._uninstall(host, body)

    async def _uninstall(self, host: Host, body: AgentPrefixBody) -> AgentUninstallPublic:
        state: str | None = None
        steps: tuple[InstallStep, ...] = ()
        note: str | None = None
        if host.host_key:
            request = AgentUninstallRequest(
                command_id=new_command_id(), target=ssh_target(host), prefix=body.prefix
            )
            signed = self.signer.sign("uninstall", request, host.id)
            result = await self._agent_op(host.id, "uninstall", signed, self.settings.agent_op_timeout)
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

    async def _rotate(self, host_id: str, public_key: str | None) -> tuple[str | None, str | None]:
        """Ask the live agent to make itself a new token: (its hash, verified), or (None, why not)."""
        if public_key is None:
            return None, "the agent's public key is not known (install or enroll it first)"
        command_id = new_command_id()
        request = self.signer.sign("rotate", RotateRequest(command_id=command_id), host_id)
        wait = self.settings.rotate_timeout
        try:
            msg = await self.nc.request(subjects.agent_rotate(host_id), encode(request), timeout=wait)
        except nats.errors.NoRespondersError:
            return None, "the agent is not connected"
        except nats.errors.TimeoutError:
            return None, f"the agent did not confirm a new token within {wait:g}s"
        except nats.errors.Error as exc:
            return None, f"NATS unavailable: {type(exc).__name__}"
        try:
            reply = decode_rotate_reply(msg.data)
        except ProtocolError as exc:
            return None, f"bad rotate reply: {exc.message}"
        if not isinstance(reply, RotateOk):
            return None, f"the agent refused to rotate its token ({reply.code}: {reply.description})"
        values = signing.rotated_values(host_id, command_id, reply.token_sha256)
        try:
            verified = reply.host_id == host_id and signing.verify_values(
                signing.parse_public(public_key), signing.ROTATED_DOMAIN, values, reply.signature
            )
        except ValueError:
            verified = False
        if not verified:
            self.rotations_refused += 1
            log.warning(
                "rotate_ok for %s does not carry the agent's signature: its token hash is not stored", host_id
            )
            return None, "the rotation's answer was not signed by the agent's key (not stored)"
        return reply.token_sha256, None

    async def regenerate(self, host: Host, body: AgentRegenerateBody) -> TokenRegeneratedPublic:
        """The agent makes itself a new token (live: over its session; else over SSH); the API stores the
        verified hash and revokes the old token. Nobody ever sees the new token."""
        async with self.locks.hold(host.id):
            return await self._regenerate(host, body)

    async def _regenerate(self, host: Host, body: AgentRegenerateBody) -> TokenRegeneratedPublic:
        agent = await self._agent_record(host.id)
        previous = agent.token_hash if agent is not None else None
        public_key = agent.public_key if agent is not None else None
        new_hash, why = await self._rotate(host.id, public_key)
        if new_hash is not None:
            await self._store_credentials(host.id, new_hash, None)
            if previous is not None and previous != new_hash:
                await self.revoke(host.id, previous)
            log.info("%s made itself a new token over its session (%s)", host.id, fingerprint(new_hash))
            return TokenRegeneratedPublic(
                host_id=host.id, token_sha256=new_hash, agent_public_key=public_key, delivered="session"
            )
        unchanged = "the previous token stays valid"
        if not host.host_key:
            note = f"{why}; {NO_KEY.split(':')[0]}, so no new token was made over SSH: {unchanged}"
            return TokenRegeneratedPublic(host_id=host.id, delivered=None, note=note)
        request = AgentConfigureRequest(
            command_id=new_command_id(),
            target=ssh_target(host),
            host_id=host.id,
            gateway_urls=self._gateway_urls(body.gateway_urls),
            trusted_keys=self.signer.trusted_keys,
            ca_pem=self._ca_pem(),
            prefix=body.prefix,
        )
        signed = self.signer.sign("configure", request, host.id)
        try:
            result = await self._agent_op(host.id, "configure", signed, self.settings.agent_op_timeout)
        except DomainError as exc:
            note = f"{why}; configuring over SSH failed ({exc.detail}): {unchanged}"
            log.warning("no new token for %s: %s", host.id, note)
            return TokenRegeneratedPublic(host_id=host.id, delivered=None, note=note)
        steps = steps_of(result.steps)
        if result.state not in ("running", "stopped") or result.token_sha256 is None:
            note = f"{why}; the config was not rewritten over SSH (state {result.state}): {unchanged}"
            return TokenRegeneratedPublic(host_id=host.id, delivered=None, steps=steps, note=note)
        await self._store_credentials(host.id, result.token_sha256, result.agent_public_key)
        if previous is not None and previous != result.token_sha256:
            await self.revoke(host.id, previous)
        log.info("%s got a new token over SSH (%s): %s", host.id, why, fingerprint(result.token_sha256))
        return TokenRegeneratedPublic(
            host_id=host.id,
            token_sha256=result.token_sha256,
            agent_public_key=result.agent_public_key or public_key,
            delivered="ssh",
            steps=steps,
            note=why,
        )

    # ------------------------------------------------------------------------- pull install

    async def pull_token(self, host: Host) -> PullTokenPublic:
        """A new token for a host that pulls its install (shown once, to the operator over HTTP): the old
        token stops verifying (its sessions close), and the host may enroll one public key with it."""
        async with self.locks.hold(host.id):
            token = generate_token()
            async with self.sessions() as session:
                agent = await session.get(AgentConnection, host.id)
                if agent is None:
                    agent = AgentConnection(host_id=host.id, status=AgentStatus.DISCONNECTED)
                previous = agent.token_hash
                agent.token_hash = hash_token(token)
                agent.public_key = None  # enrollment open: the pulled install registers its new key
                agent.updated_at = utcnow()
                session.add(agent)
                await session.commit()
            if previous is not None:
                await self.revoke(host.id, previous)
        log.info("pull token issued for %s (%s); enrollment open", host.id, fingerprint(hash_token(token)))
        return PullTokenPublic(host_id=host.id, token=token)
