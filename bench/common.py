"""What every part of `make bench` shares: percentiles, the raw chain's processes and timed NATS requests."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import nats

from services.dev.procs import BIN, free_port
from tests.support.natsserver import role_options
from tests.support.stack import Stack

RAW = [str(BIN / "python"), "-m", "bench.raw_chain"]
RAW_SUBJECT = "warlock.agent.raw-0.exec"  # where a gateway may subscribe: the raw bridge plays one
TRUE = json.dumps({"command": "true"}).encode()


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_raw_chain(stack: Stack, nats_url: str) -> None:
    """Start the raw bridge and one raw agent (bench/raw_chain.py); it answers on RAW_SUBJECT."""
    port = free_port()
    nkey = stack.env("gateway")["WARLOCK_NATS_NKEY_FILE"]
    stack.start("raw-bridge", [*RAW, "bridge", nats_url, str(port), nkey], {}).wait_for("ready")
    stack.start("raw-agent", [*RAW, "agent", f"ws://127.0.0.1:{port}"], {}).wait_for("connected")


Body = bytes | Callable[[], bytes]  # a fixed body, or one made per request (signed, with a fresh id)


async def timed_requests(
    url: str, subject: str, body: Body, n: int, check: Callable[[bytes], None] | None = None
) -> list[float]:
    """Milliseconds of `n` sequential requests of `body` on `subject`; each reply must say exit code 0.

    A callable `body` is called inside the timed span (signing is part of the path), as is `check` on
    the reply (verifying the agent's signature, as the API does)."""
    nc = await nats.connect(url, **role_options(url, "api"))
    try:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            payload = body() if callable(body) else body
            reply = await nc.request(subject, payload, timeout=10)
            if check is not None:
                check(reply.data)
            out.append((time.perf_counter() - t0) * 1000)
            data = json.loads(reply.data)
            if data.get("exit_code") != 0:
                raise RuntimeError(f"bad reply on {subject}: {data}")
        return out
    finally:
        await nc.close()
