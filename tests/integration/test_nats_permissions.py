"""The permission matrix, as a real nats-server enforces it (shared/permissions.py rendered by natsauth).

For every role and every subject `shared.subjects` builds (with concrete ids), publishing, subscribing
and requesting are allowed or refused exactly as the matrix declares; what the server refuses is seen
through its permission errors (nats-py's error callback), what it allows by the absence of one and, for a
request, by a reply from a responder of the role that serves that subject. Anonymous and unknown clients
are refused, and no role can read another's replies. One server for the whole module.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import subjects as s
from shared.natsauth import ensure_nkeys
from shared.natsx import NatsLink
from shared.permissions import ROLES, Role
from tests.support.natsserver import NatsServer

HOST = "web-1"
WORKER = "worker-1"
GATEWAY = "gw-1"

# Every subject the subjects module builds, concrete (what publishers use) ...
CONCRETE: dict[str, str] = {
    "agent_exec": s.agent_exec(HOST),
    "agent_ping": s.agent_ping(HOST),
    "agent_rotate": s.agent_rotate(HOST),
    "agent_result": s.agent_result(HOST),
    "agent_cancel": s.agent_cancel(HOST),
    "ssh_exec": s.ssh_exec(HOST),
    "ssh_cancel": s.ssh_cancel(HOST),
    **{f"ssh_agent_op:{op}": s.ssh_agent_op(HOST, op) for op in s.SSH_AGENT_OPS},
    "ssh_worker_status": s.ssh_worker_status(WORKER),
    "metrics": s.metrics(HOST),
    "presence": s.presence(HOST),
    "result": s.result(HOST),
    "gateway_sessions": s.gateway_sessions(GATEWAY),
    "gateway_heartbeat": s.gateway_heartbeat(GATEWAY),
    "session_claim": s.session_claim(HOST),
    "ops_exec": s.ops_exec(HOST),
    "output": s.output(HOST, "cmd-1"),
    "command_event": s.command_event(HOST),
    "TOKEN_VERIFY": s.TOKEN_VERIFY,
    "SSH_PROBE": s.SSH_PROBE,
    "TOKEN_REVOKED": s.TOKEN_REVOKED,
    "srv_ping": f"{s.SRV_PREFIX}.PING",
    "srv_info": f"{s.SRV_PREFIX}.INFO.warlock-api",
    **{f"inbox:{role}": f"{s.inbox_prefix(role)}.abc.1" for role in ROLES},
}
# ... and the wildcards subscribers use.
WILDCARDS: dict[str, str] = {
    "agent_requests": s.agent_requests(HOST),
    "ssh_exec_wildcard": s.ssh_exec_wildcard(),
    "ssh_cancel_wildcard": s.ssh_cancel_wildcard(),
    **{f"ssh_agent_op_wildcard:{op}": s.ssh_agent_op_wildcard(op) for op in s.SSH_AGENT_OPS},
    "ops_exec_wildcard": s.ops_exec_wildcard(),
    "SESSION_CLAIMS": s.SESSION_CLAIMS,
    "ALL_METRICS": s.ALL_METRICS,
    "ALL_PRESENCE": s.ALL_PRESENCE,
    "ALL_RESULTS": s.ALL_RESULTS,
    "GATEWAY_HEARTBEATS": s.GATEWAY_HEARTBEATS,
    "ALL_OUTPUT": s.ALL_OUTPUT,
    "ALL_COMMAND_EVENTS": s.ALL_COMMAND_EVENTS,
    "cli_output": f"{s.PREFIX}.output.>",
    "everything": ">",
    "cli_presence": f"{s.PREFIX}.presence.>",  # what the README's `nats sub` examples use
    "cli_metrics": f"{s.PREFIX}.metrics.>",
    "cli_results": f"{s.PREFIX}.result.>",
    "all_warlock": f"{s.PREFIX}.>",
    **{f"inbox_wildcard:{role}": f"{s.inbox_prefix(role)}.>" for role in ROLES},
}
NOT_SUBJECTS = {"host_id", "inbox_prefix"}  # builders in the module that do not return a subject


def covers(pattern: str, subject: str) -> bool:
    """Whether allow-list entry `pattern` covers `subject`, written out independently of the server.

    As nats-server checks it: the subject's tokens are taken literally, even in a subscription, so an
    entry ``warlock.presence.*`` also admits the subscription ``warlock.presence.>`` (``*`` matches the
    token ``>``). That is why `nats sub 'warlock.presence.>'` works for the operator, and harmless: only
    the publish lists decide what is sent there.
    """
    pat, sub = pattern.split("."), subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub):
            return False
        if token not in ("*", sub[i]):
            return False
    return len(pat) == len(sub)


def refused(errors: list[str], op: str, subject: str) -> bool:
    """Whether `errors` hold the server's refusal of `op` (``publish`` / ``subscription``) on `subject`
    (nats-py lowercases the server's -ERR text)."""
    return any(f'permissions violation for {op} to "{subject.lower()}"' in e.lower() for e in errors)


def may_publish(role: Role, subject: str) -> bool:
    return any(covers(p, subject) for p in role.publish)


def may_subscribe(role: Role, subject: str) -> bool:
    return any(covers(p, subject) for p in (*role.subscribe, role.inbox))


@dataclass
class Client:
    """One connection as a role, with the permission errors the server sent it."""

    role: str
    nc: NATS
    errors: list[str] = field(default_factory=list)

    async def synced(self) -> list[str]:
        """Wait until the server processed everything sent so far; return and clear the errors."""
        await self.nc.flush()
        await self.nc.flush()  # nats-py's PING can overtake a SUB
        errors, self.errors = self.errors, []
        return errors


async def connect(server: NatsServer, role: str) -> Client:
    client = Client(role, None)  # type: ignore[arg-type]

    async def on_error(exc: Exception) -> None:
        client.errors.append(str(exc))

    client.nc = await server.connect(role, error_cb=on_error, max_reconnect_attempts=1)
    return client


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server enforcing the matrix for the whole module."""
    server = NatsServer(tmp_path_factory.mktemp("nats-perms"))
    yield server
    server.stop()


@pytest.fixture
async def clients(server: NatsServer) -> AsyncIterator[dict[str, Client]]:
    """One connection per role."""
    made = {role: await connect(server, role) for role in ROLES}
    yield made
    for client in made.values():
        await client.nc.close()


def test_every_subject_builder_is_covered() -> None:
    """A new subject in shared/subjects.py must be added here (and to the matrix) to pass."""
    builders = {
        name
        for name, fn in inspect.getmembers(s, inspect.isfunction)
        if fn.__module__ == s.__name__ and not name.startswith(("parse_", "_")) and name not in NOT_SUBJECTS
    }
    covered = {key.split(":")[0] for key in (*CONCRETE, *WILDCARDS)}
    assert builders - covered == set()
    constants = {name for name, value in vars(s).items() if name.isupper() and isinstance(value, str)}
    subject_constants = {n for n in constants if re.fullmatch(r"[\w$*>-]+(\.[\w$*>-]+)+", getattr(s, n))}
    assert subject_constants - covered == set()


def test_the_matrix_keeps_its_promises() -> None:
    """The properties the trust model rests on, stated directly (not derived from the matrix)."""
    api, gateway, worker, operator = (ROLES[r] for r in ("api", "gateway", "ssh-worker", "operator"))
    for role in ROLES.values():
        assert not may_publish(role, "anything.at.all")
        assert ">" not in role.publish + role.subscribe
    assert [r for r in ROLES.values() if may_subscribe(r, s.TOKEN_VERIFY)] == [api]
    assert [r for r in ROLES.values() if may_subscribe(r, s.ops_exec(HOST))] == [api]
    assert [r for r in ROLES.values() if may_subscribe(r, s.agent_requests(HOST))] == [gateway]
    assert [r for r in ROLES.values() if may_subscribe(r, s.ssh_exec(HOST))] == [worker]
    assert [r for r in ROLES.values() if may_publish(r, s.TOKEN_REVOKED)] == [api]
    gateway_published = (s.session_claim(HOST), s.presence(HOST), s.metrics(HOST), s.result(HOST))
    for gateway_only in (*gateway_published, s.gateway_heartbeat(GATEWAY)):
        assert [r for r in ROLES.values() if may_publish(r, gateway_only)] == [gateway]
    for watched in (s.ALL_PRESENCE, s.ALL_METRICS, s.ALL_RESULTS, "warlock.presence.>", f"{s.SRV_PREFIX}.>"):
        assert may_subscribe(operator, watched)
    assert not may_subscribe(operator, s.agent_requests(HOST))
    assert not may_publish(operator, s.agent_exec(HOST))
    assert not may_publish(operator, s.ssh_exec(HOST))
    assert may_publish(operator, s.agent_ping(HOST))
    assert may_publish(operator, s.ops_exec(HOST))
    assert not may_publish(gateway, s.agent_exec(HOST))
    assert not may_publish(worker, s.agent_exec(HOST))
    # a result query (read-only, API-signed): only the api asks, only gateways receive it
    assert [r for r in ROLES.values() if may_publish(r, s.agent_result(HOST))] == [api]
    assert [r for r in ROLES.values() if may_subscribe(r, s.agent_result(HOST))] == [gateway]
    # a cancel (API-signed, verified where it runs): only the api sends it; gateways carry it to the agent,
    # the SSH worker kills over SSH; the operator cannot cancel straight over NATS
    assert [r for r in ROLES.values() if may_publish(r, s.agent_cancel(HOST))] == [api]
    assert [r for r in ROLES.values() if may_subscribe(r, s.agent_cancel(HOST))] == [gateway]
    assert [r for r in ROLES.values() if may_publish(r, s.ssh_cancel(HOST))] == [api]
    assert [r for r in ROLES.values() if may_subscribe(r, s.ssh_cancel(HOST))] == [worker]
    # output chunks: published by gateways and SSH workers, read by the api and (read-only) the operator
    chunks = s.output(HOST, "cmd-1")
    assert [r for r in ROLES.values() if may_publish(r, chunks)] == [gateway, worker]
    assert [r for r in ROLES.values() if may_subscribe(r, chunks)] == [api, operator]


async def test_publish_and_request_are_allowed_exactly_as_declared(
    server: NatsServer, clients: dict[str, Client]
) -> None:
    """Every role publishes and requests every concrete subject: the server refuses exactly what the matrix
    does not allow; an allowed request reaches a responder of the serving role and its reply comes back."""
    # One responder per subject: a role that may subscribe to it and answer (allow_responses).
    responders: dict[str, str] = {}
    for subject in CONCRETE.values():
        serving = [r for r in ROLES.values() if r.allow_responses and may_subscribe(r, subject)]
        if serving and not subject.startswith("_INBOX"):
            responder = clients[serving[0].name]

            async def answer(msg: Msg, nc: NATS = responder.nc, name: str = serving[0].name) -> None:
                if msg.reply:
                    await nc.publish(msg.reply, f"ok from {name}".encode())

            await responder.nc.subscribe(subject, cb=answer)
            responders[subject] = serving[0].name
    for client in clients.values():
        assert await client.synced() == []
    mismatches: list[str] = []
    for role, client in clients.items():
        for key, subject in CONCRETE.items():
            allowed = may_publish(ROLES[role], subject)
            await client.nc.publish(subject, b"")
            if refused(await client.synced(), "publish", subject) == allowed:
                mismatches.append(
                    f"{role} publish {key} ({subject}): expected {'allowed' if allowed else 'refused'}"
                )
            if not allowed:
                await client.nc.publish(subject, b"", reply=client.nc.new_inbox())
                if not refused(await client.synced(), "publish", subject):
                    mismatches.append(f"{role} request {key}: expected refused")
                continue
            try:
                reply = await client.nc.request(subject, b"", timeout=5)
                got = reply.data.decode()
            except nats.errors.NoRespondersError:
                got = "no responders"
            expected = f"ok from {responders[subject]}" if subject in responders else "no responders"
            if got != expected:
                mismatches.append(f"{role} request {key}: got {got!r}, expected {expected!r}")
            assert await client.synced() == []
    assert mismatches == []


async def test_subscribe_is_allowed_exactly_as_declared(clients: dict[str, Client]) -> None:
    """Every role subscribes to every subject and wildcard: the server refuses exactly what the matrix does
    not allow (no role may subscribe to ``>``, to ``warlock.>``, or to another role's inbox)."""
    mismatches: list[str] = []
    for role, client in clients.items():
        for key, subject in {**CONCRETE, **WILDCARDS}.items():
            allowed = may_subscribe(ROLES[role], subject)
            sub = await client.nc.subscribe(subject)
            if refused(await client.synced(), "subscription", subject) == allowed:
                mismatches.append(
                    f"{role} subscribe {key} ({subject}): expected {'allowed' if allowed else 'refused'}"
                )
            await sub.unsubscribe()
    assert mismatches == []


async def test_no_role_reads_another_roles_replies(clients: dict[str, Client]) -> None:
    """A gateway's token check is answered into the gateway's own inbox: every other role's attempt to
    listen there is refused and hears nothing, while the gateway gets its answer."""
    api, gateway = clients["api"], clients["gateway"]

    async def authority(msg: Msg) -> None:
        await api.nc.publish(msg.reply, b"token ok")

    await api.nc.subscribe(s.TOKEN_VERIFY, cb=authority)
    eavesdropped: list[bytes] = []
    for role in ("api", "ssh-worker", "operator"):
        spy = clients[role]

        async def heard(msg: Msg) -> None:
            eavesdropped.append(msg.data)

        await spy.nc.subscribe(f"{s.inbox_prefix('gateway')}.>", cb=heard)
        await spy.nc.subscribe("_INBOX.>", cb=heard)  # the operator's own, which nats-py uses by default
        errors = await spy.synced()
        assert refused(errors, "subscription", f"{s.inbox_prefix('gateway')}.>"), (role, errors)
    await api.synced()
    reply = await gateway.nc.request(s.TOKEN_VERIFY, b"{}", timeout=5)
    assert reply.data == b"token ok"
    assert reply.subject.startswith(s.inbox_prefix("gateway") + ".")
    await asyncio.sleep(0.2)
    assert eavesdropped == []


async def test_anonymous_and_unknown_clients_are_refused(server: NatsServer, tmp_path: Path) -> None:
    """No credentials, or a well-formed nkey the server does not know: the connection is refused."""
    stranger = ensure_nkeys(tmp_path / "stranger", ("api",))["api"]
    for seed in (None, str(stranger)):
        errors: list[str] = []

        async def on_error(exc: Exception, errors: list[str] = errors) -> None:
            errors.append(str(exc))

        client = NATS()
        with pytest.raises(nats.errors.Error):
            await client.connect(
                server.url, allow_reconnect=False, connect_timeout=2, error_cb=on_error, nkeys_seed=seed
            )
        await client.close()  # nats-py leaves the refused socket open otherwise
        assert any("authorization violation" in e.lower() for e in errors), errors


async def test_a_service_logs_a_refusal_as_one_line(
    server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """NatsLink (every service's connection): a refused publish is one error line naming the role and the
    subject, repeated refusals of it are not logged again, the connection stays up; refused credentials
    are one line naming the role and the nkey file; never a traceback."""
    caplog.set_level(logging.INFO, logger="test.link")
    logger = logging.getLogger("test.link")
    link = NatsLink([server.url], "perm-test", logger, "gateway", server.nkey_file("gateway"))
    assert await link.connect()
    for _ in range(3):
        await link.nc.publish(s.TOKEN_REVOKED, b"{}")  # only the api may revoke
    await link.nc.flush()
    await link.nc.flush()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.getMessage() for r in refusals] == [
        f'NATS refused role gateway: permissions violation for publish to "{s.TOKEN_REVOKED}" '
        "(see shared/permissions.py)"
    ]
    assert link.violations == 3
    assert link.connected
    await link.close()

    caplog.clear()
    stranger = ensure_nkeys(tmp_path / "stranger", ("gateway",))["gateway"]
    stop = asyncio.Event()
    bad = NatsLink([server.url], "perm-test", logger, "gateway", stranger)
    connecting = asyncio.create_task(bad.connect(stop))
    await asyncio.wait_for(bad.failed.wait(), 10)
    stop.set()
    assert await connecting is False
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines
    assert (
        f"authorization violation: the server refused role gateway's credentials (nkey file {stranger})"
        in (lines[0])
    )
    assert not any(r.exc_info for r in caplog.records)
