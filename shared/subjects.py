"""Every NATS subject and queue-group name Warlock uses, built in one place.

Scheme: ``warlock.<kind>.<host>.<verb>``, host ids ``[a-z0-9_-]{1,63}``. No service writes a subject
f-string of its own; it calls a function here, which validates the host id first.

| subject                          | kind             | who answers / listens              |
| -------------------------------- | ---------------- | ---------------------------------- |
| warlock.agent.<host>.exec        | request          | the gateway holding <host>         |
| warlock.agent.<host>.ping        | request          | the gateway holding <host>         |
| warlock.ssh.<host>.exec          | request          | the SSH fallback worker            |
| warlock.metrics.<host>           | publish          | agents' metrics samples            |
| warlock.presence.<host>          | publish          | connect / disconnect events        |
| warlock.result.<host>            | publish          | results that arrived after their request ended |
| warlock.session.<host>.claim     | publish          | gateways: newest session wins      |
| warlock.auth.verify              | request          | the token authority                |
| warlock.gateway.<id>.sessions   | request (micro)  | a gateway: the hosts it holds      |
| warlock.ssh.<worker>.status     | request (micro)  | an SSH worker: pool counters       |
| warlock.agent.<host>.rotate      | request          | the gateway holding <host>: new token |
| warlock.agent.<host>.result      | request          | the gateway holding <host>: ledger lookup |
| warlock.auth.revoked             | publish          | gateways: close sessions of a revoked token (4003) |
| warlock.ssh.<host>.install       | request          | SSH worker: install / upgrade the agent |
| warlock.ssh.<host>.uninstall     | request          | SSH worker: remove the agent       |
| warlock.ssh.<host>.configure     | request          | SSH worker: rewrite the agent config (new token) |
| warlock.ssh.probe                | request          | SSH worker: reachability + host key of a new host |
| warlock.ops.<host>.exec          | request          | the API: a command signed with an operator key  |
| warlock.gateway.<id>.heartbeat   | publish          | every API: this gateway is alive (stale presence) |
| warlock.agent.<host>.cancel      | request          | the gateway holding <host>: agent kills a command |
| warlock.ssh.<host>.cancel        | request          | SSH worker: kill a command's remote processes |
| warlock.output.<host>.<command>  | publish          | gateways, SSH workers: output chunks, not final |
| warlock.events.command.<host>    | publish          | every API: a run recorded / finished (browsers) |

Who may publish and subscribe to each is declared once, in `shared/permissions.py`.
"""

from __future__ import annotations

from shared.errors import InvalidIdError
from shared.ids import CommandId, HostId, is_command_id, is_host_id

PREFIX = "warlock"

# Queue groups: one member of each group receives each message.
GATEWAY_QUEUE = "warlock-gateway"
SSH_QUEUE = "warlock-ssh"
AUTH_QUEUE = "warlock-auth"
API_QUEUE = "warlock-api"

TOKEN_VERIFY = f"{PREFIX}.auth.verify"
SSH_PROBE = f"{PREFIX}.ssh.probe"
TOKEN_REVOKED = f"{PREFIX}.auth.revoked"
SSH_AGENT_OPS = ("install", "uninstall", "configure")
SESSION_CLAIMS = f"{PREFIX}.session.*.claim"
ALL_METRICS = f"{PREFIX}.metrics.*"
ALL_PRESENCE = f"{PREFIX}.presence.*"
ALL_RESULTS = f"{PREFIX}.result.*"
GATEWAY_HEARTBEATS = f"{PREFIX}.gateway.*.heartbeat"
ALL_OUTPUT = f"{PREFIX}.output.*.*"
ALL_COMMAND_EVENTS = f"{PREFIX}.events.command.*"

AGENT_VERBS = ("exec", "ping", "rotate", "result", "cancel")
SRV_PREFIX = "$SRV"  # NATS micro discovery ($SRV.PING, $SRV.INFO.<name>, ...)


def host_id(value: str) -> HostId:
    """Return `value` as a HostId, or raise InvalidIdError if it is not `[a-z0-9_-]{1,63}`."""
    if not is_host_id(value):
        raise InvalidIdError(f"invalid host id {value[:80]!r}: expected [a-z0-9_-]{{1,63}}")
    return HostId(value)


def agent_exec(host: str) -> str:
    """Subject on which the gateway holding `host` answers exec requests."""
    return f"{PREFIX}.agent.{host_id(host)}.exec"


def agent_ping(host: str) -> str:
    """Subject on which the gateway holding `host` answers health pings."""
    return f"{PREFIX}.agent.{host_id(host)}.ping"


def agent_rotate(host: str) -> str:
    """Subject on which the gateway holding `host` hands its agent a new token."""
    return f"{PREFIX}.agent.{host_id(host)}.rotate"


def agent_result(host: str) -> str:
    """Subject on which the gateway holding `host` asks its agent what became of a command id."""
    return f"{PREFIX}.agent.{host_id(host)}.result"


def agent_requests(host: str) -> str:
    """Wildcard covering every agent request subject of `host` (one subscription per host)."""
    return f"{PREFIX}.agent.{host_id(host)}.*"


def _host_of(subject: str, kind: str, verb: str | None) -> tuple[HostId, list[str]]:
    """Check ``warlock.<kind>.<host>[.<verb>]`` (verb None: any one verb) and return the host and parts."""
    parts = subject.split(".")
    want = 3 if verb == "" else 4
    if len(parts) != want or parts[:2] != [PREFIX, kind] or (verb and parts[3] != verb):
        raise InvalidIdError(f"not a {kind} subject of the expected shape: {subject[:120]!r}")
    return host_id(parts[2]), parts


def parse_agent_request(subject: str) -> tuple[HostId, str]:
    """Split ``warlock.agent.<host>.<verb>`` into (host, verb); raise InvalidIdError otherwise."""
    host, parts = _host_of(subject, "agent", None)
    return host, parts[3]


def ssh_exec(host: str) -> str:
    """Subject on which the SSH fallback worker answers exec requests for `host`."""
    return f"{PREFIX}.ssh.{host_id(host)}.exec"


def ssh_exec_wildcard() -> str:
    """Wildcard covering every host's SSH exec subject (the fallback worker's one subscription)."""
    return f"{PREFIX}.ssh.*.exec"


def parse_ssh_exec(subject: str) -> HostId:
    """Return the host of a ``warlock.ssh.<host>.exec`` subject; raise InvalidIdError otherwise."""
    return _host_of(subject, "ssh", "exec")[0]


def ssh_agent_op(host: str, op: str) -> str:
    """Subject on which the SSH worker installs / uninstalls / configures the agent of `host`."""
    if op not in SSH_AGENT_OPS:
        raise InvalidIdError(f"unknown agent operation {op!r}")
    return f"{PREFIX}.ssh.{host_id(host)}.{op}"


def ssh_agent_op_wildcard(op: str) -> str:
    """Wildcard covering one agent operation for every host (the SSH worker's subscription)."""
    if op not in SSH_AGENT_OPS:
        raise InvalidIdError(f"unknown agent operation {op!r}")
    return f"{PREFIX}.ssh.*.{op}"


def parse_ssh_agent_op(subject: str) -> tuple[HostId, str]:
    """Split ``warlock.ssh.<host>.<op>`` for an agent operation into (host, op)."""
    host, parts = _host_of(subject, "ssh", None)
    if parts[3] not in SSH_AGENT_OPS:
        raise InvalidIdError(f"not an agent operation subject: {subject[:120]!r}")
    return host, parts[3]


def ssh_worker_status(worker_id: str) -> str:
    """Subject of an SSH fallback worker's micro status endpoint."""
    return f"{PREFIX}.ssh.{host_id(worker_id)}.status"


def metrics(host: str) -> str:
    """Subject on which `host`'s metrics samples are published."""
    return f"{PREFIX}.metrics.{host_id(host)}"


def presence(host: str) -> str:
    """Subject on which `host`'s connect and disconnect events are published."""
    return f"{PREFIX}.presence.{host_id(host)}"


def result(host: str) -> str:
    """Subject on which results for `host` are published when their request is gone."""
    return f"{PREFIX}.result.{host_id(host)}"


def gateway_sessions(gateway_id: str) -> str:
    """Subject of a gateway's micro endpoint that lists the hosts it holds."""
    return f"{PREFIX}.gateway.{host_id(gateway_id)}.sessions"


def parse_result(subject: str) -> HostId:
    """Return the host of a ``warlock.result.<host>`` subject; raise InvalidIdError otherwise."""
    return _host_of(subject, "result", "")[0]


def parse_metrics(subject: str) -> HostId:
    """Return the host of a ``warlock.metrics.<host>`` subject; raise InvalidIdError otherwise."""
    return _host_of(subject, "metrics", "")[0]


def parse_presence(subject: str) -> HostId:
    """Return the host of a ``warlock.presence.<host>`` subject; raise InvalidIdError otherwise."""
    return _host_of(subject, "presence", "")[0]


def session_claim(host: str) -> str:
    """Subject on which a gateway announces a new session for `host` (older ones close)."""
    return f"{PREFIX}.session.{host_id(host)}.claim"


def parse_session_claim(subject: str) -> HostId:
    """Return the host of a ``warlock.session.<host>.claim`` subject; raise InvalidIdError otherwise."""
    return _host_of(subject, "session", "claim")[0]


def ops_exec(host: str) -> str:
    """Subject on which the API runs a command an operator signed (``warlock req``) on `host`."""
    return f"{PREFIX}.ops.{host_id(host)}.exec"


def ops_exec_wildcard() -> str:
    """Wildcard covering every host's operator exec subject (the API's one subscription)."""
    return f"{PREFIX}.ops.*.exec"


def parse_ops_exec(subject: str) -> HostId:
    """Return the host of a ``warlock.ops.<host>.exec`` subject; raise InvalidIdError otherwise."""
    return _host_of(subject, "ops", "exec")[0]


def inbox_prefix(role: str) -> str:
    """The reply-inbox prefix of a service role (``_INBOX_<role>``): replies to one role's requests are
    never delivered to another's subscription. The operator (NATS CLI) keeps the default ``_INBOX``."""
    return "_INBOX" if role == "operator" else f"_INBOX_{role.replace('-', '_')}"


def gateway_heartbeat(gateway_id: str) -> str:
    """Subject on which a gateway says, every few seconds, that it is alive and holds its sessions."""
    return f"{PREFIX}.gateway.{host_id(gateway_id)}.heartbeat"


def parse_gateway_heartbeat(subject: str) -> HostId:
    """The gateway id of a ``warlock.gateway.<id>.heartbeat`` subject; InvalidIdError otherwise."""
    return _host_of(subject, "gateway", "heartbeat")[0]


def agent_cancel(host: str) -> str:
    """Subject on which the gateway holding `host` asks its agent to kill a running command."""
    return f"{PREFIX}.agent.{host_id(host)}.cancel"


def ssh_cancel(host: str) -> str:
    """Subject on which the SSH worker kills the remote processes of a command on `host`."""
    return f"{PREFIX}.ssh.{host_id(host)}.cancel"


def ssh_cancel_wildcard() -> str:
    """Wildcard covering every host's SSH cancel subject (the SSH worker's subscription)."""
    return f"{PREFIX}.ssh.*.cancel"


def parse_ssh_cancel(subject: str) -> HostId:
    """Return the host of a ``warlock.ssh.<host>.cancel`` subject; raise InvalidIdError otherwise."""
    return _host_of(subject, "ssh", "cancel")[0]


def output(host: str, command_id: str) -> str:
    """Subject on which the output chunks of command `command_id` on `host` are published."""
    if not is_command_id(command_id):
        raise InvalidIdError(f"invalid command id {command_id[:80]!r}")
    return f"{PREFIX}.output.{host_id(host)}.{command_id}"


def parse_output(subject: str) -> tuple[HostId, CommandId]:
    """Split ``warlock.output.<host>.<command_id>`` into (host, command id); InvalidIdError otherwise."""
    host, parts = _host_of(subject, "output", None)
    if not is_command_id(parts[3]):
        raise InvalidIdError(f"invalid command id in {subject[:120]!r}")
    return host, CommandId(parts[3])


def command_event(host: str) -> str:
    """Subject on which an API announces a run of `host` recorded or finished (for the browser stream)."""
    return f"{PREFIX}.events.command.{host_id(host)}"


def parse_command_event(subject: str) -> HostId:
    """Return the host of a ``warlock.events.command.<host>`` subject; raise InvalidIdError otherwise."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:3] != [PREFIX, "events", "command"]:
        raise InvalidIdError(f"not a command event subject: {subject[:120]!r}")
    return host_id(parts[3])
