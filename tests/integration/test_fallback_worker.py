"""SSH fallback worker: probe, bad input, micro service, shutdown, and the real process.

Signature checks (unsigned, tampered, other host, expired, replayed: nothing dialed) are in
test_fallback_trust.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.micro.service import ServiceVerb, control_subject

from services.dev.procs import BIN, Proc, free_port
from services.fallback_ssh.cli import serve
from services.fallback_ssh.settings import FallbackSettings, load_client_key
from services.fallback_ssh.worker import Worker, WorkerStatus
from shared import subjects
from shared.errors import ErrorCode
from shared.natsx import ERROR_CODE_HEADER
from shared.protocol import (
    ErrorReply,
    SshProbeOk,
    SshProbeRequest,
    decode_exec_reply,
    decode_model,
    decode_probe_reply,
    encode,
)
from shared.settings import load_settings
from tests.integration.test_fallback_exec import (
    API_PUBLIC,
    HOST,
    StartWorker,
    assert_serving,
    exec_request,
    failure,
    result,
    run,
    signed,
    sshd,
    start_worker,
    target_of,
    worker,
)
from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd, keygen

__all__ = ["sshd", "start_worker", "worker"]  # fixtures shared with test_fallback_exec.py


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"command": ""}',
        b'{"command": "true", "timeout": -1}',
        b'{"command": 1}',
        b'{"command": "echo a\\u0000b"}',
    ],
)
async def test_bad_body_is_bad_request(nc: NATS, sshd: Sshd, worker: Worker, body: bytes) -> None:
    """A body that does not validate gets bad_request with the micro error header; the worker goes on."""
    msg = await nc.request(subjects.ssh_exec(HOST), body, timeout=10)
    failure(decode_exec_reply(msg.data), ErrorCode.BAD_REQUEST)
    assert msg.headers is not None
    assert msg.headers[ERROR_CODE_HEADER] == "400"
    await assert_serving(nc, sshd)


async def test_bad_host_in_subject_is_bad_request(nc: NATS, sshd: Sshd, worker: Worker) -> None:
    """A host id that is not [a-z0-9_-] in the subject gets bad_request."""
    body = encode(exec_request(target_of(sshd), "true"))
    msg = await nc.request("warlock.ssh.Not_A_Host.exec", body, timeout=10)
    failure(decode_exec_reply(msg.data), ErrorCode.BAD_REQUEST)


async def wait_ready(server: NatsServer, timeout: float = 10.0) -> None:
    """Wait until a warlock-fallback-ssh micro service answers PING (asked as the operator: `nats micro`)."""
    operator = await server.connect("operator")
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    ping = control_subject(ServiceVerb.PING, "warlock-fallback-ssh")
                    await operator.request(ping, b"", timeout=1)
                    return
                except nats.errors.NoRespondersError:
                    await asyncio.sleep(0.05)
    finally:
        await operator.close()


async def probe(nc: NATS, address: str, port: int, username: str) -> SshProbeOk | ErrorReply:
    """Send a probe request (signed for the host being added, HOST) and decode the answer."""
    request = SshProbeRequest(host_id=HOST, address=address, port=port, username=username)
    body = encode(signed("probe", request))
    msg = await nc.request(subjects.SSH_PROBE, body, timeout=30)
    return decode_probe_reply(msg.data)


async def test_probe_returns_host_key_and_fingerprint(nc: NATS, sshd: Sshd, worker: Worker) -> None:
    """The probe answers the host's public key line and its SHA256 fingerprint, as ssh-keygen prints it."""
    reply = await probe(nc, "127.0.0.1", sshd.port, sshd.username)
    assert isinstance(reply, SshProbeOk), reply
    assert reply.host_key == sshd.host_key_line
    assert reply.fingerprint == sshd.fingerprint()
    assert reply.fingerprint.startswith("SHA256:")


async def test_probe_failures_are_typed(
    nc: NATS, sshd: Sshd, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Probe: nothing listening → connect_failed; key not accepted → auth_failed; bad body → bad_request."""
    keygen(tmp_path / "stranger", "stranger")
    await start_worker(key_file=tmp_path / "stranger")
    unreachable = await probe(nc, "127.0.0.1", free_port(), sshd.username)
    assert isinstance(unreachable, ErrorReply)
    assert unreachable.code == ErrorCode.CONNECT_FAILED
    refused = await probe(nc, "127.0.0.1", sshd.port, sshd.username)
    assert isinstance(refused, ErrorReply)
    assert refused.code == ErrorCode.AUTH_FAILED
    msg = await nc.request(subjects.SSH_PROBE, b'{"address": "a b"}', timeout=10)
    bad = decode_probe_reply(msg.data)
    assert isinstance(bad, ErrorReply)
    assert bad.code == ErrorCode.BAD_REQUEST


async def test_micro_service_and_status(
    nc: NATS, nats_server: NatsServer, sshd: Sshd, worker: Worker
) -> None:
    """The worker registers warlock-fallback-ssh (micro PING/INFO, as `nats micro` with the operator
    identity sees it) and answers its status endpoint."""
    operator = await nats_server.connect("operator")
    ping = await operator.request(control_subject(ServiceVerb.PING, "warlock-fallback-ssh"), b"", timeout=5)
    assert json.loads(ping.data)["name"] == "warlock-fallback-ssh"
    info_subject = control_subject(ServiceVerb.INFO, "warlock-fallback-ssh")
    info = json.loads((await operator.request(info_subject, b"")).data)
    await operator.close()
    assert [e["subject"] for e in info["endpoints"]] == [
        subjects.ssh_worker_status(worker.settings.worker_id)
    ]
    await assert_serving(nc, sshd)
    msg = await nc.request(subjects.ssh_worker_status(worker.settings.worker_id), b"", timeout=5)
    status = decode_model(WorkerStatus, msg.data)
    assert status.worker_id == worker.settings.worker_id
    assert status.connections == 1


async def test_shutdown_finishes_commands_in_flight(nats_server: NatsServer, nc: NATS, sshd: Sshd) -> None:
    """On stop, the worker stops taking requests but answers the command already running."""
    settings = load_settings(
        FallbackSettings,
        nats_url=nats_server.url,
        nats_nkey_file=nats_server.nkey_file("ssh-worker"),
        key_file=sshd.client_key_path,
        trusted_keys=[API_PUBLIC],
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(settings, load_client_key(settings), stop))
    await wait_ready(nats_server)
    in_flight = asyncio.create_task(run(nc, target_of(sshd), "sleep 1; echo finished"))
    await asyncio.sleep(0.5)
    stop.set()
    assert result(await in_flight).stdout == "finished\n"
    await asyncio.wait_for(serving, 10)
    with pytest.raises(nats.errors.NoRespondersError):
        await run(nc, target_of(sshd), "true")


def test_process_serves_and_stops_on_sigterm(nats_server: NatsServer, sshd: Sshd, tmp_path: Path) -> None:
    """`warlock-fallback-ssh` logs its ready line once, answers over NATS, and exits 0 on SIGTERM."""
    env = {
        **nats_server.env("ssh-worker"),
        "WARLOCK_SSH_KEY_FILE": str(sshd.client_key_path),
        "WARLOCK_SSH_WORKER_ID": "proc-1",
        "WARLOCK_SSH_TRUSTED_KEYS": API_PUBLIC,
    }
    proc = Proc("fallback", [str(BIN / "warlock-fallback-ssh")], tmp_path, env)
    try:
        proc.wait_for(r"INFO services.fallback_ssh ssh fallback worker proc-1 ready")

        async def exercise() -> None:
            client = await nats_server.connect("api")
            try:
                assert result(await run(client, target_of(sshd), "echo proc")).stdout == "proc\n"
            finally:
                await client.drain()

        asyncio.run(exercise())
        proc.signal(signal.SIGTERM)
        assert proc.popen.wait(15) == 0
        assert proc.count("ready") == 1
        assert str(sshd.client_key_path) not in proc.log()
        assert "Traceback" not in proc.log()
    finally:
        proc.kill()


def test_process_config_error_exits_2(tmp_path: Path) -> None:
    """A missing key file is a config error naming the field and variable, exit code 2."""
    env = {"WARLOCK_SSH_KEY_FILE": str(tmp_path / "missing"), "WARLOCK_SSH_TRUSTED_KEYS": API_PUBLIC}
    proc = Proc("fallback-bad", [str(BIN / "warlock-fallback-ssh")], tmp_path, env)
    assert proc.popen.wait(15) == 2
    assert "warlock-fallback-ssh: config error: key_file (WARLOCK_SSH_KEY_FILE):" in proc.log()
    proc.kill()


@pytest.mark.parametrize("keys", [None, "", "[]", "ed25519:short", "not-a-key"])
def test_process_that_trusts_nobody_exits_2(sshd: Sshd, tmp_path: Path, keys: str | None) -> None:
    """Without a usable WARLOCK_SSH_TRUSTED_KEYS the worker refuses to start (config error, exit 2)."""
    env = {"WARLOCK_SSH_KEY_FILE": str(sshd.client_key_path)}
    if keys is not None:
        env["WARLOCK_SSH_TRUSTED_KEYS"] = keys
    proc = Proc("fallback-untrusting", [str(BIN / "warlock-fallback-ssh")], tmp_path, env)
    assert proc.popen.wait(15) == 2
    assert "warlock-fallback-ssh: config error: trusted_keys (WARLOCK_SSH_TRUSTED_KEYS):" in proc.log()
    assert "ready" not in proc.log()
    proc.kill()


async def test_reply_fits_small_max_payload(sshd: Sshd, tmp_path: Path) -> None:
    """Output that would not fit the server's max_payload is cut further (truncated), never dropped."""
    server = NatsServer(tmp_path, name="small-nats", max_payload="64KB")
    client = await server.connect("api")
    settings = load_settings(
        FallbackSettings,
        nats_url=server.url,
        nats_nkey_file=server.nkey_file("ssh-worker"),
        key_file=sshd.client_key_path,
        trusted_keys=[API_PUBLIC],
    )
    worker_nc = await server.connect("ssh-worker")
    small = Worker(worker_nc, settings, load_client_key(settings))
    try:
        await small.start()
        await worker_nc.flush()
        reply = result(await run(client, target_of(sshd), "head -c 200000 /dev/zero | tr '\\0' b"))
        assert reply.truncated
        assert 0 < len(reply.stdout) < 64 * 1024
        assert set(reply.stdout) == {"b"}
    finally:
        await small.stop()
        await worker_nc.drain()
        await client.drain()
        server.stop()
