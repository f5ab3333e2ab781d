"""The SSH worker dials nothing it was not told to by the API: signatures, hosts, expiry and replays.

Real nats-server and OpenSSH sshd. Every refusal is a typed error reply, the worker keeps serving, and
neither the sshd nor an attacker's listener sees a single connection.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from services.fallback_ssh.worker import Worker
from shared import signing, subjects
from shared.errors import ErrorCode
from shared.ids import new_command_id
from shared.protocol import (
    AgentInstallRequest,
    AgentUninstallRequest,
    ErrorReply,
    SshProbeRequest,
    SshTarget,
    decode_agent_op_reply,
    decode_probe_reply,
    encode,
)
from tests.integration.test_fallback_exec import (
    API_KEY,
    API_PUBLIC,
    HOST,
    StartWorker,
    assert_serving,
    exec_request,
    failure,
    result,
    signed,
    ssh_exec,
    sshd,
    start_worker,
    target_of,
    worker,
)
from tests.support.sshd import Sshd

__all__ = ["sshd", "start_worker", "worker"]


class Listener:
    """A TCP listener standing for an attacker's machine: counts every connection it is offered."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def _on_connect(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def attacker() -> AsyncIterator[tuple[Listener, int]]:
    """A listener on a free port, and that port."""
    listener = Listener()
    port = await listener.start()
    yield listener, port
    await listener.stop()


def assert_nothing_dialed(server: Sshd, worker: Worker, marker: Path | None = None) -> None:
    """sshd saw no login, the worker's pool dialed nothing, and the command left no trace."""
    assert server.accepted_logins() == 0
    assert worker.pool.stats().dials == 0
    if marker is not None:
        assert not marker.exists()


async def test_unsigned_exec_is_refused_and_nothing_dialed(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """A request without a signature, as `nats req` would send it: unsigned, and nothing is dialed."""
    marker = tmp_path / "ran"
    request = exec_request(target_of(sshd), f"touch {marker}").model_copy(update={"signature": None})
    reply = failure(await ssh_exec(nc, encode(request)), ErrorCode.UNSIGNED)
    assert reply.command_id == request.command_id
    assert "operator key" in reply.description
    assert_nothing_dialed(sshd, worker, marker)


async def test_tampered_command_is_refused(nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path) -> None:
    """The API signed `true`; the bus changed it: bad_signature, nothing ran."""
    marker = tmp_path / "ran"
    request = exec_request(target_of(sshd), "true").model_copy(update={"command": f"touch {marker}"})
    failure(await ssh_exec(nc, encode(request)), ErrorCode.BAD_SIGNATURE)
    timeout = exec_request(target_of(sshd), "true").model_copy(update={"timeout": 999.0})
    failure(await ssh_exec(nc, encode(timeout)), ErrorCode.BAD_SIGNATURE)
    assert_nothing_dialed(sshd, worker, marker)


async def test_attackers_address_with_valid_signature_fails(
    nc: NATS, sshd: Sshd, worker: Worker, attacker: tuple[Listener, int]
) -> None:
    """A signed request whose target was swapped for an attacker's address and key: bad_signature; the
    attacker's machine is never dialed (it would have received the worker's login)."""
    listener, port = attacker
    request = exec_request(target_of(sshd), "true")
    evil = SshTarget(address="127.0.0.1", port=port, username="root", host_key=sshd.host_key_line)
    for target in (evil, target_of(sshd).model_copy(update={"port": port})):
        swapped = request.model_copy(update={"target": target})
        failure(await ssh_exec(nc, encode(swapped)), ErrorCode.BAD_SIGNATURE)
    # the same, but asking the worker to look the target up (no target): bad_signature too
    failure(await ssh_exec(nc, encode(request.model_copy(update={"target": None}))), ErrorCode.BAD_SIGNATURE)
    await asyncio.sleep(0.2)
    assert listener.connections == 0
    assert_nothing_dialed(sshd, worker)


async def test_other_host_is_refused(nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path) -> None:
    """A request signed for web2 sent on web1's subject: wrong_host; nothing dialed."""
    marker = tmp_path / "ran"
    request = exec_request(target_of(sshd), f"touch {marker}", host="web2")
    failure(await ssh_exec(nc, encode(request), host=HOST), ErrorCode.WRONG_HOST)
    assert_nothing_dialed(sshd, worker, marker)


async def test_expired_and_overlong_requests_are_refused(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """Past its not-after → expired; valid for longer than the worker remembers ids → expired too."""
    marker = tmp_path / "ran"
    old = exec_request(target_of(sshd), f"touch {marker}")
    sig = signing.sign_command(API_KEY, "ssh_exec", signing.signed_fields(old), HOST, ttl=60, now=1_000_000.0)
    failure(await ssh_exec(nc, encode(old.model_copy(update={"signature": sig}))), ErrorCode.EXPIRED)
    overlong = exec_request(target_of(sshd), f"touch {marker}")
    overlong = signed("ssh_exec", overlong, ttl=24 * 3600)
    failure(await ssh_exec(nc, encode(overlong)), ErrorCode.EXPIRED)
    assert_nothing_dialed(sshd, worker, marker)


async def test_unknown_key_is_refused(nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path) -> None:
    """Signed by a key the worker does not trust (an attacker's, a revoked operator's): unknown_key."""
    marker = tmp_path / "ran"
    stranger = signing.generate()
    request = signed("ssh_exec", exec_request(target_of(sshd), f"touch {marker}"), key=stranger)
    failure(await ssh_exec(nc, encode(request)), ErrorCode.UNKNOWN_KEY)
    assert_nothing_dialed(sshd, worker, marker)


async def test_replay_is_refused_and_runs_once(nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path) -> None:
    """The same signed request sent again (captured on the bus): replay; the command ran once."""
    counter = tmp_path / "count"
    request = exec_request(target_of(sshd), f"echo x >> {counter}")
    assert result(await ssh_exec(nc, encode(request))).exit_code == 0
    reply = failure(await ssh_exec(nc, encode(request)), ErrorCode.REPLAY)
    assert reply.command_id == request.command_id
    # a fresh signature over the same command id is a replay of that id too
    again = signed("ssh_exec", request)
    failure(await ssh_exec(nc, encode(again)), ErrorCode.REPLAY)
    assert counter.read_text() == "x\n"
    await assert_serving(nc, sshd)


async def test_rotated_signing_key_is_accepted_when_trusted(
    nc: NATS, sshd: Sshd, start_worker: StartWorker
) -> None:
    """Two trusted keys (the API's signing key being rotated): requests signed by either run."""
    next_key = signing.generate()
    await start_worker(trusted_keys=[API_PUBLIC, signing.public_text(next_key)])
    for key in (API_KEY, next_key):
        request = signed("ssh_exec", exec_request(target_of(sshd), "echo ok"), key=key)
        assert result(await ssh_exec(nc, encode(request))).stdout == "ok\n"


async def test_probe_must_be_signed_for_its_host(
    nc: NATS, sshd: Sshd, worker: Worker, attacker: tuple[Listener, int]
) -> None:
    """Probe: unsigned → unsigned; another address than signed → bad_signature; replayed → replay.
    Neither sshd nor the attacker's port is dialed by the refused ones."""
    listener, port = attacker
    good = SshProbeRequest(host_id=HOST, address="127.0.0.1", port=sshd.port, username=sshd.username)

    async def probe(request: SshProbeRequest) -> ErrorReply:
        msg = await nc.request(subjects.SSH_PROBE, encode(request), timeout=30)
        reply = decode_probe_reply(msg.data)
        assert isinstance(reply, ErrorReply), reply
        return reply

    assert (await probe(good)).code == ErrorCode.UNSIGNED
    swapped = signed("probe", good).model_copy(update={"port": port})
    assert (await probe(swapped)).code == ErrorCode.BAD_SIGNATURE
    other_host = signed("probe", good).model_copy(update={"host_id": "web2"})
    assert (await probe(other_host)).code == ErrorCode.WRONG_HOST
    await asyncio.sleep(0.2)
    assert listener.connections == 0
    assert sshd.accepted_logins() == 0
    request = signed("probe", good)
    msg = await nc.request(subjects.SSH_PROBE, encode(request), timeout=30)
    assert not isinstance(decode_probe_reply(msg.data), ErrorReply)
    assert (await probe(request)).code == ErrorCode.REPLAY


def _install_request(sshd: Sshd, host: str = HOST) -> AgentInstallRequest:
    wheel = b"not really a wheel"
    return AgentInstallRequest(
        command_id=new_command_id(),
        target=target_of(sshd),
        host_id=host,
        gateway_urls=("ws://127.0.0.1:1/agent",),
        trusted_keys=(API_PUBLIC,),
        wheel_name="warlock_fleet-0-py3-none-any.whl",
        wheel_b64=base64.b64encode(wheel).decode(),
        wheel_sha256=hashlib.sha256(wheel).hexdigest(),
        prefix="/nonexistent-prefix",
        mode="direct",
    )


async def test_agent_ops_must_be_signed(nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path) -> None:
    """install / uninstall: unsigned, tampered (trusted keys, address), wrong host field, other kind,
    replayed: typed refusals before anything is copied to the host."""

    async def op(name: str, request: AgentInstallRequest | AgentUninstallRequest) -> ErrorCode:
        msg = await nc.request(subjects.ssh_agent_op(HOST, name), encode(request), timeout=30)
        reply = decode_agent_op_reply(msg.data)
        assert isinstance(reply, ErrorReply), reply
        return reply.code

    install = _install_request(sshd)
    assert await op("install", install) == ErrorCode.UNSIGNED
    good = signed("install", install)
    attacker_key = signing.public_text(signing.generate())
    assert await op("install", good.model_copy(update={"trusted_keys": (attacker_key,)})) == (
        ErrorCode.BAD_SIGNATURE
    )
    evil = target_of(sshd).model_copy(update={"address": "10.9.9.9"})
    assert await op("install", good.model_copy(update={"target": evil})) == ErrorCode.BAD_SIGNATURE
    # host_id is the signature's own: a request naming another host in its body is refused
    assert await op("install", good.model_copy(update={"host_id": "web2"})) == ErrorCode.WRONG_HOST
    # an install signature does not authorise an uninstall (kinds differ)
    uninstall = AgentUninstallRequest(
        command_id=new_command_id(), target=target_of(sshd), prefix=str(tmp_path / "root")
    )
    as_install = uninstall.model_copy(update={"signature": signed("install", uninstall).signature})
    assert await op("uninstall", as_install) == ErrorCode.BAD_SIGNATURE
    assert sshd.accepted_logins() == 0
    assert worker.pool.stats().dials == 0
    done = signed("uninstall", uninstall)
    msg = await nc.request(subjects.ssh_agent_op(HOST, "uninstall"), encode(done), timeout=60)
    assert not isinstance(decode_agent_op_reply(msg.data), ErrorReply)
    assert await op("uninstall", done) == ErrorCode.REPLAY
