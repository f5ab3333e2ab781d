"""End to end: `warlock run` (what `make run` calls) starts a working stack and stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import httpx
import nats
import pytest

from shared import subjects
from shared.protocol import ExecResult, decode_exec_reply
from tests.support.procs import BIN

pytestmark = pytest.mark.e2e


async def test_dev_stack_runs_a_command_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """dev.json appears (0600); REST and NATS run a command; SIGINT stops all and removes dev.json."""
    state = tmp_path / "state"
    env = {
        **os.environ,
        "WARLOCK_DEV_DIR": str(state),
        "WARLOCK_DEV_NATS_PORT": "0",
        "WARLOCK_DEV_GATEWAY_PORT": "0",
        "WARLOCK_DEV_API_PORT": "0",
        "WARLOCK_DEV_HOST_ID": "devbox",
    }
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen([str(BIN / "warlock"), "run"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        dev_json = state / "dev.json"
        deadline = time.monotonic() + 30
        while not dev_json.exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.1)
        assert stat.S_IMODE(dev_json.stat().st_mode) == 0o600
        info = json.loads(dev_json.read_text())
        assert info["hosts"] == ["devbox"]
        assert "4222" not in info["nats_url"]
        key = Path(info["api_key_file"]).read_text().strip()
        assert stat.S_IMODE(Path(info["api_key_file"]).stat().st_mode) == 0o600
        async with httpx.AsyncClient(base_url=info["api_url"], timeout=30) as http:
            answer = await http.post(
                "/api/hosts/devbox/exec",
                json={"command": "echo via-api"},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert answer.status_code == 200, answer.text
            assert (answer.json()["via"], answer.json()["stdout"]) == ("agent", "via-api\n")
            unauthorized = await http.get("/api/hosts")
            assert unauthorized.status_code == 401

        nc = await nats.connect(info["nats_url"])
        try:
            msg = await nc.request(subjects.agent_exec("devbox"), b'{"command":"echo hello"}', timeout=10)
        finally:
            await nc.close()
        reply = decode_exec_reply(msg.data)
        assert isinstance(reply, ExecResult)
        assert reply.stdout == "hello\n"
        banner = (tmp_path / "run.log").read_text()
        assert "warlock.agent.devbox.exec" in banner
        assert f"{info['api_url']}/api/hosts/devbox/exec" in banner
        children = [int(p) for p in _children(proc.pid)]
        assert len(children) == 5  # nats-server, API, SSH fallback worker, gateway, agent

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not dev_json.exists()
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"child {pid} still running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


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
