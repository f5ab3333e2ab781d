"""End to end: a flood of bad connections leaves the gateway serving a good agent, memory bounded."""

from __future__ import annotations

import asyncio
import random

import pytest
from nats.aio.client import Client as NATS
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from services.dev.procs import rss_kib
from shared import subjects
from shared.protocol import ExecResult, decode_exec_reply
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e

MAX_FRAME = 64 * 1024


async def attempt(url: str, kind: str, token: str) -> str:
    """One bad attempt; return how the gateway refused it (HTTP status or close code)."""
    headers = {} if kind == "no-token" else {"Authorization": f"Bearer {token}"}
    if kind == "bad-token":
        headers = {"Authorization": "Bearer " + "0" * 64}
    try:
        async with connect(url, additional_headers=headers, compression=None, open_timeout=10) as ws:
            if kind == "malformed":
                await ws.send("{this is not json")
            elif kind == "unknown-type":
                await ws.send('{"type":"launch_missiles","v":1}')
            elif kind == "oversized":
                await ws.send("x" * (MAX_FRAME + 1))
            await asyncio.wait_for(ws.recv(), 10)
    except InvalidStatus as exc:
        return f"http {exc.response.status_code}"
    except ConnectionClosed as exc:
        return f"close {exc.rcvd.code if exc.rcvd else None}"
    return "not refused"


async def test_flood_of_bad_attempts(stack: Stack, nc: NATS) -> None:
    """1,000 malformed, oversized and unauthenticated attempts: each refused right, good agent unharmed."""
    stack.start_authority()
    gw = stack.start_gateway("gw-flood", max_frame_bytes=str(MAX_FRAME))
    good = stack.add_host("good")
    stack.start_agent("good", "good", good, [gw.url])
    mallory = stack.add_host("mallory")

    async def exec_good(n: int) -> None:
        body = stack.signer.exec_body("good", f'{{"command":"echo {n}"}}')
        msg = await nc.request(subjects.agent_exec("good"), body, timeout=10)
        reply = decode_exec_reply(msg.data)
        assert isinstance(reply, ExecResult)
        assert reply.stdout == f"{n}\n"

    await exec_good(0)
    await asyncio.sleep(1)
    rss_before = rss_kib(gw.proc.pid)

    expected = {
        "no-token": "http 401",
        "bad-token": "http 401",
        "malformed": "close 1007",
        "unknown-type": "close 1008",
        "oversized": "close 1009",
    }
    kinds = [random.choice(list(expected)) for _ in range(1000)]
    sem = asyncio.Semaphore(25)

    async def limited(kind: str) -> tuple[str, str]:
        async with sem:
            return kind, await attempt(gw.url, kind, mallory)

    outcomes = []
    for i in range(0, 1000, 100):
        outcomes += await asyncio.gather(*(limited(k) for k in kinds[i : i + 100]))
        await exec_good(i + 1)  # the good agent is served throughout

    wrong = [(k, got) for k, got in outcomes if got != expected[k]]
    assert not wrong, wrong[:10]
    await asyncio.sleep(1)
    grown_kib = rss_kib(gw.proc.pid) - rss_before
    assert grown_kib < 30 * 1024, f"gateway grew {grown_kib} KiB over 1,000 bad attempts"
    assert gw.proc.popen.poll() is None
    await exec_good(9999)
