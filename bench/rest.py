"""REST exec of `true` via agent, via pooled SSH, and the SSH baselines, measured side by side.

Two hosts share one real sshd on loopback: `bench-agent` (agent connected; answers `via: agent`) and
`bench-ssh` (no agent; answers `via: ssh` over the worker's pooled connection). The SSH account has a
plain `/bin/sh` login shell (user `warlockbench`, created when running as root): a heavy `.bashrc` would be
paid on every SSH command, pooled or not, and would flatter the agent path.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import pwd
import subprocess
import time
from pathlib import Path

import asyncssh
import httpx

from tests.support.natsserver import NatsServer
from tests.support.sshd import Sshd
from tests.support.stack import Stack

BENCH_USER = "warlockbench"


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


def _rest_block(http: httpx.Client, host: str, n: int, via: str) -> list[float]:
    # a blocking client on purpose: httpx's async client adds ~3 ms per request here, which would be
    # the benchmark measuring itself (nothing else runs in this process meanwhile)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        answer = http.post(f"/api/hosts/{host}/exec", json={"command": "true", "timeout": 10})
        out.append((time.perf_counter() - t0) * 1000)
        body = answer.json()
        if answer.status_code != 200 or body["via"] != via or body["exit_code"] != 0:
            raise RuntimeError(f"bad answer for {host}: {answer.status_code} {body}")
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
    return {"raw asyncssh, pooled connection": pooled, "raw asyncssh, fresh connection per command": fresh}


async def _measure(
    api_url: str, auth: dict[str, str], sshd: Sshd, user: str, rounds: int, block: int
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"REST → agent": [], "REST → SSH worker (pooled)": []}
    ssh: dict[str, list[float]] = {}
    with httpx.Client(base_url=api_url, headers=auth, timeout=60) as http:
        _rest_block(http, "bench-agent", 20, "agent")
        _rest_block(http, "bench-ssh", 20, "ssh")
        for _ in range(rounds):
            results["REST → agent"] += _rest_block(http, "bench-agent", block, "agent")
            results["REST → SSH worker (pooled)"] += _rest_block(http, "bench-ssh", block, "ssh")
            for name, values in (await _ssh_blocks(sshd, user, block, max(2, block // 10))).items():
                ssh.setdefault(name, []).extend(values)
    return {**results, **ssh}


def rest_latency(root: Path, rounds: int, block: int) -> dict[str, list[float]]:
    """Run the REST stack (API, worker, gateway, agent, sshd) and measure every path in alternating blocks."""
    user = plain_shell_user()
    server = NatsServer(root, "nats-rest")
    sshd = Sshd(root / "sshd")
    for path, mode in ((root, 0o711), (root / "sshd", 0o711), (sshd.authorized_keys_path, 0o644)):
        path.chmod(mode)  # sshd reads authorized_keys as the (unprivileged) bench user
    stack = Stack(root, server.url)
    try:
        api = stack.start_api(f"sqlite+aiosqlite:///{root / 'bench.db'}")
        stack.start_fallback(sshd.client_key_path)
        gw = stack.start_gateway("rest-gw")
        for host, address in (("bench-agent", "127.0.0.1"), ("bench-ssh", "localhost")):
            body = {"id": host, "address": address, "ssh_port": sshd.port, "ssh_user": user}
            answer = httpx.post(f"{api.url}/api/hosts", json=body, headers=api.auth, timeout=60)
            if answer.status_code != 201:
                raise RuntimeError(f"could not add {host}: {answer.text}")
        token = stack.agent_token(api, "bench-agent")
        stack.start_agent("rest-agent", "bench-agent", token, [gw.url])
        time.sleep(1)
        return asyncio.run(_measure(api.url, api.auth, sshd, user, rounds, block))
    finally:
        stack.close()
        sshd.stop()
        server.stop()
