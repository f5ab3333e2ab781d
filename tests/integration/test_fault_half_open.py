"""A half-open agent link: the agent's packets are silently dropped (iptables DROP on the gateway's own
loopback port, both directions), so neither end sees the connection close. The gateway must close the
session within ping interval + ping timeout, the API must read the agent disconnected, and the next REST
command must go over SSH and run once.

Real processes: nats-server with the permission matrix, `warlock-api` (SQLite), a gateway with short ping
settings, a real agent, the SSH worker and a real sshd (the host is registered with SSH, its host key
pinned). Needs iptables and the right to use it (root); skipped otherwise. Every rule is removed in a
`finally`.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.sshd import Sshd
from tests.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 1.0
TICK_S = min(1.0, PING_INTERVAL_S / 2, PING_TIMEOUT_S / 2)  # the gateway's pinger checks this often
CLOSE_BOUND_S = PING_INTERVAL_S + PING_TIMEOUT_S + TICK_S + 1.0  # + slack for this 2-core machine
PRESENCE_BOUND_S = 2.0  # after the close: the disconnected presence is published before the hang-up


def iptables_problem() -> str | None:
    """Why iptables cannot be used here, or None."""
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install iptables; .ci/run installs it)"
    probe = subprocess.run(["iptables", "-w", "5", "-S", "INPUT"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"iptables is not usable here: {probe.stderr.strip()[:200]}"
    return None


@contextmanager
def dropped(port: int) -> Iterator[None]:
    """Silently drop every loopback TCP packet to or from `port` (DROP, not REJECT: no RST, no ICMP)."""
    rules = [
        ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
        ["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
    ]
    added = []
    try:
        for rule in rules:
            subprocess.run(["iptables", "-w", "5", "-I", *rule], check=True, capture_output=True)
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "5", "-D", *rule], check=True, capture_output=True)


async def connected(http: httpx.AsyncClient) -> bool:
    return bool((await http.get("/api/agents/box")).json()["connected"])


async def test_half_open_link_is_closed_and_the_next_command_goes_by_ssh(
    stack: Stack, tmp_path: Path
) -> None:
    problem = iptables_problem()
    if problem is not None:
        pytest.skip(problem)
    marks = tmp_path / "marks"
    sshd = Sshd(tmp_path / "sshd")
    try:
        api = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
        stack.start_fallback(sshd.client_key_path)
        gateway = stack.start_gateway(ping_interval=str(PING_INTERVAL_S), ping_timeout=str(PING_TIMEOUT_S))
        async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=60) as http:
            host = {"id": "box", "address": "127.0.0.1", "ssh_port": sshd.port, "ssh_user": sshd.username}
            added = await http.post("/api/hosts", json=host)
            assert added.status_code == 201, added.text
            agent = await stack.start_known_agent(api, "box-agent", "box", [gateway.url])
            deadline = time.monotonic() + 15
            while not await connected(http):
                assert time.monotonic() < deadline, "the agent never read connected"
                await asyncio.sleep(0.1)
            first = await http.post("/api/hosts/box/exec", json={"command": f"echo before >> {marks}"})
            assert (first.json()["status"], first.json()["via"]) == ("succeeded", "agent"), first.text
            logins = sshd.accepted_logins()

            mark = len(gateway.proc.log())
            with dropped(gateway.port):
                cut = time.monotonic()
                await asyncio.to_thread(
                    gateway.proc.wait_for, r"closing 4002: nothing received for", CLOSE_BOUND_S + 5, mark
                )
                closed_after = time.monotonic() - cut
                assert closed_after <= CLOSE_BOUND_S, f"closed {closed_after:.1f}s after the cut"
                while await connected(http):
                    assert time.monotonic() - cut < closed_after + PRESENCE_BOUND_S, "still connected"
                    await asyncio.sleep(0.05)
                disconnected_after = time.monotonic() - cut
                state = (await http.get("/api/agents/box")).json()
                assert state["connected"] is False, state

                then = await http.post("/api/hosts/box/exec", json={"command": f"echo after >> {marks}"})
                body = then.json()
                assert (body["status"], body["via"]) == ("succeeded", "ssh"), then.text
                assert sshd.accepted_logins() > logins  # it really went through sshd
            assert agent.popen.poll() is None  # the agent itself is alive: only its link was cut
            assert marks.read_text().split() == ["before", "after"], marks.read_text()  # each ran once
            await asyncio.sleep(1.0)
            assert marks.read_text().split() == ["before", "after"], marks.read_text()  # and nothing re-ran
            print(
                f"half-open link closed by the gateway {closed_after:.1f}s after the cut (bound "
                f"{CLOSE_BOUND_S:.1f}s), presence disconnected after {disconnected_after:.1f}s"
            )
    finally:
        stack.close()
        sshd.stop()
