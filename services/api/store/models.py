"""Database tables, as SQLModel families: ``XBase`` → ``X(table=True)`` here, ``XPublic`` / ``XCreate``
(the API's request and response schemas) in `services.api.http.schemas`.

Datetimes are timezone-aware and stored as UTC on every backend (`UtcDateTime`); enums are stored as
plain strings so a new member never needs a database enum migration.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import StringConstraints
from sqlalchemy import JSON, Dialect, Index, String, Text
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, SQLModel

from shared.protocol import DEFAULT_TIMEOUT_S

SCHEMA_VERSION = 4  # 2: agent public keys, operator keys, requested_by on every run; 3: issue 11; 4: issue 12

ADDRESS_PATTERN = r"^[A-Za-z0-9.:_-]+$"  # as shared.protocol.SshTarget.address
SSH_USER_PATTERN = r"^[a-z_][a-z0-9_.-]*$"  # as shared.protocol.SshTarget.username

LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=63)]
LabelValue = Annotated[str, StringConstraints(max_length=255)]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A datetime stored as UTC and always read back timezone-aware (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes; convert aware ones to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store timezone-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to what SQLite returns naive."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class CommandStatus(StrEnum):
    """Lifecycle of a CommandRun; everything but pending/running is final."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"  # no answer in time: the command may have run; never re-sent
    UNDELIVERABLE = "undeliverable"  # neither an agent session nor an SSH worker answered; nothing ran
    QUEUED = "queued"  # a job's run whose batch has not started: nothing sent yet
    SKIPPED = "skipped"  # a job's run never sent (stop_on_failure, or the job's API stopped): nothing ran
    # a cancel killed it (the host's result says so; output up to then is kept), or a job's run was
    # cancelled before its batch started (nothing ran)
    CANCELLED = "cancelled"


class Via(StrEnum):
    """Which path carried a command."""

    AGENT = "agent"
    SSH = "ssh"


class KeyRole(StrEnum):
    """What an API key may do; each role may do everything of the ones before it."""

    READ = "read"  # GETs
    OPERATE = "operate"  # run commands (exec, jobs, cancel)
    ADMIN = "admin"  # hosts, agents, keys


KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # an API key's name, recorded as requested_by


class AgentStatus(StrEnum):
    """State of a host's agent session, as the reference note's AgentConnection.status."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    ERROR = "error"


# ----------------------------------------------------------------------------- hosts


class HostBase(SQLModel):
    """Fields an operator gives when adding a host."""

    address: str = Field(min_length=1, max_length=253, schema_extra={"pattern": ADDRESS_PATTERN}, unique=True)
    ssh_port: int = Field(default=22, ge=1, le=65535)
    ssh_user: str = Field(
        default="root", min_length=1, max_length=32, schema_extra={"pattern": SSH_USER_PATTERN}
    )
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, sa_type=JSON, max_length=64)


class Host(HostBase, table=True):
    """A managed host."""

    id: str = Field(primary_key=True, max_length=63)
    host_key: str | None = Field(default=None, sa_type=Text)  # pinned OpenSSH public key line
    host_key_fingerprint: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


# ----------------------------------------------------------------------------- agent connections


class AgentConnectionBase(SQLModel):
    """The reference note's AgentConnection record, minus the token (only its hash is stored)."""

    host_id: str = Field(primary_key=True, foreign_key="host.id", ondelete="CASCADE", max_length=63)
    session_id: str | None = Field(default=None, max_length=64)
    gateway_id: str | None = Field(default=None, max_length=63)
    agent_version: str | None = Field(default=None, max_length=64)
    hostname: str | None = Field(default=None, max_length=255)
    platform: str | None = Field(default=None, max_length=255)
    status: AgentStatus = Field(default=AgentStatus.DISCONNECTED, sa_type=String(16))
    # the agent's own Ed25519 key (made on the host at install): its hello and results must verify with it
    public_key: str | None = Field(default=None, max_length=64)
    connected_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_ping: datetime | None = Field(default=None, sa_type=UtcDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


class AgentConnection(AgentConnectionBase, table=True):
    """One row per host that has (had) an agent; `token_hash` is SHA-256 hex, never the token."""

    __tablename__ = "agent_connection"

    token_hash: str | None = Field(default=None, max_length=64, unique=True)


# ----------------------------------------------------------------------------- command runs


class CommandRunBase(SQLModel):
    """A command sent to a host and what became of it."""

    command_id: str = Field(primary_key=True, max_length=64)
    host_id: str = Field(max_length=63)  # no foreign key: history outlives a deleted host
    command: str = Field(sa_type=Text)
    timeout: float = DEFAULT_TIMEOUT_S
    requested_by: str | None = Field(default=None, max_length=255)
    status: CommandStatus = Field(default=CommandStatus.PENDING, sa_type=String(16))
    via: Via | None = Field(default=None, sa_type=String(8))
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = Field(default="", sa_type=Text)
    stderr: str = Field(default="", sa_type=Text)
    truncated: bool = False
    error_code: str | None = Field(default=None, max_length=32)
    error_description: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    duration_ms: float | None = None
    job_id: str | None = Field(default=None, max_length=32, index=True)  # the job it is part of, if any


class CommandRun(CommandRunBase, table=True):
    """Every command the API accepted, written (pending) before anything is sent."""

    __tablename__ = "command_run"
    __table_args__ = (Index("ix_command_run_host_created", "host_id", "created_at"),)


class CommandOutput(SQLModel, table=True):
    """One output chunk of a command, as streamed while it ran (``warlock.output.<host>.<id>``), kept for
    ``GET /api/commands/{id}/stream`` to replay. Not authoritative: the run's stdout/stderr are. Bounded per
    command (`services.api.store.output`) and by age (swept after the retention)."""

    __tablename__ = "command_output"
    __table_args__ = (Index("ix_command_output_created", "created_at"),)

    command_id: str = Field(primary_key=True, max_length=64)  # no foreign key: chunks may come first
    seq: int = Field(primary_key=True)
    stream: str = Field(max_length=8)
    data: str = Field(default="", sa_type=Text)
    size: int = 0  # bytes of `data` in UTF-8: what the per-command cap counts
    truncated: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


# ----------------------------------------------------------------------------- jobs


class JobState(StrEnum):
    """A job: running until every target has a final outcome; cancelled once a cancel was asked (batches
    not yet started are not sent; `Job.finished_at` is set when the last run in flight ended)."""

    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class Job(SQLModel, table=True):
    """One command to many hosts (`services.api.fleet.jobs`); each host's run is a CommandRun with job_id."""

    __tablename__ = "job"

    job_id: str = Field(primary_key=True, max_length=32)
    command: str = Field(sa_type=Text)
    timeout: float = DEFAULT_TIMEOUT_S
    selection: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # the targets as asked
    targets: int = 0  # how many hosts the selection named (one run each)
    batch: str | None = Field(default=None, max_length=16)  # as asked: "10" or "10%"; None: all at once
    batch_size: int = 0  # hosts per batch, resolved
    stop_on_failure: bool = False
    state: JobState = Field(default=JobState.RUNNING, sa_type=String(16))
    requested_by: str | None = Field(default=None, max_length=255)
    api_instance: str | None = Field(default=None, max_length=64)  # the API process running it
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime, index=True)
    heartbeat_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)  # its API is alive
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


# ----------------------------------------------------------------------------- api keys, schema


class ApiKey(SQLModel, table=True):
    """An API key; only the SHA-256 hex of the key is stored."""

    __tablename__ = "api_key"

    id: str = Field(primary_key=True, max_length=32)
    name: str = Field(max_length=255, unique=True)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    role: KeyRole = Field(default=KeyRole.ADMIN, sa_type=String(16))
    # labels a host must all carry for this key to see it or run on it; None: every host
    scope: dict[str, str] | None = Field(default=None, sa_type=JSON)
    expires_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UtcDateTime)  # updated at most once a minute


class OperatorKey(SQLModel, table=True):
    """A public key an operator signs NATS commands with (``warlock req``); the private key stays with them.

    Commands it signs run only while `revoked_at` is None, and are recorded with `name` as requested_by.
    """

    __tablename__ = "operator_key"

    key_id: str = Field(primary_key=True, max_length=16)
    name: str = Field(max_length=255, unique=True)
    public_key: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class WsTicket(SQLModel, table=True):
    """A one-time browser stream ticket (`services.api.store.tickets`): only the SHA-256 hex of the ticket
    is stored, with what its holder may see. Shared by every API instance on the database, so the socket
    may reach another instance than the one that issued the ticket; deleted when used, pruned when expired."""

    __tablename__ = "ws_ticket"

    ticket_hash: str = Field(primary_key=True, max_length=64)
    key_name: str = Field(max_length=255, index=True)  # the outstanding-ticket bound is per key
    role: str = Field(max_length=16)
    scope: dict[str, str] | None = Field(default=None, sa_type=JSON)
    expires_at: datetime = Field(sa_type=UtcDateTime, index=True)


class SchemaVersion(SQLModel, table=True):
    """One row: the schema version this database was created with."""

    __tablename__ = "schema_version"

    id: int = Field(default=1, primary_key=True)
    version: int
    applied_at: datetime = Field(default_factory=utcnow, sa_type=UtcDateTime)


# ----------------------------------------------------------------------------- metrics history


class MetricSample(SQLModel, table=True):
    """One agent metrics sample, kept for `metrics_raw_retention` (then folded into `MetricRollup`).

    ``at`` is Unix seconds (UTC) as a float, not a `UtcDateTime`: the history is bucketed by arithmetic on
    it (``floor(at / step) * step``) the same way on PostgreSQL and SQLite. No foreign key to ``host``: a
    deleted host's samples age out with the rest. Written in batches (`services.api.store.metrics`)."""

    __tablename__ = "metric_sample"
    __table_args__ = (Index("ix_metric_sample_at", "at"),)  # the retention job's range

    host_id: str = Field(primary_key=True, max_length=63)
    at: float = Field(primary_key=True)  # the agent's sample time (its clock; the API's if far off)
    cpu: float  # cpu_percent
    load_1: float
    mem: float  # memory_percent
    swap: float  # swap_percent
    disk: float | None = None  # percent of the fullest mounted filesystem (None: the agent sent none)
    net_rx: float  # bytes received since boot (a counter: the history serves rates)
    net_tx: float  # bytes sent since boot
    rtt_ms: float | None = None  # gateway ⇄ agent round trip of the session's last keepalive (schema 4)


class MetricRollup(SQLModel, table=True):
    """Averages of a host's samples over one bucket (5 minutes: ``at`` is its start, Unix seconds), kept
    for `metrics_rollup_retention`; ``samples`` weighs the bucket when it is averaged again."""

    __tablename__ = "metric_rollup"
    __table_args__ = (Index("ix_metric_rollup_at", "at"),)

    host_id: str = Field(primary_key=True, max_length=63)
    at: float = Field(primary_key=True)
    samples: int
    cpu: float
    load_1: float
    mem: float
    swap: float
    disk: float | None = None
    net_rx: float
    net_tx: float
    rtt_ms: float | None = None  # schema 4


def public(model: type[SQLModel], row: Any) -> Any:
    """Validate a table row into its public model."""
    return model.model_validate(row, from_attributes=True)
