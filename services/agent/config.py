"""Agent settings: a TOML config file (default ``/etc/warlock/agent.conf``) plus environment overrides.

Environment variables (``WARLOCK_AGENT_<FIELD>``, any case; ``WARLOCK_LOG_LEVEL``) beat the file.
The file holds flat keys named like the fields::

    host_id = "web-1"
    token = "<64 hex>"
    gateway_urls = ["wss://gw1.example:8443/agent", "wss://gw2.example:8443/agent"]
    trusted_keys = ["ed25519:..."]          # the API's signing key(s): commands must verify against one
    ca_file = "/etc/warlock/ca.pem"         # the CA the agent pins for wss:// (optional)
    identity_key_file = "/etc/warlock/agent.key"   # the agent's own key (made at first start)

The agent runs on every host, so it reads both sources itself into a plain pydantic model rather than
through pydantic-settings like the other services (whose import alone costs the agent ~3.5 MiB of RSS);
names, precedence and the errors naming a field and its variable are the same.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator

from shared import signing
from shared.errors import ConfigError
from shared.ids import HostIdField
from shared.tokens import is_well_formed

from .ledger import MAX_BYTES as LEDGER_MAX_BYTES
from .ledger import OUTPUT_BYTES as LEDGER_OUTPUT_BYTES
from .results import OUTBOX_MAX_BYTES
from .tokenstore import TokenStore, token_from_env

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = Path("/etc/warlock/agent.conf")
DEFAULT_LEDGER_PATH = Path("/var/lib/warlock-agent/ledger.jsonl")
DEFAULT_IDENTITY_KEY_FILE = Path("/etc/warlock/agent.key")
MIB = 1024 * 1024
ENV_PREFIX = "WARLOCK_AGENT_"
LOG_LEVEL_ENV = "WARLOCK_LOG_LEVEL"  # shared by every service
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]  # as shared.settings.LogLevel


class AgentSettings(BaseModel):
    """Everything the agent needs to run; built once by `load_config` and passed down."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    log_level: LogLevel = "INFO"
    host_id: HostIdField
    token: SecretStr
    insecure: bool = False  # allow ws:// to a non-loopback gateway (declared before gateway_urls: it checks)
    gateway_urls: list[str] = Field(min_length=1)
    trusted_keys: list[str] = Field(min_length=1)
    ca_file: Path | None = None
    identity_key_file: Path = DEFAULT_IDENTITY_KEY_FILE
    metrics_interval: float = Field(default=30.0, gt=0)
    ping_interval: float = Field(default=20.0, gt=0)
    ping_timeout: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    max_output_bytes: int = Field(default=MIB, gt=0)
    max_concurrent_commands: int = Field(default=8, ge=1)
    ledger_path: Path = DEFAULT_LEDGER_PATH
    ledger_output_bytes: int = Field(default=LEDGER_OUTPUT_BYTES, ge=0)
    ledger_max_bytes: int = Field(default=LEDGER_MAX_BYTES, ge=0)
    outbox_max_bytes: int = Field(default=OUTBOX_MAX_BYTES, ge=0)
    outbox_path: Path | None = None  # directory of un-acked results; None: `outbox_dir` (next to the ledger)
    backoff_initial: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    superseded_backoff: float = Field(default=60.0, ge=0)

    @field_validator("token")
    @classmethod
    def _token_shape(cls, value: SecretStr) -> SecretStr:
        """Refuse a token that is not 64 lowercase hex characters (the message never echoes it)."""
        if not is_well_formed(value.get_secret_value()):
            raise ValueError("must be 64 lowercase hex characters")
        return value

    @field_validator("gateway_urls", "trusted_keys", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        """Accept a JSON list or a comma-separated string (as environment variables give them)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [u.strip() for u in text.split(",") if u.strip()]
        return value

    @field_validator("gateway_urls")
    @classmethod
    def _ws_urls(cls, value: list[str], info: ValidationInfo) -> list[str]:
        """Every gateway URL is ws:// or wss:// with a host; ws:// only to loopback unless `insecure`."""
        for url in value:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("ws", "wss") or not rest or rest.startswith("/"):
                raise ValueError(f"not a ws:// or wss:// URL: {url[:200]!r}")
            if scheme == "ws" and not info.data.get("insecure", False) and not is_loopback_url(url):
                raise ValueError(
                    f"{url[:200]!r} is plain ws:// to a host that is not loopback: use wss:// (and ca_file), "
                    "or set insecure = true to accept that anyone on the path can read and change the traffic"
                )
        return value

    @field_validator("trusted_keys")
    @classmethod
    def _public_keys(cls, value: list[str]) -> list[str]:
        """Each trusted key parses as ``ed25519:<base64url>``; the error names the one that does not."""
        for index, text in enumerate(value):
            try:
                signing.parse_public(text)
            except ValueError as exc:
                raise ValueError(
                    f"key {index + 1} ({text[:60]!r}) is not an Ed25519 public key: {exc}"
                ) from None
        return value


def outbox_dir(settings: AgentSettings) -> Path:
    """Where the un-acked results are kept: `outbox_path`, else ``<ledger stem>.outbox`` beside the ledger
    (``/var/lib/warlock-agent/ledger.outbox`` by default; one outbox per ledger)."""
    if settings.outbox_path is not None:
        return settings.outbox_path
    return settings.ledger_path.with_name(f"{settings.ledger_path.stem}.outbox")


def is_loopback_url(url: str) -> bool:
    """Whether `url`'s host is a loopback address (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_context(settings: AgentSettings) -> ssl.SSLContext | None:
    """The TLS context for wss:// gateways: only `ca_file` is trusted when set; None: the system's CAs."""
    if settings.ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(settings.ca_file))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(
            f"ca_file ({env_name('ca_file')})", f"cannot load {settings.ca_file} as a PEM CA: {reason}"
        ) from exc


def read_toml(path: Path) -> dict[str, Any]:
    """Read the config file, warning when others may read the token in it."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "config file %s is readable by group or others (mode %03o); it holds the agent token",
            path,
            stat.S_IMODE(mode),
        )
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path}: invalid TOML: {exc}") from exc


def config_file(path: Path | None) -> Path | None:
    """The config file to read: `path` (which must exist), else the default one if present, else None."""
    if path is not None:
        if not path.is_file():
            raise ConfigError("config", f"no such file: {path}")
        return path
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def env_name(field: str) -> str:
    """The environment variable that sets `field`."""
    return LOG_LEVEL_ENV if field == "log_level" else f"{ENV_PREFIX}{field.upper()}"


def from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The fields set by `environ` (variable names compared without case), as raw strings."""
    names = {env_name(field): field for field in AgentSettings.model_fields}
    return {names[key.upper()]: value for key, value in environ.items() if key.upper() in names}


def settings_error(exc: ValidationError, source: str = "") -> ConfigError:
    """A ConfigError naming the first bad field and its variable (like shared.settings.config_error)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = [str(p) for p in first["loc"]]
    field = ".".join(loc) or "(settings)"
    if loc and loc[0] in AgentSettings.model_fields:
        field = f"{field} ({env_name(loc[0])})"
    where = f" (in {source})" if source else ""
    return ConfigError(field, f"{first['msg']}{where}")


def load_agent_config(path: Path | None = None) -> tuple[AgentSettings, TokenStore]:
    """The agent settings (`load_config`) and where a rotated token must be stored."""
    file = config_file(path)
    values: dict[str, Any] = read_toml(file) if file is not None else {}
    values.update(from_env(os.environ))
    try:
        settings = AgentSettings(**values)
    except ValidationError as exc:
        raise settings_error(exc, str(file or "")) from exc
    return settings, TokenStore(config_path=file, from_env=token_from_env(os.environ))


def load_config(path: Path | None = None) -> AgentSettings:
    """Build the agent settings from `path` (default /etc/warlock/agent.conf, optional) and the environment.

    An explicitly given path that does not exist, a TOML syntax error or a bad value raises ConfigError.
    """
    return load_agent_config(path)[0]
