"""End to end: install an agent over SSH through the API, use it, re-key it, remove it.

Real API (PostgreSQL), SSH worker, gateway, OpenSSH sshd and NATS. The agent is installed under a scratch
root prefix (never the machine's /etc or /opt), in "direct" mode since this machine has no systemd, and
runs from its installed virtual environment. No token is ever shown: the host makes each one (install,
rotation, configure) and the API stores the hash the host reports, checked here against the host's files.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared import signing
from shared.install import paths
from tests.support.db import fresh_database
from tests.support.install import agent_pids
from tests.support.sshd import Sshd
from tests.support.stack import Api, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]
TOKEN_LINE = re.compile(r'^token = "([0-9a-f]{64})"$', re.MULTILINE)


def host_token(conf: Path) -> str:
    """The token in the installed agent's config (made on the host)."""
    found = TOKEN_LINE.search(conf.read_text())
    assert found is not None
    return found.group(1)


async def agent_state(http: httpx.AsyncClient) -> dict[str, Any]:
    """GET /api/agents/box (asserting 200)."""
    answer = await http.get("/api/agents/box")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def until_connected(http: httpx.AsyncClient, other_than: str | None = None) -> dict[str, Any]:
    """Wait until the agent of `box` is connected (with a session id other than `other_than`)."""
    for _ in range(300):
        state = await agent_state(http)
        if state["connected"] and state["session_id"] != other_than:
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"agent never (re)connected: {state}")


@pytest.fixture
async def api_env(
    stack: Stack, tmp_path: Path
) -> AsyncIterator[tuple[Stack, Api, httpx.AsyncClient, Sshd, Path]]:
    """API + worker + gateway + sshd, host `box` added with its SSH key pinned; yields a scratch prefix."""
    sshd = Sshd(tmp_path / "sshd")
    prefix = tmp_path / "root"
    prefix.mkdir()
    try:
        async with fresh_database("postgresql", tmp_path) as db_url:
            api = stack.start_api(db_url)
            stack.start_fallback(sshd.client_key_path)
            stack.start_gateway()
            async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=400) as http:
                added = await http.post(
                    "/api/hosts",
                    json={
                        "id": "box",
                        "address": "127.0.0.1",
                        "ssh_port": sshd.port,
                        "ssh_user": sshd.username,
                    },
                )
                assert added.status_code == 201, added.text
                yield stack, api, http, sshd, prefix
                stack.close()
    finally:
        for pid in agent_pids(prefix):
            os.kill(pid, signal.SIGKILL)
        sshd.stop()


async def test_install_use_rekey_uninstall(api_env: tuple[Stack, Api, httpx.AsyncClient, Sshd, Path]) -> None:
    """Install over SSH → the agent connects and runs commands; regenerate → it comes back on the new
    token; uninstall → nothing left, token revoked, and the same exec call falls back to SSH."""
    stack, _, http, _, prefix = api_env
    gateway_url = (
        next(p for p in stack.procs if p.name == "gw1").wait_for(r"listening on (ws://\S+)").group(1)
    )
    where = paths(str(prefix))

    auto = await http.post(
        "/api/agents/box/install", json={"prefix": str(prefix), "gateway_urls": [gateway_url]}
    )
    assert auto.status_code == 409, auto.text  # this machine has no systemd: nothing installed
    assert auto.json()["code"] == "no_systemd"
    assert not Path(where["VENV"]).exists()

    installed = await http.post(
        "/api/agents/box/install",
        json={"prefix": str(prefix), "mode": "direct", "gateway_urls": [gateway_url]},
    )
    assert installed.status_code == 200, installed.text
    body = installed.json()
    assert body["state"] == "running"
    assert "token" not in body
    conf = Path(where["CONF"])
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    token = host_token(conf)
    key_file = Path(where["CONF_DIR"]) / "agent.key"
    assert body["agent_public_key"] == signing.public_text(signing.load_private(key_file))
    first = await until_connected(http)
    assert first["public_key"] == body["agent_public_key"]

    ran = await http.post("/api/hosts/box/exec", json={"command": "echo from-installed-agent"})
    assert (ran.json()["via"], ran.json()["stdout"]) == ("agent", "from-installed-agent\n")
    health = (await http.post("/api/agents/box/health")).json()
    assert health["connected"] is True
    assert health["via"] == "agent"
    assert health["latency_ms"] > 0

    rekeyed = await http.post("/api/agents/box/regenerate-token", json={"prefix": str(prefix)})
    assert rekeyed.status_code == 200, rekeyed.text
    assert rekeyed.json()["delivered"] == "session"
    assert "token" not in rekeyed.json()
    second = await until_connected(http, other_than=first["session_id"])  # old session closed (4003)
    new_token = host_token(conf)  # the agent made it and stored it itself
    assert new_token != token
    assert rekeyed.json()["token_sha256"] == hashlib.sha256(new_token.encode()).hexdigest()
    again = await http.post("/api/hosts/box/exec", json={"command": "echo rekeyed"})
    assert (again.json()["via"], again.json()["stdout"]) == ("agent", "rekeyed\n")
    assert second["session_id"] != first["session_id"]

    removed = await http.post("/api/agents/box/uninstall", json={"prefix": str(prefix)})
    assert removed.status_code == 200, removed.text
    assert removed.json()["state"] == "removed"
    assert agent_pids(prefix) == []
    left = [p for p in prefix.rglob("*") if p.is_file()]
    assert left == [], left
    gone = await agent_state(http)  # a registered host without an agent record reads as "no agent"
    assert (gone["connected"], gone["session_id"], gone["agent_version"]) == (False, None, None)
    fallback = await http.post("/api/hosts/box/exec", json={"command": "echo after-uninstall"})
    assert (fallback.json()["via"], fallback.json()["stdout"]) == ("ssh", "after-uninstall\n")
