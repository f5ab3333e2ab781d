"""The agent's own memory, beside the Python interpreter's floor, and what big outputs leave behind.

Rows (resident set size from /proc/<pid>/status, VmRSS, after the process settled):
- floors: the bare interpreter (`python -c` that sleeps), then with the agent's libraries imported one
  after the other: asyncio (which loads OpenSSL), the websockets client and psutil, pydantic's BaseModel.
  The last is what any agent built on these libraries pays before its own code;
- a real agent connected to a real gateway, idle, after its first metrics sample;
- the same agent after ten commands that each print 1 MiB (the default output cap), with the size of its
  ledger file: what a burst of big outputs leaves in memory and on disk.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from services.dev.procs import BIN, Proc, rss_kib
from shared import subjects
from tests.support.natsserver import NatsServer, connect
from tests.support.stack import Stack
from tests.support.trust import TestSigner

HOST = "bench-mem"
SETTLE_S = 2.0
BIG_COMMANDS = 10
# 768 KiB of random bytes in base64: just over 1 MiB of text per command, cut at the 1 MiB cap
BIG_OUTPUT = "head -c 786432 /dev/urandom | base64 -w 76"
_LIBS = ["asyncio", "websockets.asyncio.client, psutil", "pydantic.main", "nacl.signing"]
FLOORS = {
    "python -c (bare interpreter)": "",
    "+ import asyncio (loads OpenSSL)": "import " + ", ".join(_LIBS[:1]),
    "+ websockets client, psutil": "import " + ", ".join(_LIBS[:2]),
    "+ pydantic BaseModel": "import " + ", ".join(_LIBS[:3]),
    "+ PyNaCl (Ed25519): the libraries' floor": "import " + ", ".join(_LIBS),
}


@dataclass
class AgentMemory:
    """What one run of the block measured (KiB, bytes)."""

    floors: dict[str, int]
    idle_kib: int
    after_big_kib: int
    ledger_bytes: int


def _settled_rss(pid: int, seconds: float = SETTLE_S) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


def floor_rss(root: Path) -> dict[str, int]:
    """RSS (KiB) of the interpreter doing nothing, bare and with pydantic imported."""
    out: dict[str, int] = {}
    for i, (label, code) in enumerate(FLOORS.items()):
        script = f"{code}\nimport time\nprint('ready', flush=True)\ntime.sleep(3600)"
        proc = Proc(f"floor-{i}", [str(BIN / "python"), "-c", script], root)
        try:
            proc.wait_for("ready")
            out[label] = _settled_rss(proc.pid)
        finally:
            proc.stop()
    return out


async def _first_metrics(url: str, timeout: float = 30.0) -> None:
    """Wait for the agent's first metrics sample on NATS."""
    nc = await connect(url, "api")
    try:
        sub = await nc.subscribe(subjects.metrics(HOST))
        await sub.next_msg(timeout=timeout)
    finally:
        await nc.close()


async def _big_commands(url: str, count: int, signer: TestSigner) -> None:
    """Run `count` commands that each print just over 1 MiB, one after the other (signed as the API)."""
    nc = await connect(url, "api")
    try:
        plain = json.dumps({"command": BIG_OUTPUT, "timeout": 30})
        for _ in range(count):
            body = signer.exec_body(HOST, plain)
            reply = json.loads((await nc.request(subjects.agent_exec(HOST), body, timeout=40)).data)
            if reply.get("exit_code") != 0:
                raise RuntimeError(f"bad reply: {str(reply)[:300]}")
    finally:
        await nc.close()


def agent_memory(root: Path) -> AgentMemory:
    """Measure the floors, an idle agent, and the agent after ten 1 MiB-output commands."""
    floors = floor_rss(root)
    server = NatsServer(root, "nats-agent-mem")
    stack = Stack(root, server.url)
    try:
        stack.start_authority()
        gw = stack.start_gateway("mem-agent-gw")
        token = stack.add_host(HOST)
        agent = stack.start_agent("mem-agent", HOST, token, [gw.url])
        asyncio.run(_first_metrics(server.url))
        idle = _settled_rss(agent.pid)
        asyncio.run(_big_commands(server.url, BIG_COMMANDS, stack.signer))
        after = _settled_rss(agent.pid)
        ledger = root / "mem-agent-ledger.jsonl"
        return AgentMemory(floors, idle, after, ledger.stat().st_size)
    finally:
        stack.close()
        server.stop()


def print_agent_memory(m: AgentMemory) -> None:
    """Print the block as a Markdown table."""
    bare, floor = next(iter(m.floors.values())), list(m.floors.values())[-1]
    print("\n## Agent memory (RSS)\n")
    print("| process | RSS MiB | × bare interpreter |")
    print("| --- | ---: | ---: |")
    rows = [*m.floors.items(), ("agent, connected and idle (after its first metrics sample)", m.idle_kib)]
    rows.append((f"agent after {BIG_COMMANDS} commands printing 1 MiB each", m.after_big_kib))
    for label, kib in rows:
        print(f"| {label} | {kib / 1024:.1f} | {kib / bare:.2f}× |")
    print(
        f"\nThe agent's own code and models over its libraries' floor: {(m.idle_kib - floor) / 1024:.1f} MiB."
    )
    print(f"Ledger file after those commands: {m.ledger_bytes / 1024 / 1024:.2f} MiB.")
    print("Target: idle agent ≤ 25 MiB.")
