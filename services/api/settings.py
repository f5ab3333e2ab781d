"""Settings of the API service (environment prefix ``WARLOCK_API_``), built once in the entrypoint."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from services.api.store.runstore import check_database_url
from shared.settings import NatsSettings

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///.warlock/warlock.db"
_GATEWAY_URL = re.compile(r"^wss?://\S+$")  # as shared.protocol.AgentInstallRequest.gateway_urls
MAX_GATEWAY_URLS = 16
MAX_URL_CHARS = 2048


class ApiSettings(NatsSettings):
    """Everything the API needs; ``WARLOCK_NATS_URL`` and ``WARLOCK_LOG_LEVEL`` keep the plain prefix."""

    model_config = SettingsConfigDict(env_prefix="WARLOCK_API_")

    host: str = Field(default="127.0.0.1", description="address the HTTP server binds")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port")
    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        validation_alias=AliasChoices("WARLOCK_API_DATABASE_URL", "WARLOCK_DATABASE_URL"),
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db",
    )
    api_key_file: Path = Field(
        default=Path(".warlock/api-key"), description="where the first start writes the bootstrap API key"
    )
    exec_grace: float = Field(
        default=10.0, gt=0, description="seconds the NATS exec request waits beyond the command timeout"
    )
    max_output_chars: int = Field(
        default=64 * 1024, ge=0, description="characters of stdout and of stderr kept per CommandRun"
    )
    ssh_grace: float = Field(
        default=30.0,
        gt=0,
        description="seconds the SSH exec request waits beyond the command timeout: the worker may queue "
        "for a channel (10 s) and connect (10 s) before the command starts, then adds its own 5 s grace",
    )
    probe_timeout: float = Field(
        default=35.0, gt=0, description="seconds to wait for an SSH probe (up to 3 connects of 10 s each)"
    )
    auth_cache_ttl: float = Field(
        default=5.0, ge=0, description="seconds a verified API key hash is cached (0: look up every request)"
    )
    rate_limit_per_minute: float = Field(
        default=1200.0,
        ge=0,
        description="per API key and API instance: GET requests a minute, sustained (0: no limit)",
    )
    rate_limit_burst: int = Field(
        default=600, ge=1, description="per API key and API instance: GET requests at once before the limit"
    )
    exec_rate_limit_per_minute: float = Field(
        default=600.0,
        ge=0,
        description="per API key and API instance: other requests (exec, jobs, cancel, changes) a minute, "
        "sustained (0: no limit); a job to many hosts is one request",
    )
    exec_rate_limit_burst: int = Field(
        default=300, ge=1, description="per API key and API instance: other requests at once before the limit"
    )
    db_retry_max: float = Field(
        default=30.0, gt=0, description="cap of the backoff between schema initialisation attempts"
    )
    gateway_silence: float = Field(
        default=15.0,
        gt=0,
        description="seconds without a heartbeat after which a gateway's agents are marked disconnected "
        "(gateways send one every 5 s)",
    )
    reconcile_interval: float = Field(
        default=30.0,
        gt=0,
        description="seconds between passes of the reconciler of runs a stopped API left pending",
    )
    reconcile_margin: float = Field(
        default=60.0,
        ge=0,
        description="seconds beyond a run's timeout and the longest grace before a pending run is orphaned",
    )
    reconcile_query_after: float = Field(
        default=20.0,
        gt=0,
        description="seconds after which the reconciler first asks an agent's ledger about a pending run "
        "(once, then again past its deadline); below command_ttl, a run that never reached the agent is "
        "then settled failed (never_ran) for certain",
    )
    reconcile_query_timeout: float = Field(
        default=5.0, gt=0, description="seconds the reconciler waits for an agent's answer to a result query"
    )
    shutdown_timeout: float = Field(
        default=10.0, ge=0, description="seconds in-flight commands may finish at shutdown (then: pending)"
    )
    agent_wheel: Path | None = Field(
        default=None,
        description="a prebuilt agent wheel to install on hosts, or a directory holding this version's "
        "wheel; unset: built from this source tree on first use (pip wheel) into wheel_dir",
    )
    wheel_dir: Path = Field(
        default=Path(".warlock/wheels"),
        description="where the agent wheel is built when agent_wheel is unset",
    )
    gateway_urls: str = Field(
        default="ws://127.0.0.1:8765/agent",
        description="gateway URLs written into installed agents' config, comma-separated",
    )
    install_timeout: float = Field(
        default=300.0, gt=0, description="seconds the SSH worker may take to install the agent on a host"
    )
    agent_op_timeout: float = Field(
        default=120.0,
        gt=0,
        description="seconds the SSH worker may take to uninstall or reconfigure an agent",
    )
    health_timeout: float = Field(
        default=5.0, gt=0, description="seconds a health ping through the gateway may take"
    )
    ssh_health_timeout: float = Field(
        default=20.0, gt=0, description="seconds the SSH reachability check of a health request may take"
    )
    rotate_timeout: float = Field(
        default=10.0, gt=0, description="seconds the live agent may take to store a regenerated token"
    )
    signing_key_file: Path = Field(
        default=Path(".warlock/signing.key"),
        description="the API's Ed25519 command-signing key (PEM, 0600); made at first start if missing. "
        "Every API instance of one deployment uses the same key",
    )
    extra_trusted_keys: list[str] = Field(
        default_factory=list,
        description="more public keys (ed25519:...) installed agents trust besides the signing key's own: "
        "the next or previous key while the signing key is rotated (JSON list)",
    )
    command_ttl: float = Field(
        default=120.0,
        gt=0,
        le=600.0,
        description="seconds a signed command stays valid for delivery (its not-after); at most the "
        "agent ledger's 600 s, so a replay cannot outlive the record of ids that ran",
    )
    agent_ca_file: Path | None = Field(
        default=None,
        description="a PEM CA certificate that installed agents pin for wss:// to the gateways (written "
        "next to their config as ca_file by install and configure); unset: the agents use the system CAs",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="largest request body accepted (bytes); larger → 413 without reading it. 1 MiB holds "
        "the longest command (65,536 characters) even written entirely as JSON \\u escapes",
    )
    metrics_raw_retention: float = Field(
        default=86400.0,
        ge=600,
        description="seconds agents' raw metrics samples are kept; older ones are folded into 5-minute "
        "averages by the retention job",
    )
    metrics_rollup_retention: float = Field(
        default=30 * 86400.0, ge=3600, description="seconds the 5-minute metrics averages are kept"
    )
    metrics_maintenance_interval: float = Field(
        default=300.0,
        gt=0,
        description="seconds between passes of the metrics retention job (one API instance at a time "
        "does it: a PostgreSQL advisory lock)",
    )
    metrics_max_points: int = Field(
        default=2000,
        ge=10,
        le=100_000,
        description="most points GET /api/hosts/{host}/metrics answers (else 422)",
    )
    metrics: bool = Field(
        default=True,
        description="serve GET /metrics (Prometheus text, no API key: counts and latencies only, no host, "
        "command or key in a label); false: 404",
    )
    access_log: bool = Field(
        default=True,
        description="one INFO line per HTTP request on logger services.api.access: method, path (never the "
        "query string), status, duration, API key name (never the key)",
    )
    ws_ticket_ttl: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds a browser stream ticket (POST /api/ws-tickets) stays valid; it works once",
    )
    ws_send_queue_frames: int = Field(
        default=1000,
        ge=1,
        description="frames queued for one browser connection before it is dropped as too slow (4408)",
    )
    ws_send_queue_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="bytes queued for one browser connection before it is dropped as too slow (4408)",
    )
    ws_max_subscriptions: int = Field(
        default=200, ge=1, description="subscriptions one browser connection may hold (more: an error frame)"
    )
    ws_max_frame_bytes: int = Field(
        default=4096, ge=256, description="largest frame a browser may send (larger: closed with 1009)"
    )

    @field_validator("database_url")
    @classmethod
    def _database_url_valid(cls, value: str) -> str:
        check_database_url(value)
        return value

    @field_validator("gateway_urls")
    @classmethod
    def _gateway_urls_valid(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",") if u.strip()]
        if not urls or len(urls) > MAX_GATEWAY_URLS:
            raise ValueError(f"give 1 to {MAX_GATEWAY_URLS} comma-separated ws:// or wss:// URLs")
        for url in urls:
            if not _GATEWAY_URL.fullmatch(url) or len(url) > MAX_URL_CHARS:
                raise ValueError(f"not a ws:// or wss:// URL: {url[:100]!r}")
        return value

    def gateway_url_list(self) -> list[str]:
        """The gateway URLs as a list."""
        return [u.strip() for u in self.gateway_urls.split(",") if u.strip()]
