"""Who may publish and subscribe to what on NATS: the permission matrix, declared once.

Every NATS connection authenticates with the nkey of one role; the nats-server config that `warlock run`
and `deploy/compose`'s init write is rendered from `ROLES` by `render_authorization`, so the server
enforces this table and no anonymous client is accepted. No role has ``>``.

The matrix makes impersonation impossible by construction: only ``api`` subscribes to the token
authority, the SSH-target lookup and operator exec; only gateways subscribe to ``warlock.agent.>`` and
publish claims, presence, metrics and late results; only the SSH worker subscribes to ``warlock.ssh.>``;
only the api publishes revocations and requests that change hosts (which are also signed, see
`shared.signing`: a NATS credential alone runs nothing). Responders answer through ``allow_responses``
(one reply to each request they received), and every role has its own reply-inbox prefix
(`subjects.inbox_prefix`), so no role can read another's replies. The read-only ``operator`` identity is
for people with the NATS CLI: it watches presence, metrics, results and output chunks, pings agents, lists
micro services, and sends operator-signed commands to the API; it cannot request exec from an agent or SSH.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared import subjects as s

P = s.PREFIX


@dataclass(frozen=True)
class Role:
    """One NATS identity's allow-lists."""

    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool
    purpose: str

    @property
    def inbox(self) -> str:
        """Its reply inbox wildcard (subscribed for its own requests' replies)."""
        return f"{s.inbox_prefix(self.name)}.>"


SRV = f"{s.SRV_PREFIX}.>"

ROLES: dict[str, Role] = {
    "api": Role(
        name="api",
        publish=(
            f"{P}.agent.*.exec",
            f"{P}.agent.*.ping",
            f"{P}.agent.*.rotate",
            f"{P}.agent.*.result",
            f"{P}.ssh.*.exec",
            *(s.ssh_agent_op_wildcard(op) for op in s.SSH_AGENT_OPS),
            s.SSH_PROBE,
            s.TOKEN_REVOKED,
            f"{P}.gateway.*.sessions",
            f"{P}.ssh.*.status",
            f"{P}.agent.*.cancel",
            s.ssh_cancel_wildcard(),
            s.ALL_COMMAND_EVENTS,
        ),
        subscribe=(
            s.TOKEN_VERIFY,
            s.ops_exec_wildcard(),
            s.ALL_PRESENCE,
            s.ALL_METRICS,
            s.ALL_RESULTS,
            s.GATEWAY_HEARTBEATS,
            SRV,
            s.ALL_OUTPUT,
            s.ALL_COMMAND_EVENTS,
        ),
        allow_responses=True,
        purpose="REST API, token authority, runner: sends signed commands, records results",
    ),
    "gateway": Role(
        name="gateway",
        publish=(
            s.TOKEN_VERIFY,
            s.ALL_PRESENCE,
            s.ALL_METRICS,
            s.ALL_RESULTS,
            s.SESSION_CLAIMS,
            s.GATEWAY_HEARTBEATS,
            s.ALL_OUTPUT,
        ),
        subscribe=(
            f"{P}.agent.>",
            s.SESSION_CLAIMS,
            s.TOKEN_REVOKED,
            f"{P}.gateway.*.sessions",
            SRV,
        ),
        allow_responses=True,
        purpose="bridges agent WebSockets into NATS; cannot sign, so cannot make an agent run anything",
    ),
    "ssh-worker": Role(
        name="ssh-worker",
        publish=(s.ALL_OUTPUT,),
        subscribe=(f"{P}.ssh.>", SRV),
        allow_responses=True,
        purpose="runs API-signed commands and agent installs over SSH",
    ),
    "operator": Role(
        name="operator",
        publish=(
            f"{P}.agent.*.ping",
            s.ops_exec_wildcard(),
            f"{P}.gateway.*.sessions",
            f"{P}.ssh.*.status",
            SRV,
        ),
        subscribe=(s.ALL_PRESENCE, s.ALL_METRICS, s.ALL_RESULTS, s.GATEWAY_HEARTBEATS, SRV, s.ALL_OUTPUT),
        allow_responses=False,
        purpose="people with the NATS CLI: watch, ping, `nats micro`, operator-signed exec via the API",
    ),
}


def _quoted(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in items) + "]"


def render_authorization(nkeys: Mapping[str, str]) -> str:
    """The ``authorization { users = [...] }`` block of a nats-server config, one user per role.

    `nkeys` maps a role name to its public user nkey (``U...``); every role must be present.
    """
    missing = set(ROLES) - set(nkeys)
    if missing:
        raise ValueError(f"no nkey for roles {sorted(missing)}")
    users = []
    for name, role in ROLES.items():
        perms = [
            f"publish: {{ allow: {_quoted(role.publish)} }}",
            f"subscribe: {{ allow: {_quoted((*role.subscribe, role.inbox))} }}",
        ]
        if role.allow_responses:
            perms.append("allow_responses: true")
        users.append(f'    {{ nkey: "{nkeys[name]}", permissions: {{ {", ".join(perms)} }} }}  # {name}')
    return "authorization {\n  users = [\n" + "\n".join(users) + "\n  ]\n}\n"
