"""End to end: `warlock run` (what `make run` calls) starts a working stack, again and again, and stops it.

Also the way a new user watches the SSH fallback: stop the dev agent (or kill it) and the same command goes
over SSH while everything else keeps running; start it again and the command goes by agent.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.aio.client
import nats.errors
import pytest

from services.dev.files import ensure_ssh_key
from services.dev.procs import BIN
from shared import subjects
from tests.support.sshd import Sshd

pytestmark = pytest.mark.e2e


class DevRun:
    """One `warlock run` in `state` (a state directory that may hold earlier runs' files)."""

    def __init__(self, tmp_path: Path, state: Path, name: str, **env: str) -> None:
        self.state = state
        self.log_path = tmp_path / f"{name}.log"
        self.env = {
            **os.environ,
            "WARLOCK_DEV_DIR": str(state),
            "WARLOCK_DEV_NATS_PORT": "0",
            "WARLOCK_DEV_GATEWAY_PORT": "0",
            "WARLOCK_DEV_API_PORT": "0",
            "WARLOCK_DEV_HOST_ID": "devbox",
            **env,
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "warlock"), "run"], stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        self.info = self._wait_for_dev_json()

    def _wait_for_dev_json(self) -> dict[str, Any]:
        """dev.json of this run (not a stale one an earlier, killed run left)."""
        dev_json = self.state / "dev.json"
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            if dev_json.exists():
                info: dict[str, Any] = json.loads(dev_json.read_text())
                if info["pid"] == self.proc.pid:
                    return info
            time.sleep(0.1)

    def log(self) -> str:
        """What the launcher printed so far."""
        return self.log_path.read_text(errors="replace")

    @property
    def key(self) -> str:
        """The API key of this stack."""
        return Path(self.info["api_key_file"]).read_text().strip()

    async def exec(self, command: str) -> dict[str, Any]:
        """Run `command` on the dev host through the REST API; return the JSON answer (asserting 200)."""
        async with httpx.AsyncClient(base_url=self.info["api_url"], timeout=60) as http:
            answer = await http.post(
                "/api/hosts/devbox/exec",
                json={"command": command},
                headers={"Authorization": f"Bearer {self.key}"},
            )
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def agent(self, action: str) -> str:
        """`warlock agent <action>` against this run; its output (asserting exit 0)."""
        done = subprocess.run(
            [str(BIN / "warlock"), "agent", action], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop(self, sig: int = signal.SIGINT) -> int:
        """Send `sig` and wait for the launcher; its exit code."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        finally:
            self._log.close()

    def close(self) -> None:
        """Kill the launcher if a test left it running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


async def test_dev_stack_runs_a_command_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """dev.json appears (0600); REST and NATS run a command; SIGINT stops all and removes dev.json."""
    state = tmp_path / "state"
    run = DevRun(tmp_path, state, "run")
    try:
        dev_json = state / "dev.json"
        assert stat.S_IMODE(dev_json.stat().st_mode) == 0o600
        info = run.info
        assert info["hosts"] == ["devbox"]
        assert "4222" not in info["nats_url"]
        assert stat.S_IMODE(Path(info["api_key_file"]).stat().st_mode) == 0o600
        answer = await run.exec("echo via-api")
        assert (answer["via"], answer["stdout"]) == ("agent", "via-api\n")
        async with httpx.AsyncClient(base_url=info["api_url"], timeout=30) as http:
            assert (await http.get("/api/hosts")).status_code == 401

        assert info["gateway_url"].startswith("wss://127.0.0.1:")
        for secret in ("operator_nkey", "api_nkey", "operator_key"):
            assert stat.S_IMODE(Path(info[secret]).stat().st_mode) == 0o600, secret
        for key in ("signing.key", "agent.key", "tls/gateway.key", "tls/ca.key", "nats.conf"):
            assert stat.S_IMODE((state / key).stat().st_mode) == 0o600, key
        assert "-----BEGIN CERTIFICATE-----" in Path(info["ca_file"]).read_text()
        refused: list[str] = []

        async def on_error(exc: Exception) -> None:
            refused.append(str(exc))

        anonymous = nats.aio.client.Client()
        with pytest.raises(nats.errors.Error):  # no anonymous NATS client
            await anonymous.connect(info["nats_url"], allow_reconnect=False, connect_timeout=2)
        await anonymous.close()
        nc = await nats.connect(
            info["nats_url"], nkeys_seed=info["operator_nkey"], error_cb=on_error, max_reconnect_attempts=1
        )
        try:
            pong = await nc.request(subjects.agent_ping("devbox"), b"", timeout=10)  # the operator may ping
            assert b"pong" in pong.data
            with pytest.raises(nats.errors.TimeoutError):  # but not run anything
                await nc.request(subjects.agent_exec("devbox"), b'{"command":"echo hello"}', timeout=1)
            assert any("permissions violation for publish" in e for e in refused), refused
        finally:
            await nc.close()
        banner = run.log()
        assert "warlock.ops.devbox.exec" in banner
        assert f"--nkey {info['operator_nkey']}" in banner
        assert f"{info['api_url']}/api/hosts/devbox/exec" in banner
        assert "warlock agent stop" in banner
        for log in (state / "logs").iterdir():  # logs show hosts and commands: private
            assert stat.S_IMODE(log.stat().st_mode) == 0o600, log
        assert stat.S_IMODE((state / "logs").stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "warlock.db").stat().st_mode) == 0o600  # it holds command output
        children = [int(p) for p in _children(run.proc.pid)]
        assert len(children) == 5  # nats-server, API, SSH fallback worker, gateway, agent

        assert run.stop() == 0
        assert not dev_json.exists()
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"child {pid} still running"
    finally:
        run.close()


async def test_dev_stack_runs_again_in_the_same_directory_and_after_a_sigkill(tmp_path: Path) -> None:
    """A second run in the same state directory works; so does a third after the launcher was SIGKILLed."""
    state = tmp_path / "state"
    first = DevRun(tmp_path, state, "run1")
    try:
        assert (await first.exec("echo one"))["stdout"] == "one\n"
        assert first.stop() == 0
    finally:
        first.close()

    second = DevRun(tmp_path, state, "run2")  # logs of run 1 hold "api listening on" a dead port
    try:
        assert (await second.exec("echo two"))["stdout"] == "two\n"
        second.proc.kill()  # no cleanup: dev.json, control socket and logs stay behind
        second.proc.wait()
    finally:
        second.close()

    third = DevRun(tmp_path, state, "run3")
    try:
        assert "did not stop cleanly" in third.log()
        answer = await third.exec("echo three")
        assert (answer["via"], answer["stdout"]) == ("agent", "three\n")
        assert third.stop() == 0
    finally:
        third.close()


async def test_the_fallback_can_be_watched_from_the_dev_stack(tmp_path: Path) -> None:
    """Agent stopped or killed: the launcher keeps running and the command goes over SSH; started: agent."""
    state = tmp_path / "state"
    worker_key = ensure_ssh_key(state / "ssh" / "id_ed25519")  # the launcher reuses it
    sshd = Sshd(tmp_path / "sshd")
    sshd.authorize(worker_key.with_suffix(".pub").read_text())
    run = DevRun(tmp_path, state, "run", WARLOCK_DEV_SSH_PORT=str(sshd.port))
    try:
        assert "SSH fallback ready" in run.log()
        assert (await run.exec("echo 1"))["via"] == "agent"

        assert "agent stopped" in run.agent("stop")
        assert "go by agent" not in run.agent("status")
        answer = await run.exec("echo 2")
        assert (answer["via"], answer["status"], answer["stdout"]) == ("ssh", "succeeded", "2\n")

        assert "agent running" in run.agent("start")
        assert (await run.exec("echo 3"))["via"] == "agent"

        status = run.agent("status")
        agent_pid = int(status.split("pid ")[1].split(")")[0])
        os.kill(agent_pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "the agent exited with -9; everything else keeps running" not in run.log():
            assert run.proc.poll() is None, run.log()
            assert time.monotonic() < deadline, run.log()
            time.sleep(0.1)
        assert (await run.exec("echo 4"))["via"] == "ssh"
        run.agent("start")
        assert (await run.exec("echo 5"))["via"] == "agent"
        assert run.stop() == 0
    finally:
        run.close()
        sshd.stop()


def _children(pid: int) -> list[str]:
    """Pids of the direct children of `pid`."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split()


def _zombie(pid: int) -> bool:
    """Whether `pid` is a zombie (exited, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
