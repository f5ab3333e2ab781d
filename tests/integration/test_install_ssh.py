"""Agent install / configure / uninstall through the SSH worker, against a real sshd and nats-server.

The wheel is built from this repository once per session; every install goes under a prefix in
tmp_path (never the machine's /etc or /opt). One lifecycle test shares one install across its phases
(install → agent runs → upgrade → configure → uninstall → uninstall again) to keep the suite fast.
Requests are signed with the test API key the worker trusts; no token travels: the host makes it and the
reply carries only its SHA-256 and the agent's public key, which the test checks against the host's files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import signing, subjects
from shared.errors import ErrorCode
from shared.ids import new_command_id
from shared.install import paths
from shared.protocol import (
    AgentConfigureRequest,
    AgentInstallRequest,
    AgentOpReply,
    AgentOpResult,
    AgentUninstallRequest,
    ErrorReply,
    Message,
    decode_agent_op_reply,
    encode,
)
from shared.version import wheel_name
from tests.integration.test_fallback_exec import (
    API_PUBLIC,
    StartWorker,
    signed,
    sshd,
    start_worker,
    target_of,
)
from tests.support.install import agent_pids
from tests.support.natsserver import connect
from tests.support.sshd import Sshd

__all__ = ["sshd", "start_worker"]  # fixtures shared with test_fallback_exec.py

REPO = Path(__file__).resolve().parents[2]
HOST = "web1"
TOKEN_LINE = re.compile(r'^token = "([0-9a-f]{64})"$', re.MULTILINE)
UNREACHABLE = "ws://127.0.0.1:9/agent"
HAS_SYSTEMD = Path("/run/systemd/system").is_dir()


@pytest.fixture(scope="session")
def agent_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The warlock wheel built from a copy of this repository's sources (the tree itself is untouched)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in ("shared", "services"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    done = subprocess.run([*base, "--no-build-isolation", str(src)], capture_output=True, text=True)
    if done.returncode != 0:  # the venv's setuptools may lack bdist_wheel: build in isolation instead
        done = subprocess.run([*base, str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    wheel = out / wheel_name()  # the name the metadata gives: distribution and version
    assert wheel.is_file(), sorted(p.name for p in out.iterdir())
    return wheel


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[Path]:
    """A scratch root for the install; any agent still running from it is killed afterwards."""
    root = tmp_path / "root"
    root.mkdir()
    yield root
    for pid in agent_pids(root):
        os.kill(pid, signal.SIGKILL)


class ArgvWatch:
    """Scans every process's argv in a thread while an operation runs; `holding(secret)` lists those that
    held `secret` (the token is made on the host, so it is known only afterwards)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    self.seen.add((entry / "cmdline").read_bytes())
                except OSError:
                    continue
            self.scans += 1
            time.sleep(0.05)

    def holding(self, secret: str) -> list[str]:
        """Every argv seen that contains `secret`."""
        return [
            a.replace(b"\0", b" ").decode(errors="replace")[:200] for a in self.seen if secret.encode() in a
        ]

    def __enter__(self) -> ArgvWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class BusTap:
    """Every NATS message of the installs, to check that no payload carries a token. Nobody may subscribe
    to ">" (the server enforces the permission matrix), so the tap listens where the traffic goes: the
    requests to the SSH worker's subjects and the replies to the api's inbox, as the api identity would
    see them plus a second ssh-worker connection (not in the worker's queue group, so it takes nothing)."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []

    async def start(self, nc: NATS) -> None:
        async def keep(msg: Msg) -> None:
            self.payloads.append(msg.data)

        url = f"nats://{nc.connected_url.netloc}" if nc.connected_url else ""
        self.peer = await connect(url, "ssh-worker")
        await self.peer.subscribe("warlock.ssh.>", cb=keep)
        await nc.subscribe(f"{subjects.inbox_prefix('api')}.>", cb=keep)
        await self.peer.flush()
        await nc.flush()

    async def stop(self) -> None:
        """Close the tap's own connection."""
        await self.peer.close()

    def carrying(self, secret: str) -> int:
        """How many messages contained `secret`."""
        return sum(secret.encode() in p for p in self.payloads)


def host_token(conf: Path) -> str:
    """The token in the installed agent's config."""
    found = TOKEN_LINE.search(conf.read_text())
    assert found is not None, conf.read_text()
    return found.group(1)


def host_public_key(key_file: Path) -> str:
    """The public half of the agent's identity key on the host."""
    return signing.public_text(signing.load_private(key_file))


async def agent_op(nc: NATS, op: str, request: Message, timeout: float = 300.0) -> AgentOpReply:
    """Send `request` on ``warlock.ssh.web1.<op>``, signed as the API signs it, and decode the reply."""
    msg = await nc.request(subjects.ssh_agent_op(HOST, op), encode(signed(op, request)), timeout=timeout)
    return decode_agent_op_reply(msg.data)


def op_result(reply: AgentOpReply) -> AgentOpResult:
    """`reply` as an AgentOpResult, failing the test with the error otherwise."""
    assert isinstance(reply, AgentOpResult), reply
    return reply


def install_request(sshd: Sshd, wheel: Path, prefix: Path, **fields: object) -> AgentInstallRequest:
    """An install request for web1 under `prefix`, mode direct, pointing at an unreachable gateway."""
    data = wheel.read_bytes()
    values: dict[str, object] = {
        "command_id": new_command_id(),
        "target": target_of(sshd),
        "host_id": HOST,
        "trusted_keys": (API_PUBLIC,),
        "gateway_urls": (UNREACHABLE,),
        "wheel_name": wheel.name,
        "wheel_b64": base64.b64encode(data).decode(),
        "wheel_sha256": hashlib.sha256(data).hexdigest(),
        "prefix": str(prefix),
        "mode": "direct",
        **fields,
    }
    return AgentInstallRequest.model_validate(values)


def wait_for_text(path: Path, text: str, timeout: float = 15.0) -> None:
    """Wait until `path` contains `text`."""
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} not in {path}"
        time.sleep(0.1)


def files_under(root: Path) -> list[Path]:
    """Everything under `root` that is not a directory."""
    return [p for p in root.rglob("*") if not p.is_dir()]


CA_PEM = trustme.CA().cert_pem.bytes().decode()  # a real CA: the agent loads it when it restarts


@pytest.mark.timeout(240)
async def test_lifecycle_install_upgrade_configure_uninstall(
    nc: NATS,
    sshd: Sshd,
    start_worker: StartWorker,
    agent_wheel: Path,
    prefix: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Install (direct) makes the agent's key and token on the host and reports only the public key and
    the token's hash (both match the host's files); the agent runs from its venv; reinstall upgrades in
    place and keeps the key; configure makes a new token, rewrites trust and CA, keeps the key, restarts;
    uninstall leaves nothing. No token is in any argv, NATS message, the worker's log or sshd's log."""
    caplog.set_level("DEBUG")
    await start_worker()
    tap = BusTap()
    await tap.start(nc)
    where = paths(str(prefix))
    conf, log = Path(where["CONF"]), Path(where["LOG"])
    key_file = Path(where["CONF_DIR"]) / "agent.key"
    tokens: list[str] = []

    with ArgvWatch() as watch:
        # ------------------------------------------------------------------ install
        result = op_result(await agent_op(nc, "install", install_request(sshd, agent_wheel, prefix)))
        assert (result.state, result.systemd) == ("running", False)
        names = [s.name for s in result.steps]
        assert names[:4] == ["upload", "inputs", "sha256", "systemd"]
        assert {"venv", "pip", "config", "identity", "token", "start"} <= set(names)
        assert all(s.ok for s in result.steps), result.steps
        assert (Path(where["CONF_DIR"]).stat().st_mode & 0o777) == 0o700
        assert (conf.stat().st_mode & 0o777) == 0o600
        assert (key_file.stat().st_mode & 0o777) == 0o600
        text = conf.read_text()
        tokens.append(host_token(conf))
        assert result.token_sha256 == hashlib.sha256(tokens[0].encode()).hexdigest()
        public_key = host_public_key(key_file)
        assert result.agent_public_key == public_key
        assert 'host_id = "web1"' in text
        assert f'gateway_urls = ["{UNREACHABLE}"]' in text
        assert f'trusted_keys = ["{API_PUBLIC}"]' in text
        assert f'identity_key_file = "{key_file}"' in text
        assert "ca_file" not in text
        assert f'ledger_path = "{where["LEDGER"]}"' in text

        # the installed agent runs from its own venv and keeps trying the (unreachable) gateway
        (first,) = agent_pids(prefix)
        assert int(Path(where["PIDFILE"]).read_text()) == first
        assert (Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")[0]).startswith(
            f"{where['VENV']}/bin/python".encode()
        )
        assert tokens[0].encode() not in Path(f"/proc/{first}/environ").read_bytes()
        wait_for_text(log, f"cannot connect to {UNREACHABLE}")
        temp_dir = result.steps[0].detail.rsplit(" to ", 1)[1]
        assert not Path(temp_dir).exists(), "the temporary directory was not removed"

        # ------------------------------------------------------------------ install again: upgrade
        result = op_result(await agent_op(nc, "install", install_request(sshd, agent_wheel, prefix)))
        assert result.state == "running"
        venv_step = next(s for s in result.steps if s.name == "venv")
        assert "upgrading in place" in venv_step.detail
        assert result.agent_public_key == public_key  # the host's identity survives an upgrade
        tokens.append(host_token(conf))
        assert result.token_sha256 == hashlib.sha256(tokens[1].encode()).hexdigest()
        (second,) = agent_pids(prefix)
        assert second != first

        # ------------------------------------------------------------------ configure: new token, CA
        other_key = signing.public_text(signing.generate())
        configure = AgentConfigureRequest(
            command_id=new_command_id(),
            target=target_of(sshd),
            host_id=HOST,
            gateway_urls=(UNREACHABLE,),
            trusted_keys=(API_PUBLIC, other_key),
            ca_pem=CA_PEM,
            prefix=str(prefix),
        )
        result = op_result(await agent_op(nc, "configure", configure))
        assert (result.state, result.systemd) == ("running", False)
        text = conf.read_text()
        tokens.append(host_token(conf))
        assert len(set(tokens)) == 3
        assert result.token_sha256 == hashlib.sha256(tokens[2].encode()).hexdigest()
        assert result.agent_public_key == public_key == host_public_key(key_file)
        assert f'trusted_keys = ["{API_PUBLIC}", "{other_key}"]' in text
        ca_file = Path(where["CONF_DIR"]) / "ca.pem"
        assert f'ca_file = "{ca_file}"' in text
        assert ca_file.read_text() == CA_PEM
        assert f'identity_key_file = "{key_file}"' in text
        assert f'ledger_path = "{where["LEDGER"]}"' in text
        assert text.count("token =") == 1
        assert (conf.stat().st_mode & 0o777) == 0o600
        (third,) = agent_pids(prefix)
        assert third != second

        # ------------------------------------------------------------------ uninstall, twice
        uninstall = AgentUninstallRequest(
            command_id=new_command_id(), target=target_of(sshd), prefix=str(prefix)
        )
        result = op_result(await agent_op(nc, "uninstall", uninstall))
        assert result.state == "removed"
        assert agent_pids(prefix) == []
        assert files_under(prefix) == []
        for key in ("VENV", "CONF_DIR", "STATE_DIR", "LOG", "UNIT"):
            assert not Path(where[key]).exists(), key
        again = uninstall.model_copy(update={"command_id": new_command_id()})
        result = op_result(await agent_op(nc, "uninstall", again))
        assert result.state == "not_installed"

    assert watch.scans > 20
    await tap.stop()
    assert len(tap.payloads) >= 8  # the requests and replies of the six operations were seen
    for token in tokens:
        assert watch.holding(token) == []
        assert tap.carrying(token) == 0
        assert token not in caplog.text
        assert token not in sshd.log()


@pytest.mark.skipif(HAS_SYSTEMD, reason="this machine runs systemd: mode auto would use it")
async def test_auto_mode_without_systemd_changes_nothing(
    nc: NATS, sshd: Sshd, start_worker: StartWorker, agent_wheel: Path, prefix: Path
) -> None:
    """Mode auto on a host without systemd answers no_systemd (not an error) and creates nothing."""
    await start_worker()
    reply = await agent_op(nc, "install", install_request(sshd, agent_wheel, prefix, mode="auto"))
    result = op_result(reply)
    assert (result.state, result.systemd) == ("no_systemd", False)
    assert "mode direct" in result.steps[-1].detail
    assert list(prefix.iterdir()) == []


async def test_wrong_sha256_is_refused_before_connecting(
    nc: NATS, sshd: Sshd, start_worker: StartWorker, agent_wheel: Path, prefix: Path
) -> None:
    """A wheel that does not match its SHA-256 is a bad_request; the worker never logs in to the host."""
    await start_worker()
    reply = await agent_op(nc, "install", install_request(sshd, agent_wheel, prefix, wheel_sha256="0" * 64))
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == ErrorCode.BAD_REQUEST
    assert "SHA-256" in reply.description
    assert sshd.accepted_logins() == 0
    assert list(prefix.iterdir()) == []


async def test_failed_step_is_a_typed_error(
    nc: NATS, sshd: Sshd, start_worker: StartWorker, agent_wheel: Path, prefix: Path
) -> None:
    """A script that fails (here: opt/ is a file, so no venv) answers exec_failed naming the step."""
    await start_worker()
    (prefix / "opt").write_text("in the way\n")
    reply = await agent_op(nc, "install", install_request(sshd, agent_wheel, prefix))
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == ErrorCode.EXEC_FAILED
    assert "step venv failed" in reply.description
    assert sorted(p.name for p in prefix.iterdir()) == ["opt"]


async def test_malformed_request_is_a_bad_request(nc: NATS, start_worker: StartWorker) -> None:
    """A payload that is not an install request gets bad_request, not silence."""
    await start_worker()
    msg = await nc.request(subjects.ssh_agent_op(HOST, "install"), b'{"host_id": "web1"}', timeout=10)
    reply = decode_agent_op_reply(msg.data)
    assert isinstance(reply, ErrorReply), reply
    assert reply.code == ErrorCode.BAD_REQUEST


def test_wheel_ships_the_install_scripts(agent_wheel: Path) -> None:
    """The wheel carries shared/install/*.sh, so an API installed from it can serve GET /agent/install.sh."""
    with zipfile.ZipFile(agent_wheel) as wheel:
        names = set(wheel.namelist())
    for name in ("common.sh", "install.sh", "configure.sh", "uninstall.sh"):
        assert f"shared/install/{name}" in names
