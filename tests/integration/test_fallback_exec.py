"""SSH fallback worker against a real nats-server and a real OpenSSH sshd: exec, pool, typed errors.

The fixtures here (`sshd`, `start_worker`, `worker`) and the API's test key (`API_KEY`, `signed`) are
imported by test_fallback_worker.py, test_fallback_trust.py and test_install_ssh.py. Requests are signed
as the API signs them (the worker refuses anything else: test_fallback_trust.py).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.aio.client import Client as NATS

from services.dev.procs import free_port
from services.fallback_ssh.settings import FallbackSettings, load_client_key
from services.fallback_ssh.worker import Worker
from shared import signing, subjects
from shared.errors import ErrorCode
from shared.ids import CommandId, new_command_id
from shared.protocol import (
    ErrorReply,
    ExecReply,
    ExecResult,
    Message,
    SshExecRequest,
    SshTarget,
    decode_exec_reply,
    encode,
)
from shared.settings import load_settings
from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd, keygen, sshd_fixture

sshd = sshd_fixture()
StartWorker = Callable[..., Awaitable[Worker]]
HOST = "web1"
API_KEY = signing.generate()  # plays the API's signing key; the workers here trust it
API_PUBLIC = signing.public_text(API_KEY)
M = TypeVar("M", bound=Message)


def signed(kind: str, message: M, host: str = HOST, ttl: float = 120.0, key: Any = API_KEY) -> M:
    """`message` signed as the API signs it (`ApiSigner.sign`), for `host`."""
    sig = signing.sign_command(key, kind, signing.signed_fields(message), host, ttl)
    return message.model_copy(update={"signature": sig})


@pytest.fixture
async def start_worker(nats_server: NatsServer, sshd: Sshd) -> AsyncIterator[StartWorker]:
    """Factory: start an in-process worker (settings overridable) on its own NATS connection."""
    started: list[tuple[NATS, Worker]] = []

    async def start(**overrides: Any) -> Worker:
        values: dict[str, Any] = {
            "nats_url": nats_server.url,
            "key_file": sshd.client_key_path,
            "worker_id": f"test-{len(started)}",
            "connect_timeout": 5.0,
            "trusted_keys": [API_PUBLIC],
            **overrides,
        }
        settings = load_settings(FallbackSettings, **values)
        client = await nats_server.connect("ssh-worker")
        worker = Worker(client, settings, load_client_key(settings))
        await worker.start()
        await client.flush()
        started.append((client, worker))
        return worker

    yield start
    for client, worker in reversed(started):
        await worker.stop()
        await client.drain()


@pytest.fixture
async def worker(start_worker: StartWorker) -> Worker:
    """A worker with default settings."""
    return await start_worker()


def target_of(server: Sshd, host_key: str | None = None, port: int | None = None) -> SshTarget:
    """The SSH target of `server`, pinned to its current host key unless `host_key` is given."""
    return SshTarget(
        address="127.0.0.1",
        port=port or server.port,
        username=server.username,
        host_key=host_key if host_key is not None else server.host_key_line,
    )


async def ssh_exec(nc: NATS, data: bytes, host: str = HOST, timeout: float = 30.0) -> ExecReply:
    """Send raw `data` on ``warlock.ssh.<host>.exec`` and decode the reply."""
    msg = await nc.request(subjects.ssh_exec(host), data, timeout=timeout)
    return decode_exec_reply(msg.data)


def exec_request(target: SshTarget | None, command: str, host: str = HOST, **fields: Any) -> SshExecRequest:
    """A signed SSH exec request for `host` (with a fresh command id unless one is given)."""
    fields.setdefault("command_id", new_command_id())
    return signed("ssh_exec", SshExecRequest(command=command, target=target, **fields), host)


async def run(nc: NATS, target: SshTarget | None, command: str, **fields: Any) -> ExecReply:
    """Run `command` through the worker with `target` (and any other request fields), signed."""
    return await ssh_exec(nc, encode(exec_request(target, command, **fields)))


def result(reply: ExecReply) -> ExecResult:
    """`reply` as a result, failing the test with the error otherwise."""
    assert isinstance(reply, ExecResult), reply
    return reply


def failure(reply: ExecReply, code: ErrorCode) -> ErrorReply:
    """`reply` as an error with `code`, failing the test otherwise."""
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == code, reply
    return reply


async def assert_serving(nc: NATS, server: Sshd) -> None:
    """The worker still answers a good command."""
    assert result(await run(nc, target_of(server), "echo alive")).stdout == "alive\n"


async def test_exec_round_trip(nc: NATS, sshd: Sshd, worker: Worker) -> None:
    """stdout, stderr and the exit code come back over SSH with via=ssh and the request's command id."""
    reply = result(
        await run(nc, target_of(sshd), "echo out; echo err >&2; exit 3", command_id=CommandId("cmd-1"))
    )
    assert (reply.stdout, reply.stderr, reply.exit_code) == ("out\n", "err\n", 3)
    assert reply.via == "ssh"
    assert reply.command_id == "cmd-1"
    assert not reply.timed_out
    assert not reply.truncated
    assert reply.signal is None
    assert reply.duration_ms > 0


async def test_signed_request_needs_command_id_and_target(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """A signed request without a command id or without a target is refused: the worker looks up nothing."""
    marker = tmp_path / "ran"
    failure(await run(nc, target_of(sshd), f"touch {marker}", command_id=None), ErrorCode.BAD_REQUEST)
    failure(await run(nc, None, f"touch {marker}"), ErrorCode.BAD_REQUEST)
    assert not marker.exists()
    assert sshd.accepted_logins() == 0


async def test_shell_metacharacters_stay_inside_the_command(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """Quotes, semicolons and substitutions reach /bin/sh -c intact, still under the timeout."""
    command = f"""printf '%s\\n' "it's" '$HOME' "$(echo sub)"; echo "a;b" | tr ';' '-' > {tmp_path}/o"""
    reply = result(await run(nc, target_of(sshd), command))
    assert reply.stdout == "it's\n$HOME\nsub\n"
    assert (tmp_path / "o").read_text() == "a-b\n"


async def test_timeout_kills_remote_process_tree(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """A timeout ends the command and its background children: timed_out, no exit code, SIGKILL."""
    pid_file = tmp_path / "bg.pid"
    command = f"sleep 300 & echo $! > {pid_file}; echo started; sleep 300"
    started = time.monotonic()
    reply = result(await run(nc, target_of(sshd), command, timeout=1.0))
    assert time.monotonic() - started < 8
    assert reply.timed_out
    assert reply.exit_code is None
    assert reply.signal == 9
    assert reply.stdout == "started\n"
    assert reply.duration_ms < 5000  # the remote timeout ended it, not the client's (timeout + 5 s grace)
    bg = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{bg}").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not Path(f"/proc/{bg}").exists(), "background child survived the timeout"
    await assert_serving(nc, sshd)


async def test_killed_by_signal_without_timeout(nc: NATS, sshd: Sshd, worker: Worker) -> None:
    """A command that dies of a signal before its timeout reports the signal, not a timeout."""
    reply = result(await run(nc, target_of(sshd), "kill -TERM $$"))
    assert (reply.exit_code, reply.signal, reply.timed_out) == (None, 15, False)


async def test_output_is_capped_with_truncated(nc: NATS, sshd: Sshd, start_worker: StartWorker) -> None:
    """Each stream keeps at most max_output_bytes; `truncated` says output was dropped."""
    await start_worker(max_output_bytes=2048)
    reply = result(await run(nc, target_of(sshd), "head -c 100000 /dev/zero | tr '\\0' a; echo tail >&2"))
    assert reply.stdout == "a" * 2048
    assert reply.stderr == "tail\n"
    assert reply.truncated
    assert reply.exit_code == 0


async def test_pooled_connection_is_reused(nc: NATS, sshd: Sshd, worker: Worker) -> None:
    """Several commands to one host share one SSH connection (one login seen by sshd)."""
    for i in range(4):
        assert result(await run(nc, target_of(sshd), f"echo {i}")).stdout == f"{i}\n"
    assert sshd.accepted_logins() == 1
    stats = worker.pool.stats()
    assert (stats.dials, stats.reuses, stats.connections, stats.in_flight) == (1, 3, 1, 0)


async def test_channel_cap_per_host(nc: NATS, sshd: Sshd, start_worker: StartWorker, tmp_path: Path) -> None:
    """No more than max_channels_per_host commands run at once on a host; the others wait their turn."""
    await start_worker(max_channels_per_host=2)
    running = tmp_path / "running"
    running.mkdir()
    command = f"touch {running}/$$; ls {running} | wc -l; sleep 0.5; rm {running}/$$"
    replies = await asyncio.gather(*(run(nc, target_of(sshd), command) for _ in range(5)))
    concurrent = [int(result(r).stdout) for r in replies]
    assert max(concurrent) <= 2
    assert all(result(r).exit_code == 0 for r in replies)


async def test_busy_when_no_channel_frees_in_time(nc: NATS, sshd: Sshd, start_worker: StartWorker) -> None:
    """A request that cannot get a channel within queue_timeout is refused with `busy`; nothing ran."""
    await start_worker(max_channels_per_host=1, queue_timeout=0.3)
    slow = asyncio.create_task(run(nc, target_of(sshd), "sleep 2"))
    await asyncio.sleep(0.5)
    failure(await run(nc, target_of(sshd), "true"), ErrorCode.BUSY)
    assert result(await slow).exit_code == 0


async def test_changed_host_key_is_refused_and_not_run(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """After the host key changes, the pinned (old) key is refused: host_key_mismatch, command not run."""
    old = target_of(sshd)
    assert result(await run(nc, old, "true")).exit_code == 0  # pooled with the old key
    new_key = sshd.replace_host_key()
    marker = tmp_path / "ran"
    reply = failure(await run(nc, old, f"touch {marker}"), ErrorCode.HOST_KEY_MISMATCH)
    assert reply.command_id is not None
    assert not marker.exists()
    assert result(await run(nc, target_of(sshd, host_key=new_key), "echo new")).stdout == "new\n"


async def test_wrong_key_type_pinned_is_a_mismatch(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """A pinned key of another type than the host's is a host key mismatch too, and nothing runs."""
    other = keygen(tmp_path / "other", "x").split()
    ecdsa_line = "ecdsa-sha2-nistp256 " + _ecdsa_key(tmp_path)
    marker = tmp_path / "ran"
    for pinned in (" ".join(other[:2]), ecdsa_line):
        failure(
            await run(nc, target_of(sshd, host_key=pinned), f"touch {marker}"), ErrorCode.HOST_KEY_MISMATCH
        )
    assert not marker.exists()
    await assert_serving(nc, sshd)


def _ecdsa_key(tmp_path: Path) -> str:
    """The base64 part of a fresh ECDSA public key."""
    path = tmp_path / "ecdsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-N", "", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().split()[1]


async def test_target_without_pinned_key_is_refused(
    nc: NATS, sshd: Sshd, worker: Worker, tmp_path: Path
) -> None:
    """A target without a pinned host key is refused (bad_request); the worker never trusts blindly."""
    marker = tmp_path / "ran"
    failure(await run(nc, target_of(sshd, host_key=""), f"touch {marker}"), ErrorCode.BAD_REQUEST)
    failure(await run(nc, target_of(sshd, host_key="ssh-ed25519 AAAAnotakey"), "true"), ErrorCode.BAD_REQUEST)
    assert not marker.exists()
    await assert_serving(nc, sshd)


async def test_auth_failure(nc: NATS, sshd: Sshd, start_worker: StartWorker, tmp_path: Path) -> None:
    """A worker key the host does not accept gives auth_failed."""
    keygen(tmp_path / "stranger", "stranger")
    await start_worker(key_file=tmp_path / "stranger")
    failure(await run(nc, target_of(sshd), "true"), ErrorCode.AUTH_FAILED)


async def test_unreachable_port_fails_fast(nc: NATS, sshd: Sshd, worker: Worker) -> None:
    """Nothing listening on the port: connect_failed, quickly; the worker keeps serving."""
    started = time.monotonic()
    failure(await run(nc, target_of(sshd, port=free_port()), "true"), ErrorCode.CONNECT_FAILED)
    assert time.monotonic() - started < 5
    await assert_serving(nc, sshd)


async def test_dead_connection_is_redialled(nc: NATS, sshd: Sshd, worker: Worker) -> None:
    """A pooled connection that died while idle is replaced on next use; the command runs once."""
    assert result(await run(nc, target_of(sshd), "true")).exit_code == 0
    sshd.drop_connections()
    await asyncio.sleep(0.3)
    assert result(await run(nc, target_of(sshd), "echo again")).stdout == "again\n"
    assert worker.pool.stats().dials == 2


async def test_idle_connection_closed_but_never_in_flight(
    nc: NATS, sshd: Sshd, start_worker: StartWorker
) -> None:
    """The sweeper closes idle connections but not one running a command longer than idle_timeout."""
    worker = await start_worker(idle_timeout=0.3)
    reply = result(await run(nc, target_of(sshd), "sleep 1.5; echo survived"))
    assert reply.stdout == "survived\n"
    await asyncio.sleep(1.5)
    assert worker.pool.stats().connections == 0
    assert result(await run(nc, target_of(sshd), "true")).exit_code == 0
    assert worker.pool.stats().dials == 2


def test_sshd_helper_restarts_on_same_port(sshd: Sshd) -> None:
    """replace_host_key() keeps the port and changes the key line."""
    port, key = sshd.port, sshd.host_key_line
    assert sshd.replace_host_key() != key
    assert sshd.port == port
    assert os.path.exists(sshd.client_key_path)
