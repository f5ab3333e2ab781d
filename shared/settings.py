"""Settings base: environment variables with the ``WARLOCK_`` prefix, read once by pydantic-settings.

Each service defines one subclass with its own sub-prefix (``WARLOCK_GATEWAY_``, ``WARLOCK_AGENT_`` ...),
builds it once in its entrypoint and passes it down; nothing reads settings at import time.
Fields every NATS-connected service shares (``WARLOCK_NATS_URL``, ``WARLOCK_LOG_LEVEL``) keep the plain
prefix whatever the subclass's sub-prefix is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]
S = TypeVar("S", bound=BaseSettings)


class WarlockSettings(BaseSettings):
    """Base of every service's settings."""

    model_config = SettingsConfigDict(
        env_prefix="WARLOCK_", extra="forbid", populate_by_name=True, validate_default=True
    )

    log_level: LogLevel = Field(default="INFO", validation_alias=AliasChoices("WARLOCK_LOG_LEVEL"))
    log_format: LogFormat = Field(
        default="text",
        validation_alias=AliasChoices("WARLOCK_LOG_FORMAT"),
        description="text, or json: one JSON object per line (time, level, logger, message, exception)",
    )


class NatsSettings(WarlockSettings):
    """Base of the settings of every service that connects to NATS."""

    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        validation_alias=AliasChoices("WARLOCK_NATS_URL"),
        description="NATS server URL(s), comma-separated",
    )

    nats_nkey_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("WARLOCK_NATS_NKEY_FILE"),
        description="the nkey seed file (0600) of this service's NATS role; the server refuses anonymous "
        "clients",
    )
    nats_ca_file: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("WARLOCK_NATS_CA_FILE"),
        description="PEM CA certificate(s): connect to NATS over TLS, verifying the server with it",
    )

    @field_validator("nats_nkey_file")
    @classmethod
    def _nkey_file_usable(cls, value: Path | None) -> Path | None:
        if value is not None:
            from shared.natsauth import read_seed

            read_seed(value)  # NkeyFileError (a ValueError) names what is wrong, never the content
        return value

    @field_validator("nats_ca_file")
    @classmethod
    def _ca_file_readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                text = value.read_text(errors="replace")
            except OSError as exc:
                raise ValueError(f"{value}: {exc.strerror or exc}") from exc
            if "-----BEGIN CERTIFICATE-----" not in text:
                raise ValueError(f"{value}: no PEM certificate in it")
        return value

    def nats_servers(self) -> list[str]:
        """The NATS server URLs as a list."""
        return split_servers(self.nats_url)


def env_name(cls: type[BaseSettings], field: str) -> str:
    """The environment variable that sets `field` of `cls`: of several names, the one that is set."""
    info = cls.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        names = [str(c) for c in info.validation_alias.choices]
        environ = {k.upper() for k in os.environ}
        return next((n for n in names if n.upper() in environ), names[-1])
    return f"{cls.model_config.get('env_prefix', '')}{field}".upper()


def _field_of(cls: type[BaseSettings], loc: str) -> str | None:
    """The field that `loc` (a field name or one of its variable names) belongs to."""
    if loc in cls.model_fields:
        return loc
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and loc in [str(c) for c in alias.choices]:
            return name
    return None


def config_error(exc: ValidationError, cls: type[BaseSettings], source: str = "") -> ConfigError:
    """Turn a pydantic ValidationError into a ConfigError naming the first bad field and its variable."""
    first = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(p) for p in first["loc"]) or "(settings)"
    top = _field_of(cls, str(first["loc"][0])) if first["loc"] else None
    if top is not None:
        field = ".".join([top, *(str(p) for p in first["loc"][1:])])
        field = f"{field} ({env_name(cls, top)})"
    where = f" (in {source})" if source else ""
    return ConfigError(field, f"{first['msg']}{where}")


def load_settings(cls: type[S], source: str = "", **values: Any) -> S:
    """Build `cls` from the environment (plus `values`), raising ConfigError naming the bad field."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise config_error(exc, cls, source) from exc


def split_servers(urls: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` as a list of URLs (a client tries them all)."""
    return [u.strip() for u in urls.split(",") if u.strip()]
