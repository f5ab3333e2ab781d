"""Fallback worker settings: ``WARLOCK_SSH_*`` environment variables (plus the shared ``WARLOCK_NATS_URL``).

The private key stays in this process: `key_file` is a path, read once at start by `load_client_key`;
neither the key nor its path is sent on NATS or written to a log line.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any

import asyncssh
from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from shared import signing
from shared.errors import ConfigError
from shared.ids import HOST_ID_PATTERN
from shared.settings import NatsSettings, env_name

MIB = 1024 * 1024
_INVALID = re.compile(r"[^a-z0-9_-]+")


def default_worker_id(hostname: str | None = None) -> str:
    """Return the hostname lowercased and sanitized to ``[a-z0-9_-]{1,63}`` (``ssh-worker`` if empty)."""
    base = _INVALID.sub("-", (hostname if hostname is not None else socket.gethostname()).lower())
    return base.strip("-")[:63] or "ssh-worker"


class FallbackSettings(NatsSettings):
    """Everything the SSH fallback worker needs, read once from the environment in the entrypoint."""

    model_config = SettingsConfigDict(env_prefix="WARLOCK_SSH_")

    key_file: Path = Field(description="private key the worker authenticates with (never sent or logged)")
    connect_timeout: float = Field(default=10.0, gt=0, description="TCP connect + SSH handshake + auth")
    idle_timeout: float = Field(default=60.0, gt=0, description="a pooled connection unused this long closes")
    max_channels_per_host: int = Field(default=8, ge=1, le=64, description="concurrent commands per host")
    queue_timeout: float = Field(default=10.0, gt=0, description="wait for a free channel, then 'busy'")
    max_output_bytes: int = Field(default=MIB, ge=1024, description="kept per stream; the rest is dropped")
    exec_grace: float = Field(default=5.0, ge=0, description="client-side wait beyond a command's timeout")
    keepalive_interval: float = Field(default=30.0, ge=0, description="SSH keepalive on pooled connections")
    agent_op_timeout: float = Field(
        default=300.0, gt=0, description="agent install / configure / uninstall over SSH (pip runs there)"
    )
    drain_timeout: float = Field(default=30.0, ge=0, description="on SIGTERM, wait this long for commands")
    worker_id: str = Field(default_factory=default_worker_id, pattern=HOST_ID_PATTERN)
    trusted_keys: Annotated[list[str], NoDecode] = Field(
        description="the API's public signing keys (ed25519:...), JSON list or comma-separated: every "
        "request that makes the worker dial or change a host must be signed by one of them"
    )
    max_command_ttl: float = Field(
        default=600.0,
        gt=0,
        le=3600.0,
        description="longest validity a signed request may have; ids are remembered that long (replays)",
    )
    replay_capacity: int = Field(
        default=200_000,
        ge=100,
        description="signed request ids remembered at most; when full and none expired, new ones: busy",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve GET /metrics (Prometheus text) on this port (0: a free one, logged); unset: off",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address the metrics port binds")

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """A JSON list or a comma-separated string of public keys."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError("not a JSON list of ed25519:... keys") from exc
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("trusted_keys")
    @classmethod
    def _keys_valid(cls, value: list[str]) -> list[str]:
        """At least one key, each a parsable Ed25519 public key: a worker that trusts nobody cannot serve."""
        if not value:
            raise ValueError("give at least one API public key (ed25519:...): the worker trusts nobody")
        for key in value:
            try:
                signing.parse_public(key)
            except ValueError as exc:
                raise ValueError(f"not an Ed25519 public key ({exc}): {key[:60]!r}") from exc
        return value

    @field_validator("key_file")
    @classmethod
    def _readable(cls, value: Path) -> Path:
        """The key file must exist and be readable by this process."""
        if not value.is_file():
            raise ValueError("no such file")
        if not os.access(value, os.R_OK):
            raise ValueError("not readable")
        return value


def load_client_key(settings: FallbackSettings) -> asyncssh.SSHKey:
    """Read the worker's private key once; raise ConfigError (without the key's content) if it cannot."""
    field = f"key_file ({env_name(FallbackSettings, 'key_file')})"
    try:
        return asyncssh.read_private_key(settings.key_file)
    except asyncssh.KeyImportError as exc:
        raise ConfigError(
            field, f"not a usable private key (passphrase keys are not supported): {exc}"
        ) from exc
    except OSError as exc:
        raise ConfigError(field, f"cannot read: {exc.strerror or exc}") from exc
