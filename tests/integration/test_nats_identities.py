"""NATS identities outside the matrix itself: `warlock nats-config`, seed-file checks, TLS to NATS,
`warlock req` as the operator, and `warlock run`'s local CA (real nats-server, real processes)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
import trustme

from services.dev.files import ensure_dev_tls
from services.dev.procs import BIN, Proc
from shared.errors import ConfigError
from shared.natsauth import ensure_nkeys, public_nkey, render_server_config
from shared.natsx import NatsLink
from shared.permissions import ROLES
from shared.settings import NatsSettings, load_settings
from tests.support.natsserver import NatsServer

WARLOCK = str(BIN / "warlock")


def run(argv: list[str], cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WARLOCK_")}
    return subprocess.run(
        argv, cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False
    )


def test_nats_config_writes_private_seeds_and_valid_configs(tmp_path: Path) -> None:
    """`warlock nats-config`: one 0600 seed per role in a 0700 directory, kept on a second run; every node
    config passes `nats-server -t` (TLS, mutually verified routes, authorization, no anonymous user); no
    seed is printed."""
    ca = trustme.CA()
    cert = ca.issue_cert("nats-1", "nats-2", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "nats.key"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "nats.pem"))
    out = tmp_path / "out"
    argv = [WARLOCK, "nats-config", "--dir", str(out), "--tls-cert", str(tmp_path / "nats.pem")]
    argv += ["--tls-key", str(tmp_path / "nats.key"), "--tls-ca", str(tmp_path / "ca.pem")]
    argv += ["--cluster-name", "warlock", "--node", "nats-1", "--node", "nats-2"]
    first = run(argv)
    assert first.returncode == 0, first.stderr
    seeds = {role: (out / "nkeys" / f"{role}.nk") for role in ROLES}
    publics = {role: public_nkey(path) for role, path in seeds.items()}
    assert stat.S_IMODE((out / "nkeys").stat().st_mode) == 0o700
    for path in seeds.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() not in first.stdout
    second = run(argv)
    assert second.returncode == 0, second.stderr
    assert {role: public_nkey(path) for role, path in seeds.items()} == publics  # identities kept
    for node in ("nats-1", "nats-2"):
        conf = out / f"{node}.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        text = conf.read_text()
        assert all(key in text for key in publics.values())
        assert "no_auth_user" not in text
        assert "verify: true" in text
        checked = run([str(BIN / "nats-server"), "-t", "-c", str(conf)])
        assert checked.returncode == 0, checked.stdout + checked.stderr
    half = run([WARLOCK, "nats-config", "--dir", str(out), "--tls-cert", "x"])
    assert half.returncode == 2
    assert "go together" in half.stderr
    bare = [WARLOCK, "nats-config", "--dir", str(tmp_path / "bare"), "--cluster-name", "w", "--node", "n1"]
    plain = run(bare)  # routes without TLS would let anything that reaches the route port join
    assert plain.returncode == 2
    assert "--node needs --tls-cert" in plain.stderr
    assert not (tmp_path / "bare").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.chmod(0o644), "mode 0644 lets others read it"),
        (lambda p: p.unlink(), "No such file"),
        (lambda p: p.write_text("SUnot-a-seed\n"), "not a valid nkey seed"),
        (lambda p: p.write_text("hello\n"), "not an nkey user seed"),
    ],
)
def test_a_bad_nkey_file_is_a_config_error_naming_the_field(
    tmp_path: Path, setup: object, message: str
) -> None:
    """Missing, readable by others, or not a user seed: a config error naming the field and its variable,
    never the file's content."""
    seed = ensure_nkeys(tmp_path / "nkeys", ("api",))["api"]
    setup(seed)  # type: ignore[operator]
    with pytest.raises(ConfigError) as caught:
        load_settings(NatsSettings, nats_nkey_file=seed)
    assert caught.value.field == "nats_nkey_file (WARLOCK_NATS_NKEY_FILE)"
    assert message in caught.value.message
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("nope")
    with pytest.raises(ConfigError) as bad_ca:
        load_settings(NatsSettings, nats_ca_file=not_pem)
    assert bad_ca.value.field == "nats_ca_file (WARLOCK_NATS_CA_FILE)"


def test_a_service_refuses_to_start_with_a_world_readable_seed(tmp_path: Path) -> None:
    """The gateway process exits 2 with one line naming WARLOCK_NATS_NKEY_FILE."""
    seed = ensure_nkeys(tmp_path / "nkeys", ("gateway",))["gateway"]
    seed.chmod(0o640)
    done = run([str(BIN / "warlock-gateway")], WARLOCK_NATS_NKEY_FILE=str(seed))
    assert done.returncode == 2
    assert "nats_nkey_file (WARLOCK_NATS_NKEY_FILE)" in done.stderr
    assert "Traceback" not in done.stderr


async def test_tls_to_nats_with_the_ca_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """WARLOCK_NATS_CA_FILE: a service connects over TLS verifying the server with that CA; without it the
    same server is refused (one log line with the reason, no traceback)."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    for name, blob in (("ca.pem", ca.cert_pem), ("nats.pem", cert.cert_chain_pems[0])):
        blob.write_to_path(str(tmp_path / name))
    cert.private_key_pem.write_to_path(str(tmp_path / "nats.key"))
    seeds = ensure_nkeys(tmp_path / "nkeys")
    from shared.natsauth import TlsFiles

    tls = TlsFiles(str(tmp_path / "nats.pem"), str(tmp_path / "nats.key"), str(tmp_path / "ca.pem"))
    conf = tmp_path / "nats.conf"
    conf.write_text(render_server_config({r: public_nkey(p) for r, p in seeds.items()}, port=-1, tls=tls))
    proc = Proc("nats-tls", [str(BIN / "nats-server"), "-c", str(conf)], tmp_path)
    try:
        port = proc.wait_for(r"Listening for client connections on [\d.]+:(\d+)").group(1)
        url = f"tls://localhost:{port}"
        settings = load_settings(
            NatsSettings, nats_url=url, nats_nkey_file=seeds["api"], nats_ca_file=tmp_path / "ca.pem"
        )
        link = NatsLink.from_settings(settings, "tls-test", logging.getLogger("test.tls"), "api")
        assert await link.connect()
        assert link.nc.connected_url is not None
        await link.nc.publish("warlock.auth.revoked", b"{}")
        await link.nc.flush()
        await link.close()

        caplog.set_level(logging.WARNING, logger="test.tls")
        stop = asyncio.Event()
        untrusting = NatsLink([url], "tls-test", logging.getLogger("test.tls"), "api", seeds["api"])
        connecting = asyncio.create_task(untrusting.connect(stop))
        await asyncio.wait_for(untrusting.failed.wait(), 10)
        stop.set()
        assert await asyncio.wait_for(connecting, 10) is False
        assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)
        assert not any(r.exc_info for r in caplog.records)
    finally:
        proc.stop()


def test_warlock_req_connects_as_the_operator(tmp_path: Path, nats_server: NatsServer) -> None:
    """`warlock req` takes the operator's seed from dev.json (or --nkey): a ping goes through (no agent: no
    responders), an exec on the agent subject is refused by the server and says so; a seed readable by
    others is a config error (exit 2)."""
    state = tmp_path / "cwd" / ".warlock"
    state.mkdir(parents=True)
    dev = {"nats_url": nats_server.url, "operator_nkey": str(nats_server.nkey_file("operator"))}
    (state / "dev.json").write_text(json.dumps(dev))
    cwd = tmp_path / "cwd"
    ping = run([WARLOCK, "req", "warlock.agent.h1.ping", ""], cwd=cwd)
    assert (ping.returncode, ping.stderr.strip()) == (1, "warlock: no responders on warlock.agent.h1.ping")
    # an exec is never published on the agent subject (the server would refuse the operator): `req` sends
    # it to the API's operator subject, signed, and without an operator signing key refuses to send it
    exec_ = run([WARLOCK, "req", "warlock.agent.h1.exec", '{"command":"id"}', "--timeout", "1"], cwd=cwd)
    assert exec_.returncode == 2
    assert "sending to warlock.ops.h1.exec instead" in exec_.stderr
    assert "must be signed with an operator key" in exec_.stderr
    refused = run([WARLOCK, "req", "warlock.ssh.h1.exec", '{"command":"id"}', "--timeout", "1"], cwd=cwd)
    assert refused.returncode == 1
    assert (
        'NATS refused the request (Error: nats: permissions violation for publish to "warlock.ssh.h1.exec")'
        in refused.stderr
    )
    loose = tmp_path / "loose.nk"
    loose.write_text(nats_server.nkey_file("operator").read_text())
    loose.chmod(0o644)
    bad = run([WARLOCK, "req", "--nkey", str(loose), "warlock.agent.h1.ping", ""], cwd=cwd)
    assert bad.returncode == 2
    assert "make it 0600" in bad.stderr
    assert loose.read_text().strip() not in bad.stderr + bad.stdout


async def test_dev_tls_makes_a_ca_and_a_gateway_certificate(tmp_path: Path) -> None:
    """`warlock run`'s TLS files: keys 0600 in a 0700 directory; a client pinning the CA completes a
    handshake with the gateway certificate for 127.0.0.1 and localhost; kept across runs; a certificate of
    another CA is replaced."""
    tls = ensure_dev_tls(tmp_path / "tls")
    assert stat.S_IMODE((tmp_path / "tls").stat().st_mode) == 0o700
    for key in (tls.key_file, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls.cert_file, tls.key_file)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        for name in ("127.0.0.1", "localhost"):
            client_ctx = ssl.create_default_context(cafile=str(tls.ca_file))
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=name
            )
            writer.write(b"hi\n")
            assert await reader.readline() == b"hi\n"
            writer.close()
    finally:
        server.close()
        await server.wait_closed()
    before = tls.cert_file.read_bytes(), tls.ca_file.read_bytes()
    assert ensure_dev_tls(tmp_path / "tls") == tls
    assert (tls.cert_file.read_bytes(), tls.ca_file.read_bytes()) == before
    other = ensure_dev_tls(tmp_path / "other")
    tls.cert_file.write_bytes(other.cert_file.read_bytes())
    tls.key_file.write_bytes(other.key_file.read_bytes())
    ensure_dev_tls(tmp_path / "tls")
    assert tls.cert_file.read_bytes() != other.cert_file.read_bytes()
    assert tls.ca_file.read_bytes() == before[1]  # the CA agents pin stays
