"""The wire protocol, defined once: agent⇄gateway frames and every NATS payload.

Every message is a frozen pydantic model with a ``type`` tag and a protocol version ``v``; extra fields
are refused. Each channel has one discriminated union and one module-level TypeAdapter, and is read
with a ``decode_*`` function that raises `ProtocolError` carrying the WebSocket close code to use:
1007 for bytes that are not JSON, 1008 for an unknown type, a wrong version or a bad field.

Channels:
- agent → gateway (WebSocket): hello, result, exec_error, metrics, ping, pong, output
- gateway → agent (WebSocket): welcome, exec, ack, ping, pong, output_on
- NATS ``warlock.agent.<host>.exec`` / ``warlock.ssh.<host>.exec``: ExecRequest → result | error
- NATS ``warlock.agent.<host>.ping``: PingRequest → pong_reply | error
- NATS ``warlock.auth.verify``: TokenVerifyRequest → token_ok | error
- NATS ``warlock.presence.<host>``: connected | disconnected
- NATS ``warlock.metrics.<host>``: metrics_event;  ``warlock.result.<host>``: result
- NATS ``warlock.session.<host>.claim``: claim
- NATS ``warlock.agent.<host>.cancel``: CancelRequest → cancel_answer | error (also the gateway → agent
  frame; the agent answers cancel_answer)
- NATS ``warlock.ssh.<host>.cancel``: SshCancelRequest → cancel_answer | error
- NATS ``warlock.output.<host>.<command_id>``: output (chunks while a command runs; not authoritative)
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.errors import CloseCode, ErrorCode, ProtocolError
from shared.ids import CommandIdField, GatewayIdField, HostIdField, SessionIdField

PROTOCOL_VERSION: Literal[1] = 1
MAX_COMMAND_CHARS = 64 * 1024
MAX_TIMEOUT_S = 24 * 3600.0
DEFAULT_TIMEOUT_S = 30.0
MAX_CHUNK_BYTES = 16 * 1024  # an output chunk's data, in bytes before decoding (so also in characters)

ShortText = Annotated[str, Field(max_length=255)]
SshAddress = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")]
SshUser = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z_][a-z0-9_.-]*$")]
GatewayUrl = Annotated[str, Field(pattern=r"^wss?://\S+$", max_length=2048)]
InstallPrefix = Annotated[str, Field(pattern=r"^/[A-Za-z0-9_./-]*$", max_length=1024)]  # "/" in production


def _no_nul(command: str) -> str:
    if "\x00" in command:
        raise ValueError("command contains a NUL character (\\u0000), which no command line can hold")
    return command


# every command field (NATS requests, exec frames, the REST body): a NUL is refused before anything runs
CommandText = Annotated[str, Field(min_length=1, max_length=MAX_COMMAND_CHARS), AfterValidator(_no_nul)]


class Message(BaseModel):
    """Base of every frame and payload: frozen, no extra fields, versioned.

    Validators and serializers are built on first use (`defer_build`), not at import: a process builds
    only the messages it handles (the agent, on every host, about a third of them).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)
    v: Literal[1] = PROTOCOL_VERSION


# ----------------------------------------------------------------------------- shared bodies

KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
Signature64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{86}$")]  # an Ed25519 signature, base64url
PublicKeyText = Annotated[str, Field(pattern=r"^ed25519:[A-Za-z0-9_-]{43}$")]
TrustedKeyList = tuple[PublicKeyText, ...]


class CommandSignature(Message):
    """The API's (or an operator's) signature over a command: `shared.signing.command_bytes`.

    It covers the command's kind and every field of its message, `host_id`, the signer's `key_id` and the
    validity window; the host verifies it against keys pinned at install before running anything.
    """

    host_id: HostIdField
    key_id: KeyId
    issued_at: float
    not_after: float
    sig: Signature64


class ExecResult(Message):
    """A command's outcome; sent agent → gateway and as the NATS exec reply."""

    type: Literal["result"] = "result"
    command_id: CommandIdField
    exit_code: int | None  # None when killed by a signal
    signal: int | None = None  # the signal that ended it, if any
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False  # output was cut at the cap
    timed_out: bool = False  # the timeout killed the process group
    duration_ms: float = Field(ge=0)
    via: Literal["agent", "ssh"] = "agent"
    signature: Signature64 | None = None  # the agent's, over `shared.signing.result_bytes`
    cancelled: bool = False  # a signed cancel killed the process group (covered by the signature when set)


class ErrorReply(Message):
    """A typed error in place of a result: NATS replies and agent exec errors."""

    type: Literal["error"] = "error"
    code: ErrorCode
    description: Annotated[str, Field(max_length=4096)]
    command_id: CommandIdField | None = None


class DiskUsage(Message):
    """Usage of one mounted filesystem."""

    mount: ShortText
    total: int
    used: int
    free: int
    percent: float


class MetricsSample(Message):
    """One psutil sample of a host, stamped with the agent's clock (Unix seconds)."""

    timestamp: float
    cpu_percent: float
    load_1: float
    load_5: float
    load_15: float
    memory_total: int
    memory_available: int
    memory_used: int
    memory_percent: float
    swap_total: int
    swap_used: int
    swap_percent: float
    disks: tuple[DiskUsage, ...] = ()
    net_bytes_sent: int
    net_bytes_recv: int
    net_packets_sent: int
    net_packets_recv: int
    uptime_s: float
    process_count: int


# ----------------------------------------------------------------------------- agent → gateway


OutputStreamName = Literal["stdout", "stderr"]


class OutputChunk(Message):
    """Agent → gateway while a command runs, and the payload on ``warlock.output.<host>.<command_id>``.

    `seq` counts the chunks of one command from 1 without gaps (a chunk that could not be sent does not use
    a number). Not authoritative: the final, signed result is (a gateway can forge or drop chunks; it cannot
    change the recorded result). `truncated`: streaming stopped here (the per-command budget was spent);
    the result still carries the output up to its own cap.
    """

    type: Literal["output"] = "output"
    command_id: CommandIdField
    seq: int = Field(ge=1)
    stream: OutputStreamName
    data: Annotated[str, Field(max_length=MAX_CHUNK_BYTES)] = ""
    truncated: bool = False


class Hello(Message):
    """First frame of a session: who the agent is."""

    type: Literal["hello"] = "hello"
    host_id: HostIdField
    hostname: ShortText
    platform: ShortText
    agent_version: Annotated[str, Field(max_length=64)]
    capabilities: tuple[Annotated[str, Field(max_length=64)], ...] = Field(default=(), max_length=32)
    signed_at: float | None = None  # the agent's clock when it signed this hello
    signature: Signature64 | None = None  # the agent's, over `shared.signing.hello_values`


class ExecError(Message):
    """The agent could not run a command (busy, spawn failure, result lost before a restart)."""

    type: Literal["exec_error"] = "exec_error"
    command_id: CommandIdField
    code: ErrorCode
    description: Annotated[str, Field(max_length=4096)]


class Metrics(Message):
    """A metrics sample pushed by the agent."""

    type: Literal["metrics"] = "metrics"
    sample: MetricsSample


class Ping(Message):
    """Keepalive or health probe; the peer answers with a Pong carrying the same id."""

    type: Literal["ping"] = "ping"
    id: Annotated[str, Field(max_length=64)] | None = None


class Pong(Message):
    """Answer to a Ping."""

    type: Literal["pong"] = "pong"
    id: Annotated[str, Field(max_length=64)] | None = None


# ----------------------------------------------------------------------------- gateway → agent


class Welcome(Message):
    """Sent after a valid hello: the session's id and the limits the agent must keep."""

    type: Literal["welcome"] = "welcome"
    session_id: SessionIdField
    gateway_id: GatewayIdField
    ping_interval: float = Field(gt=0)
    max_result_bytes: int = Field(gt=1024)  # an encoded result frame must fit in this


class Exec(Message):
    """Run a command."""

    type: Literal["exec"] = "exec"
    command_id: CommandIdField
    command: CommandText
    timeout: float = Field(gt=0, le=MAX_TIMEOUT_S)
    signature: CommandSignature | None = None  # passed through from the ExecRequest, verified by the agent


class OutputOn(Message):
    """Gateway → agent, once after the welcome, only to an agent whose hello announces ``output_stream``:
    this gateway takes `OutputChunk` frames (an agent never sends them to a gateway that did not say so)."""

    type: Literal["output_on"] = "output_on"
    max_chunk_bytes: int = Field(gt=0, le=MAX_CHUNK_BYTES)


class Ack(Message):
    """The gateway received the result of `command_id`; the agent may stop re-sending it."""

    type: Literal["ack"] = "ack"
    command_id: CommandIdField


Sha256Field = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class RotateToken(Message):
    """Gateway → agent: make yourself a new token, store it, answer TokenRotated with its hash.

    The token is made on the host and never travels; `signature` (kind ``rotate``, fields
    ``{"command_id": rotation_id}``) is the API's, passed through from the RotateRequest.
    """

    type: Literal["rotate_token"] = "rotate_token"
    rotation_id: CommandIdField
    signature: CommandSignature | None = None


class TokenRotated(Message):
    """Agent → gateway: whether the new token was stored (ok=False: e.g. the token is set by environment)."""

    type: Literal["token_rotated"] = "token_rotated"
    rotation_id: CommandIdField
    ok: bool
    description: Annotated[str, Field(max_length=1024)] = ""
    token_sha256: Sha256Field | None = None  # of the new token (ok=True)
    signature: Signature64 | None = None  # the agent's, over `shared.signing.rotated_values`


class ResultQuery(Message):
    """What became of `command_id`? The NATS request on ``warlock.agent.<host>.result`` and, unchanged, the
    gateway → agent frame. Read-only: the agent answers from its ledger and never runs anything.

    `exec_not_after` is the not-after of the exec that carried the id (the API signs an exec with issued_at =
    its run's created_at, so the reconciler knows it). `signature` is the API's, kind ``result_query``, over
    ``{command_id, query_id, exec_not_after}``: only the API may ask; the answer is bound to `query_id`.
    """

    type: Literal["result_query"] = "result_query"
    query_id: CommandIdField
    command_id: CommandIdField
    exec_not_after: float
    signature: CommandSignature | None = None


ResultState = Literal["done", "running", "never_ran", "unknown", "refused"]


class ResultAnswer(Message):
    """Agent → gateway, and the NATS reply to a ResultQuery: what the agent's ledger says of `command_id`.

    - ``done``: it ran here; `result` is its recorded result (signed by the agent), or `error` its recorded
      typed error (``unknown_result``: it started before a restart and its result was lost; it may have run).
    - ``running``: it is running (or waiting for a slot) now.
    - ``never_ran``: it never ran here and, from this answer on, never will: the id is now recorded as used
      until the exec's not-after, and the ledger still holds every id whose envelope is that recent.
    - ``unknown``: not in the ledger, but past its not-after: it may have run and been forgotten.
    - ``refused``: the query did not verify (`description` says why); nothing was looked up.

    `signature` is the agent's over `shared.signing.answer_values` (every answer but ``refused``).
    """

    type: Literal["result_answer"] = "result_answer"
    query_id: CommandIdField
    command_id: CommandIdField
    state: ResultState
    result: ExecResult | None = None
    error: ExecError | None = None
    description: Annotated[str, Field(max_length=1024)] = ""
    signature: Signature64 | None = None


class CancelRequest(Message):
    """Cancel a running command: the NATS request on ``warlock.agent.<host>.cancel`` and, unchanged, the
    gateway → agent frame. `signature` is the API's, kind ``cancel``, over ``{command_id}``; the agent
    verifies it (trusted key, this host, not expired) before it kills anything. Idempotent: a repeated
    cancel of the same id kills nothing more, so no replay memory is needed. The signature covers
    `exec_not_after` too: a cancel of an id the agent has not seen makes the id unusable until then."""

    type: Literal["cancel"] = "cancel"
    command_id: CommandIdField
    exec_not_after: float | None = None  # the not-after of the exec that carries the id (as ResultQuery's)
    signature: CommandSignature | None = None


CancelState = Literal["accepted", "finished", "not_running", "never_ran", "refused"]


class CancelAnswer(Message):
    """Agent → gateway (and, but for ``refused``, the NATS reply), and the SSH worker's reply: what a cancel
    found.

    - ``accepted``: the command is running (or waiting for a slot) here; its process group is killed now and
      its result (signed by the agent) says ``cancelled: true``: that result settles the run.
    - ``finished``: it already ended here; its result stands, nothing was killed.
    - ``never_ran``: the id never reached this agent and, from this answer on, never runs here (the ledger
      refuses it until `exec_not_after`, as after a ResultQuery's ``never_ran``).
    - ``not_running``: this host does not know the id (it never arrived, or was forgotten; without
      `exec_not_after`, or past it); nothing killed.
    - ``refused``: the cancel did not verify; `code` says why (the gateway answers a typed ErrorReply).
    """

    type: Literal["cancel_answer"] = "cancel_answer"
    command_id: CommandIdField
    state: CancelState
    code: ErrorCode | None = None
    description: Annotated[str, Field(max_length=1024)] = ""


class SshCancelRequest(Message):
    """Request on ``warlock.ssh.<host>.cancel``: kill what runs on `target` under `command_id`.

    Signed by the API, kind ``ssh_cancel``, over ``{command_id, target}``: the worker dials only the signed
    target. Answered with a CancelAnswer (or a typed error).
    """

    type: Literal["ssh_cancel"] = "ssh_cancel"
    command_id: CommandIdField
    target: SshTarget
    signature: CommandSignature | None = None


AgentFrame = Annotated[
    Hello
    | ExecResult
    | ExecError
    | Metrics
    | Ping
    | Pong
    | TokenRotated
    | ResultAnswer
    | CancelAnswer
    | OutputChunk,
    Field(discriminator="type"),
]
GatewayFrame = Annotated[
    Welcome | Exec | Ack | Ping | Pong | RotateToken | ResultQuery | CancelRequest | OutputOn,
    Field(discriminator="type"),
]

# ----------------------------------------------------------------------------- NATS payloads


class ExecRequest(Message):
    """Request on an exec subject. ``{"command": "uptime"}`` is a complete request."""

    type: Literal["exec"] = "exec"
    command: CommandText
    timeout: float = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S)
    command_id: CommandIdField | None = None
    signature: CommandSignature | None = None  # kind "exec" (agent) / "ssh_exec" / "ops_exec"


class PingRequest(Message):
    """Request on ``warlock.agent.<host>.ping``; an empty body is a valid request."""

    type: Literal["ping"] = "ping"


class PingReply(Message):
    """Answer to a health ping, after a round trip to the agent itself."""

    type: Literal["pong_reply"] = "pong_reply"
    host_id: HostIdField
    session_id: SessionIdField
    gateway_id: GatewayIdField
    agent_version: str
    agent_rtt_ms: float  # gateway ⇄ agent leg, on the gateway's clock


class TokenVerifyRequest(Message):
    """Gateway → token authority: which host does this token hash belong to?"""

    type: Literal["token_verify"] = "token_verify"
    token_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class TokenOk(Message):
    """Token authority → gateway: the token is valid for `host_id`.

    `public_key`: the agent's own key, when the API knows it; the gateway then admits only a hello signed
    with it, so a stolen token without the key made on the host opens no session.
    """

    type: Literal["token_ok"] = "token_ok"
    host_id: HostIdField
    public_key: PublicKeyText | None = None


class PresenceConnected(Message):
    """Published when a gateway registers a session for a host."""

    type: Literal["connected"] = "connected"
    host_id: HostIdField
    session_id: SessionIdField
    gateway_id: GatewayIdField
    hostname: ShortText
    platform: ShortText
    agent_version: str
    at: float
    signed_at: float | None = None  # the hello's, passed through: the API checks the agent's signature
    signature: Signature64 | None = None


class PresenceDisconnected(Message):
    """Published when a gateway ends a session for a host."""

    type: Literal["disconnected"] = "disconnected"
    host_id: HostIdField
    session_id: SessionIdField
    gateway_id: GatewayIdField
    reason: ShortText
    close_code: int | None = None
    at: float


class MetricsEvent(Message):
    """A host's metrics sample, as published on ``warlock.metrics.<host>``."""

    type: Literal["metrics_event"] = "metrics_event"
    host_id: HostIdField
    gateway_id: GatewayIdField
    sample: MetricsSample
    # the gateway ⇄ agent round trip of the session's last keepalive ping (gateway's clock), if measured
    agent_rtt_ms: Annotated[float, Field(ge=0, le=60_000)] | None = None


class GatewayHeartbeat(Message):
    """Published by every gateway every `interval` seconds on ``warlock.gateway.<id>.heartbeat``: it is alive
    and its sessions stand. An API that hears nothing from a gateway for its silence bound marks that
    gateway's agents disconnected (a SIGKILLed gateway publishes no disconnect)."""

    type: Literal["gateway_heartbeat"] = "gateway_heartbeat"
    gateway_id: GatewayIdField
    sessions: int = Field(ge=0)
    interval: float = Field(gt=0, le=3600)
    at: float


class SessionClaim(Message):
    """A gateway announces a new session; any older session for the host closes with 4000."""

    type: Literal["claim"] = "claim"
    host_id: HostIdField
    session_id: SessionIdField
    gateway_id: GatewayIdField
    connected_at: float


class SshTarget(Message):
    """Where and how to reach a host over SSH; `host_key` is the pinned OpenSSH public key line."""

    type: Literal["ssh_target"] = "ssh_target"
    address: SshAddress
    port: int = Field(default=22, ge=1, le=65535)
    username: SshUser
    host_key: Annotated[str, Field(max_length=16384)] | None = None


class SshExecRequest(ExecRequest):
    """Request on ``warlock.ssh.<host>.exec``: an ExecRequest, optionally with the target.

    The API always sends `target`; without it the worker asks ``warlock.host.<host>.target``.
    """

    target: SshTarget | None = None


class SshProbeRequest(Message):
    """Request on ``warlock.ssh.probe``: is this host reachable with the worker's key, and what is its key?"""

    type: Literal["ssh_probe"] = "ssh_probe"
    host_id: HostIdField  # the id the host is being added as (the signature is for it)
    address: SshAddress
    port: int = Field(default=22, ge=1, le=65535)
    username: SshUser
    signature: CommandSignature | None = None  # kind "probe"


class SshProbeOk(Message):
    """The host answered and accepted the worker's key; its host key, to pin (trust on first use)."""

    type: Literal["ssh_probe_ok"] = "ssh_probe_ok"
    host_key: Annotated[str, Field(max_length=16384)]
    fingerprint: str  # SHA256:... as ssh-keygen -l prints it


class RotateRequest(Message):
    """Request on ``warlock.agent.<host>.rotate``: the live agent makes itself a new token.

    Signed by the API (kind ``rotate``, fields ``{"command_id"}``); no token travels.
    """

    type: Literal["rotate"] = "rotate"
    command_id: CommandIdField
    signature: CommandSignature | None = None


class RotateOk(Message):
    """The agent stored its new token; it will use it on its next connection. The hash is signed by it."""

    type: Literal["rotate_ok"] = "rotate_ok"
    host_id: HostIdField
    token_sha256: Sha256Field
    signature: Signature64  # the agent's, over `shared.signing.rotated_values`


class TokenRevoked(Message):
    """Published on ``warlock.auth.revoked``: sessions of `host_id` opened with this token hash close (4003)
    and gateways drop it from their caches. `token_sha256` None: every session of the host closes."""

    type: Literal["token_revoked"] = "token_revoked"
    host_id: HostIdField
    token_sha256: Sha256Field | None = None


AgentInstallMode = Literal["auto", "systemd", "direct"]


class AgentInstallRequest(Message):
    """Request on ``warlock.ssh.<host>.install``: install or upgrade the agent over SSH.

    The wheel travels base64-encoded and is checked against `wheel_sha256` on the host before anything
    is changed there. `prefix` is the root the files go under ("/" in production; a scratch directory in
    tests). `mode`: "systemd" requires systemd; "direct" starts the agent without it (containers);
    "auto" uses systemd when the host runs it, else reports that it does not and installs nothing.
    """

    type: Literal["agent_install"] = "agent_install"
    command_id: CommandIdField
    target: SshTarget
    host_id: HostIdField
    gateway_urls: tuple[GatewayUrl, ...] = Field(min_length=1, max_length=16)
    trusted_keys: TrustedKeyList = Field(min_length=1, max_length=8)  # the API's signing keys
    ca_pem: Annotated[str, Field(max_length=65536)] | None = None  # CA the agent pins for wss://
    wheel_name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.+-]+\.whl$", max_length=255)]
    wheel_b64: str  # not signed itself: `wheel_sha256` is, and the host checks it
    wheel_sha256: Sha256Field
    prefix: InstallPrefix = "/"
    mode: AgentInstallMode = "auto"
    signature: CommandSignature | None = None  # kind "install", every field but wheel_b64


class AgentUninstallRequest(Message):
    """Request on ``warlock.ssh.<host>.uninstall``: stop and remove the agent (a clean host is fine)."""

    type: Literal["agent_uninstall"] = "agent_uninstall"
    command_id: CommandIdField
    target: SshTarget
    prefix: InstallPrefix = "/"
    signature: CommandSignature | None = None  # kind "uninstall"


class AgentConfigureRequest(Message):
    """Request on ``warlock.ssh.<host>.configure``: rewrite the agent's config (new token) and restart it."""

    type: Literal["agent_configure"] = "agent_configure"
    command_id: CommandIdField
    target: SshTarget
    host_id: HostIdField
    gateway_urls: tuple[GatewayUrl, ...] = Field(min_length=1, max_length=16)
    trusted_keys: TrustedKeyList = Field(min_length=1, max_length=8)
    ca_pem: Annotated[str, Field(max_length=65536)] | None = None
    prefix: InstallPrefix = "/"
    signature: CommandSignature | None = None  # kind "configure"


class InstallStep(Message):
    """One step of an install/uninstall/configure run, as reported back to the operator."""

    name: Annotated[str, Field(max_length=64)]
    ok: bool
    detail: Annotated[str, Field(max_length=4096)] = ""


class AgentOpResult(Message):
    """Answer to install/uninstall/configure: the steps taken and the final state on the host.

    state: "running" (service or process started), "stopped", "removed", "not_installed",
    "no_systemd" (mode auto on a host without systemd: nothing changed; retry with mode "direct").
    """

    type: Literal["agent_op_result"] = "agent_op_result"
    steps: tuple[InstallStep, ...]
    state: Literal["running", "stopped", "removed", "not_installed", "no_systemd"]
    systemd: bool
    agent_public_key: PublicKeyText | None = None  # made on the host by install (read back by configure)
    token_sha256: Sha256Field | None = None  # of the token install / configure made on the host


ExecReply = Annotated[ExecResult | ErrorReply, Field(discriminator="type")]
PingReplyMsg = Annotated[PingReply | ErrorReply, Field(discriminator="type")]
TokenReply = Annotated[TokenOk | ErrorReply, Field(discriminator="type")]
PresenceEvent = Annotated[PresenceConnected | PresenceDisconnected, Field(discriminator="type")]

RotateReply = Annotated[RotateOk | ErrorReply, Field(discriminator="type")]
AgentOpReply = Annotated[AgentOpResult | ErrorReply, Field(discriminator="type")]
ProbeReply = Annotated[SshProbeOk | ErrorReply, Field(discriminator="type")]
ResultReply = Annotated[ResultAnswer | ErrorReply, Field(discriminator="type")]
CancelReply = Annotated[CancelAnswer | ErrorReply, Field(discriminator="type")]

_LAZY = ConfigDict(defer_build=True)  # built on first decode, like the models
_agent_frames: TypeAdapter[AgentFrame] = TypeAdapter(AgentFrame, config=_LAZY)
_gateway_frames: TypeAdapter[GatewayFrame] = TypeAdapter(GatewayFrame, config=_LAZY)
_exec_replies: TypeAdapter[ExecReply] = TypeAdapter(ExecReply, config=_LAZY)
_ping_replies: TypeAdapter[PingReplyMsg] = TypeAdapter(PingReplyMsg, config=_LAZY)
_token_replies: TypeAdapter[TokenReply] = TypeAdapter(TokenReply, config=_LAZY)
_presence_events: TypeAdapter[PresenceEvent] = TypeAdapter(PresenceEvent, config=_LAZY)
_probe_replies: TypeAdapter[ProbeReply] = TypeAdapter(ProbeReply, config=_LAZY)
_rotate_replies: TypeAdapter[RotateReply] = TypeAdapter(RotateReply, config=_LAZY)
_agent_op_replies: TypeAdapter[AgentOpReply] = TypeAdapter(AgentOpReply, config=_LAZY)
_result_replies: TypeAdapter[ResultReply] = TypeAdapter(ResultReply, config=_LAZY)
_cancel_replies: TypeAdapter[CancelReply] = TypeAdapter(CancelReply, config=_LAZY)

T = TypeVar("T")
M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    """Serialise a message to compact JSON bytes."""
    return message.model_dump_json().encode()


def _describe(exc: ValidationError) -> str:
    """One line naming the first failing field, safe to log and send (no input values)."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    return f"{where}: {first['msg']}"[:300]


def _close_code(exc: ValidationError) -> CloseCode:
    """1007 when the bytes were not JSON, 1008 for everything else."""
    kinds = {e["type"] for e in exc.errors(include_url=False, include_input=False)}
    return CloseCode.INVALID_DATA if kinds & {"json_invalid", "json_type"} else CloseCode.POLICY_VIOLATION


def _decode(adapter: TypeAdapter[T], data: bytes | str) -> T:
    try:
        return adapter.validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(_close_code(exc), _describe(exc)) from exc


def decode_model(model: type[M], data: bytes | str) -> M:
    """Decode `data` as exactly `model`; an empty body decodes as the model's defaults."""
    if not data or (isinstance(data, bytes) and not data.strip()):
        data = b"{}"
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise ProtocolError(_close_code(exc), _describe(exc)) from exc


def decode_agent_frame(data: bytes | str) -> AgentFrame:
    """Decode a frame sent by an agent."""
    return _decode(_agent_frames, data)


def decode_gateway_frame(data: bytes | str) -> GatewayFrame:
    """Decode a frame sent by a gateway."""
    return _decode(_gateway_frames, data)


def decode_exec_reply(data: bytes | str) -> ExecReply:
    """Decode the reply to an exec request."""
    return _decode(_exec_replies, data)


def decode_ping_reply(data: bytes | str) -> PingReplyMsg:
    """Decode the reply to a ping request."""
    return _decode(_ping_replies, data)


def decode_token_reply(data: bytes | str) -> TokenReply:
    """Decode the token authority's reply."""
    return _decode(_token_replies, data)


def decode_presence(data: bytes | str) -> PresenceEvent:
    """Decode a presence event."""
    return _decode(_presence_events, data)


def decode_probe_reply(data: bytes | str) -> ProbeReply:
    """Decode the SSH worker's answer to a probe."""
    return _decode(_probe_replies, data)


def decode_rotate_reply(data: bytes | str) -> RotateReply:
    """Decode the gateway's answer to a token rotation."""
    return _decode(_rotate_replies, data)


def decode_agent_op_reply(data: bytes | str) -> AgentOpReply:
    """Decode the SSH worker's answer to install / uninstall / configure."""
    return _decode(_agent_op_replies, data)


def decode_result_reply(data: bytes | str) -> ResultReply:
    """Decode the answer to a result query (the agent's ResultAnswer, or the gateway's typed error)."""
    return _decode(_result_replies, data)


def decode_cancel_reply(data: bytes | str) -> CancelReply:
    """Decode the answer to a cancel (the agent's or SSH worker's CancelAnswer, or a typed error)."""
    return _decode(_cancel_replies, data)
