"""REST exec of `true` via agent, via pooled SSH, and the baselines, measured side by side.

Two hosts share one real sshd on loopback: `bench-agent` (agent connected; answers `via: agent`) and
`bench-ssh` (no agent; answers `via: ssh` over the worker's pooled connection). The SSH account has a
plain `/bin/sh` login shell (user `warlockbench`, created when running as root): a heavy `.bashrc` would be
paid on every SSH command, pooled or not, and would flatter the agent path.

The API signs every command and verifies every agent result, as in production: the agent gets its own
identity key, registered with the API as an install would.

The raw chain (bench/raw_chain.py) runs on the same NATS server, and every round measures a block of each
path in turn, so the ratios compare numbers taken minutes, not phases, apart. The REST client is the
standard library's `http.client` on one keep-alive connection, so the figures are the server's; a block
with httpx's blocking client shows what a heavier client library adds (about 0.5 ms here).
"""

from __future__ import annotations

import asyncio
import getpass
import http.client
import json
import os
import pwd
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncssh
import httpx

from bench.common import RAW_SUBJECT, TRUE, start_raw_chain, timed_requests
from services.api.settings import ApiSettings
from services.ctl import admin
from shared import signing
from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd
from tests.support.stack import Stack

BENCH_USER = "warlockbench"
REST_RAW = "raw chain (nats-py + websockets + subprocess)"
REST_AGENT = "REST → agent"
REST_AGENT_HTTPX = "REST → agent, httpx client"
REST_SSH = "REST → SSH worker (pooled)"
FRESH_SSH = "raw asyncssh, fresh connection per command"
POOLED_SSH = "raw asyncssh, pooled connection"
EXEC_TRUE = {"command": "true", "timeout": 10}


def plain_shell_user() -> str:
    """A login with /bin/sh as its shell: `warlockbench` (created if we are root), else the current user."""
    try:
        pwd.getpwnam(BENCH_USER)
        return BENCH_USER
    except KeyError:
        pass
    if os.geteuid() == 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", BENCH_USER], check=True)
        # "*": no password login, but not "locked" (sshd refuses locked accounts even for keys)
        subprocess.run(["usermod", "--password", "*", BENCH_USER], check=True)
        return BENCH_USER
    return getpass.getuser()


class KeepAlive:
    """One keep-alive HTTP/1.1 connection from the standard library: the leanest Python client."""

    def __init__(self, api_url: str, auth: dict[str, str]) -> None:
        host, port = api_url.removeprefix("http://").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {**auth, "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        """POST `body` as JSON; the status and the decoded answer."""
        self.conn.request("POST", path, body=json.dumps(body), headers=self.headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


Post = Callable[[str, dict[str, object]], tuple[int, dict[str, object]]]  # path, body → status, answer


def _httpx_post(http: httpx.Client) -> Post:
    def post(path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
        answer = http.post(path, json=body)
        return answer.status_code, answer.json()

    return post


def _rest_block(post: Post, host: str, n: int, via: str) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, body = post(f"/api/hosts/{host}/exec", EXEC_TRUE)
        out.append((time.perf_counter() - t0) * 1000)
        if status != 200 or body["via"] != via or body["exit_code"] != 0:
            raise RuntimeError(f"bad answer for {host}: {status} {body}")
    return out


async def _ssh_blocks(sshd: Sshd, user: str, pooled_n: int, fresh_n: int) -> dict[str, list[float]]:
    key = asyncssh.read_private_key(str(sshd.client_key_path))
    host_key = asyncssh.import_public_key(sshd.host_key_line)

    async def connect() -> asyncssh.SSHClientConnection:  # verified against the pinned key only
        return await asyncssh.connect(
            "127.0.0.1",
            sshd.port,
            username=user,
            client_keys=[key],
            known_hosts=([host_key], [], []),
            config=[],
            agent_path=None,
        )

    fresh = []
    for _ in range(fresh_n):
        t0 = time.perf_counter()
        async with await connect() as conn:
            await conn.run("true", check=True)
        fresh.append((time.perf_counter() - t0) * 1000)
    pooled = []
    async with await connect() as conn:
        for _ in range(pooled_n):
            t0 = time.perf_counter()
            await conn.run("true", check=True)
            pooled.append((time.perf_counter() - t0) * 1000)
    return {POOLED_SSH: pooled, FRESH_SSH: fresh}


async def _measure(
    api_url: str, auth: dict[str, str], nats_url: str, sshd: Sshd, user: str, rounds: int, block: int
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {REST_RAW: [], REST_AGENT: [], REST_AGENT_HTTPX: [], REST_SSH: []}
    client = KeepAlive(api_url, auth)
    try:
        with httpx.Client(base_url=api_url, headers=auth, timeout=60) as http:
            await timed_requests(nats_url, RAW_SUBJECT, TRUE, 50)  # warm up every path
            lean, heavy = client.post, _httpx_post(http)
            _rest_block(lean, "bench-agent", 50, "agent")
            _rest_block(heavy, "bench-agent", 20, "agent")
            _rest_block(lean, "bench-ssh", 20, "ssh")
            for _ in range(rounds):
                results[REST_RAW] += await timed_requests(nats_url, RAW_SUBJECT, TRUE, block)
                results[REST_AGENT] += _rest_block(lean, "bench-agent", block, "agent")
                results[REST_AGENT_HTTPX] += _rest_block(heavy, "bench-agent", block, "agent")
                results[REST_SSH] += _rest_block(lean, "bench-ssh", block, "ssh")
                for name, values in (await _ssh_blocks(sshd, user, block, max(2, block // 10))).items():
                    results.setdefault(name, []).extend(values)
    finally:
        client.close()
    return results


def rest_latency(root: Path, rounds: int, block: int, database_url: str) -> dict[str, list[float]]:
    """Run the REST stack (API on `database_url`, worker, gateway, agent, sshd) beside the raw chain in
    `root` (created); measure every path in alternating blocks."""
    user = plain_shell_user()
    root.mkdir()
    server = NatsServer(root, "nats-rest")
    sshd = Sshd(root / "sshd")
    for path, mode in (
        (root.parent, 0o711),
        (root, 0o711),
        (root / "sshd", 0o711),
        (sshd.authorized_keys_path, 0o644),
    ):
        path.chmod(mode)  # sshd reads authorized_keys as the (unprivileged) bench user
    stack = Stack(root, server.url)
    try:
        api = stack.start_api(database_url, exec_rate_limit_per_minute="0", rate_limit_per_minute="0")
        stack.start_fallback(sshd.client_key_path)
        gw = stack.start_gateway("rest-gw")
        for host, address in (("bench-agent", "127.0.0.1"), ("bench-ssh", "localhost")):
            body = {"id": host, "address": address, "ssh_port": sshd.port, "ssh_user": user}
            answer = httpx.post(f"{api.url}/api/hosts", json=body, headers=api.auth, timeout=60)
            if answer.status_code != 201:
                raise RuntimeError(f"could not add {host}: {answer.text}")
        token = stack.agent_token(api, "bench-agent")
        identity = root / "rest-agent-identity.key"  # the agent's own key; the API verifies its results
        public = signing.public_text(signing.ensure_private(identity)[0])
        settings = ApiSettings(database_url=database_url, api_key_file=root / "api-key")
        asyncio.run(admin.register_agent_key(settings, "bench-agent", public))
        stack.start_agent("rest-agent", "bench-agent", token, [gw.url], identity_key_file=str(identity))
        start_raw_chain(stack, server.url)
        time.sleep(1)
        return asyncio.run(_measure(api.url, api.auth, server.url, sshd, user, rounds, block))
    finally:
        stack.close()
        sshd.stop()
        server.stop()
