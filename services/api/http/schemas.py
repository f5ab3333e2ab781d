"""The API's request bodies and response models: hosts, agents, command runs (the ``XPublic`` / ``XCreate``
members of the SQLModel families whose tables are in `services.api.store.models`), and the bodies and
answers of the agent lifecycle endpoints (install, uninstall, health, regenerate-token)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, StrictBool, StringConstraints, computed_field, model_validator
from sqlmodel import Field, SQLModel
from sqlmodel._compat import SQLModelConfig  # the config type SQLModel models declare

from services.api.store.models import (
    AgentConnectionBase,
    AgentStatus,
    CommandRunBase,
    CommandStatus,
    HostBase,
    Via,
)
from shared.ids import HOST_ID_PATTERN
from shared.protocol import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, AgentInstallMode, CommandText, InstallStep

FiniteFloat = Annotated[float, AllowInfNan(False)]  # NaN and ±Infinity (Python's JSON accepts them) → 422

# ----------------------------------------------------------------------------- hosts, agents, runs


class HostCreate(HostBase):
    """Body of ``POST /api/hosts``; unknown fields are refused (422), not ignored."""

    model_config = SQLModelConfig(extra="forbid")

    id: str = Field(schema_extra={"pattern": HOST_ID_PATTERN}, description="host id, [a-z0-9_-]{1,63}")
    # strict booleans: only JSON true / false (422 otherwise). Lax pydantic reads 0, "no" and "false" as
    # False: a mistyped value would silently decide whether the host key gets pinned
    ssh_check: StrictBool = Field(
        default=True, description="probe the host over SSH and pin its host key (trust on first use)"
    )
    install_agent: StrictBool = Field(
        default=False, description="after adding the host, install the agent over SSH (needs ssh_check)"
    )
    install_mode: AgentInstallMode = Field(
        default="auto", description="with install_agent: auto, systemd or direct (no systemd)"
    )

    @model_validator(mode="after")
    def _install_needs_check(self) -> HostCreate:
        if self.install_agent and not self.ssh_check:
            raise ValueError("install_agent needs ssh_check: the install goes over SSH to a pinned host key")
        return self


class HostPublic(HostBase):
    """A host as the API returns it."""

    id: str
    host_key: str | None
    host_key_fingerprint: str | None
    created_at: datetime
    updated_at: datetime


class AgentPublic(AgentConnectionBase):
    """An agent's state as the API returns it."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def connected(self) -> bool:
        """Whether a gateway currently holds a session for the host."""
        return self.status == AgentStatus.CONNECTED


class ExecBody(SQLModel):
    """Body of ``POST /api/hosts/{host}/exec``; unknown fields are refused (422), not ignored."""

    model_config = SQLModelConfig(extra="forbid")

    command: CommandText
    timeout: FiniteFloat = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S, description="seconds")


class CommandRunPublic(CommandRunBase):
    """A command run as the API returns it (also the answer of exec)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def timed_out(self) -> bool:
        """Whether no answer came in time (the command may have run)."""
        return self.status == CommandStatus.TIMED_OUT


# ----------------------------------------------------------------------------- agent lifecycle

PREFIX_PATTERN = r"^/[A-Za-z0-9_./-]*$"  # as shared.protocol.AgentInstallRequest.prefix
GatewayUrl = Annotated[str, StringConstraints(pattern=r"^wss?://\S+$", max_length=2048)]

PREFIX_DESCRIPTION = (
    "root the agent's files live under on the host: '/' in production; a scratch directory lets tests "
    "(or a chroot) install without touching the host's real /etc and /opt"
)
GATEWAY_URLS_DESCRIPTION = "gateway URLs for the agent's config; default: the API's WARLOCK_API_GATEWAY_URLS"


class AgentPrefixBody(SQLModel):
    """Body of ``POST /api/agents/{host}/uninstall``; unknown fields are refused (422)."""

    model_config = SQLModelConfig(extra="forbid")

    prefix: str = Field(
        default="/", max_length=1024, schema_extra={"pattern": PREFIX_PATTERN}, description=PREFIX_DESCRIPTION
    )


class AgentInstallBody(AgentPrefixBody):
    """Body of ``POST /api/agents/{host}/install``."""

    mode: AgentInstallMode = Field(
        default="auto",
        description="systemd: require systemd; direct: start the agent without systemd (containers); "
        "auto: systemd where the host runs it, else answer 409 and change nothing",
    )
    gateway_urls: list[GatewayUrl] | None = Field(
        default=None, min_length=1, max_length=16, description=GATEWAY_URLS_DESCRIPTION
    )


class AgentRegenerateBody(AgentPrefixBody):
    """Body of ``POST /api/agents/{host}/regenerate-token``."""

    gateway_urls: list[GatewayUrl] | None = Field(
        default=None, min_length=1, max_length=16, description=GATEWAY_URLS_DESCRIPTION
    )


class StepPublic(SQLModel):
    """One step the SSH worker took on the host."""

    name: str
    ok: bool
    detail: str = ""


def steps_of(steps: tuple[InstallStep, ...]) -> list[StepPublic]:
    """The worker's steps as the API returns them."""
    return [StepPublic(name=s.name, ok=s.ok, detail=s.detail) for s in steps]


def steps_json(steps: tuple[InstallStep, ...]) -> list[dict[str, Any]]:
    """The worker's steps as plain JSON (for error bodies)."""
    return [s.model_dump() for s in steps_of(steps)]


class AgentInstallPublic(SQLModel):
    """Answer of install: the agent's public key (made on the host, like its token, which nobody sees)."""

    host_id: str
    agent_public_key: str = Field(
        description="the agent's own Ed25519 key (ed25519:...), made on the host; its results are "
        "checked against it"
    )
    state: str
    systemd: bool
    steps: list[StepPublic]


class InstallFailedPublic(SQLModel):
    """Why the install that followed adding a host failed (the host itself was added)."""

    status: int = Field(description="the HTTP status POST /api/agents/{host}/install would have answered")
    detail: str
    code: str | None = None
    steps: list[StepPublic] | None = None
    hint: str | None = None


class HostAddPublic(HostPublic):
    """Answer of ``POST /api/hosts``: the host, and the install result when install_agent was set."""

    install: AgentInstallPublic | InstallFailedPublic | None = None


class AgentUninstallPublic(SQLModel):
    """Answer of uninstall."""

    host_id: str
    state: str | None = Field(description="removed, not_installed (already clean), or null (not asked)")
    steps: list[StepPublic]
    token_revoked: bool
    note: str | None = None


class AgentHealthPublic(SQLModel):
    """Answer of health: a ping through the gateway, else an SSH reachability check."""

    connected: bool
    via: Via | None
    reachable: bool
    latency_ms: float | None = Field(default=None, description="round trip on the API's clock")
    agent_rtt_ms: float | None = Field(
        default=None, description="gateway ⇄ agent leg, on the gateway's clock"
    )
    gateway_id: str | None = None
    error: str | None = None


class TokenRegeneratedPublic(SQLModel):
    """Answer of regenerate-token: how the agent made its new token (nobody sees it) and the stored hash."""

    host_id: str
    delivered: Literal["session", "ssh"] | None = Field(
        description="session: the live agent made a new token (its hash signed by the agent's key); ssh: "
        "made on the host over SSH (configure); null: neither worked and the previous token stays valid"
    )
    token_sha256: str | None = Field(default=None, description="SHA-256 of the new token, as stored")
    agent_public_key: str | None = None
    steps: list[StepPublic] = Field(default_factory=list)
    note: str | None = None


class PullTokenPublic(SQLModel):
    """Answer of ``POST /api/agents/{host}/pull-token``: a token for a host that pulls its install."""

    host_id: str
    token: str = Field(
        description="the agent's token, shown once (only its SHA-256 is stored): paste it on the host "
        "when install.sh asks; the install enrolls the agent's key with it (POST /agent/enroll), once"
    )


class EnrollBody(SQLModel):
    """Body of ``POST /agent/enroll`` (Authorization: Bearer <the agent's token>)."""

    model_config = SQLModelConfig(extra="forbid")

    host_id: str = Field(max_length=63, schema_extra={"pattern": r"^[a-z0-9_-]{1,63}$"})
    public_key: str = Field(
        max_length=60,
        schema_extra={"pattern": r"^ed25519:[A-Za-z0-9_-]{43}$"},
        description="the agent's public key, printed by warlock-agent keygen",
    )


class EnrollPublic(SQLModel):
    """Answer of ``POST /agent/enroll``."""

    host_id: str
    key_id: str


class AgentWheelPublic(SQLModel):
    """Answer of ``GET /api/agent-wheel``: what a pull install needs, from an authenticated source."""

    name: str
    sha256: str
    url: str = Field(description="where to download it (no key needed; check the SHA-256 above)")
    trusted_keys: list[str] = Field(
        description="the API's public signing keys: WARLOCK_TRUSTED_KEYS (comma-separated) of install.sh"
    )
