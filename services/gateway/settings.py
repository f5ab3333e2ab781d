"""Gateway settings: ``WARLOCK_GATEWAY_*`` environment variables (plus the shared ``WARLOCK_NATS_URL``)."""

from __future__ import annotations

import re
import secrets
import socket
import ssl
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from shared.errors import ConfigError
from shared.ids import HOST_ID_PATTERN
from shared.limits import AGENT_AFTER_TIMEOUT_S, DEFAULT_EXEC_GRACE_S, MIN_EXEC_GRACE_S
from shared.settings import NatsSettings

MIB = 1024 * 1024
_INVALID = re.compile(r"[^a-z0-9_-]+")


def default_gateway_id(hostname: str | None = None) -> str:
    """Return ``<hostname>-<6 hex>``, lowercased and sanitized to ``[a-z0-9_-]{1,63}``."""
    base = _INVALID.sub("-", (hostname if hostname is not None else socket.gethostname()).lower())
    base = base.strip("-")[:56] or "gateway"
    return f"{base}-{secrets.token_hex(3)}"


class GatewaySettings(NatsSettings):
    """Everything a gateway process needs, read once from the environment in the entrypoint."""

    model_config = SettingsConfigDict(env_prefix="WARLOCK_GATEWAY_")

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535, description="0 picks a free port")
    backlog: int = Field(
        default=1024,
        ge=1,
        le=65535,
        description="accept queue of the listening socket (asyncio's default, 100, drops SYNs in a connect "
        "storm); the kernel caps it at net.core.somaxconn",
    )
    gateway_id: str = Field(default_factory=default_gateway_id, pattern=HOST_ID_PATTERN)
    max_frame_bytes: int = Field(default=4 * MIB, ge=4096)
    max_in_flight: int = Field(default=32, ge=1, description="concurrent requests per agent")
    ping_interval: float = Field(default=20.0, gt=0)
    ping_timeout: float = Field(default=10.0, gt=0)
    auth_timeout: float = Field(default=10.0, gt=0, description="the hello frame must arrive within this")
    verify_timeout: float = Field(default=2.0, gt=0, description="token authority request timeout")
    token_cache_ttl: float = Field(default=30.0, ge=0)
    token_cache_size: int = Field(default=10_000, ge=0)
    exec_grace: float = Field(
        default=DEFAULT_EXEC_GRACE_S,
        description="seconds beyond a command's timeout; covers the agent's reap wait and report",
    )
    agent_ping_timeout: float = Field(default=5.0, gt=0, description="health ping round trip")
    rotate_timeout: float = Field(default=5.0, gt=0, description="token rotation round trip")
    drain_timeout: float = Field(default=10.0, ge=0)
    close_timeout: float = Field(default=5.0, gt=0, description="WebSocket closing handshake")
    send_timeout: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="a frame the agent does not take within this closes its session (4004): an agent that "
        "stops reading cannot hold a request, a drain or a shutdown",
    )
    heartbeat_interval: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="seconds between heartbeats on warlock.gateway.<id>.heartbeat: APIs mark the agents of a "
        "gateway they have not heard for their silence bound disconnected",
    )
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate chain: serve wss://")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")
    metrics: bool = Field(
        default=True,
        description="answer GET /metrics (Prometheus text, no token: no host, session or token in it) on "
        "the agent port; false: 404",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewaySettings:
        """A certificate without its key (or the reverse) is a configuration error, not plain ws://."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = (
                "WARLOCK_GATEWAY_TLS_KEY_FILE"
                if self.tls_key_file is None
                else "WARLOCK_GATEWAY_TLS_CERT_FILE"
            )
            raise ValueError(
                "WARLOCK_GATEWAY_TLS_CERT_FILE and WARLOCK_GATEWAY_TLS_KEY_FILE go together "
                f"(set both for wss://, neither for ws://); {missing} is not set"
            )
        return self

    @field_validator("exec_grace")
    @classmethod
    def _grace_covers_the_agent(cls, value: float) -> float:
        """Refuse a grace the agent's answer after a timeout may outlast (the caller would hear `timeout`)."""
        if value < MIN_EXEC_GRACE_S:
            raise ValueError(
                f"must be at least {MIN_EXEC_GRACE_S:g}s: an agent may answer up to "
                f"{AGENT_AFTER_TIMEOUT_S:g}s after a command's timeout (it waits for the killed command's "
                "pipes to close), and a shorter grace would answer `timeout` while its result is on the way"
            )
        return value


def somaxconn(path: Path = Path("/proc/sys/net/core/somaxconn")) -> int | None:
    """The kernel's cap on a listening socket's accept backlog (Linux), or None when unknown."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def tls_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    """The server TLS context (TLS 1.2+) from the certificate and key files; None: plain ws://.

    Raises ConfigError naming the setting when the files cannot be loaded.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(
            "tls_cert_file (WARLOCK_GATEWAY_TLS_CERT_FILE)",
            f"cannot load {settings.tls_cert_file} with key {settings.tls_key_file}: {reason}",
        ) from exc
    return context
