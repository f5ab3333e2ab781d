"""Swarm mode: many simulated agent sessions in one process, for benchmarks and tests.

Each simulated agent connects with its own token and signs like the real agent: its hello
(`AgentTrust.sign_hello`, checked by the gateway and the API against the host's agent key) and every
result (`AgentTrust.seal`). Its identity key is derived from its token (`swarm_key`): a simulation shortcut
that spares a key file per agent and lets a provisioning step (`tests/support/fleet.py`) register the
matching public keys without talking to the swarm. A real agent's key is made on its host and never derived.

It answers pings with pongs and execs with a canned successful result (nothing is spawned), sends a
synthetic metrics sample every ``--metrics-interval`` seconds when asked (default: none; each agent at its
own phase, its values drifting: `synthetic_sample`) and stays connected. Given several gateway URLs (a
list, or one string ``A,B``) an agent dials the first and moves to the next after every failed attempt or
ended session, as the real agent does, with the real agent's reconnect policy (`ReconnectPolicy`, initial
backoff 0.5 s). Connects go through a gate of bounded concurrency.

    warlock swarm --gateway URL --tokens FILE [--count N] [--concurrency 100] [--metrics-interval S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from services.agent import dispatch
from services.agent.backoff import Outcome, ReconnectPolicy, outcome_of_close
from services.agent.trust import AgentTrust
from shared import signing
from shared.errors import ConfigError, ProtocolError
from shared.ids import HostId, is_host_id
from shared.logs import setup_logging
from shared.protocol import (
    DiskUsage,
    Exec,
    ExecResult,
    Metrics,
    MetricsSample,
    Ping,
    Pong,
    decode_gateway_frame,
    encode,
)
from shared.tokens import is_well_formed

log = logging.getLogger("services.dev.swarm")  # also when run as __main__

REPORT_EVERY_S = 10.0
MAX_FRAME_BYTES = 1024 * 1024
BACKOFF_INITIAL_S = 0.5  # the real agent's default (`backoff_initial`)
BACKOFF_MAX_S = 30.0
SWARM_KEY_DOMAIN = b"warlock-swarm-agent-key/1\n"
CAPABILITIES = ("exec",)


def swarm_key(token: str) -> SigningKey:
    """The identity key of the simulated agent holding `token` (its seed is a hash of the token)."""
    return SigningKey(hashlib.sha256(SWARM_KEY_DOMAIN + token.encode()).digest())


def swarm_public_key(token: str) -> str:
    """``ed25519:...`` public key of `swarm_key(token)`: what the API must know for that host."""
    return signing.public_text(swarm_key(token))


def gateway_urls(url: str | list[str] | tuple[str, ...]) -> list[str]:
    """The gateway URLs of ``A,B`` (or a list); ConfigError if there is none."""
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = [u.strip() for u in parts if u.strip()]
    if not urls:
        raise ConfigError("gateway", "no gateway URL given")
    return urls


def load_tokens(path: Path, count: int | None = None) -> dict[HostId, str]:
    """Read ``{"<host_id>": "<token>", ...}`` from `path` (the first `count` entries); ConfigError if bad."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError("tokens", f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise ConfigError("tokens", f"{path}: expected a non-empty JSON object of host id to token")
    tokens: dict[HostId, str] = {}
    for host, token in data.items():
        if not is_host_id(host) or not isinstance(token, str) or not is_well_formed(token):
            raise ConfigError("tokens", f"{path}: bad entry for host {host[:80]!r}")
        tokens[HostId(host)] = token
        if count is not None and len(tokens) >= count:
            break
    return tokens


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
        return soft
    return target


class Swarm:
    """Holds one simulated session per token against the gateway URL(s)."""

    def __init__(
        self,
        url: str | list[str],
        tokens: dict[HostId, str],
        *,
        concurrency: int = 100,
        metrics_interval: float = 0.0,
    ) -> None:
        self.urls = gateway_urls(url)
        self.metrics_interval = metrics_interval  # seconds between each agent's samples; 0: none
        self.url = self.urls[0]
        self.tokens = tokens
        self.up = 0
        self.failures = 0
        self.started = 0.0  # loop time when `run` began
        self._gate = asyncio.Semaphore(concurrency)

    async def run(self) -> None:
        """Run every simulated agent (and a reporter) until cancelled."""
        raise_nofile_limit()
        self.started = asyncio.get_running_loop().time()
        log.info("swarm: starting %d sessions against %s", len(self.tokens), ",".join(self.urls))
        async with asyncio.TaskGroup() as group:
            group.create_task(self._report())
            for host, token in self.tokens.items():
                group.create_task(self._agent(host, token))

    async def _report(self) -> None:
        """Every few seconds, say how many sessions are up while some are not."""
        seen_failures = 0
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            if self.up < len(self.tokens) or self.failures != seen_failures:
                log.info("swarm: %d/%d sessions up, %d failures", self.up, len(self.tokens), self.failures)
                seen_failures = self.failures

    async def _open(self, url: str, token: str, trust: AgentTrust) -> tuple[ClientConnection | None, Outcome]:
        """Connect, say a signed hello and wait for the welcome; (None, why) counted as a failure if not."""
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                ping_interval=None,
                max_size=MAX_FRAME_BYTES,
                open_timeout=30,
                proxy=None,
            )
        except InvalidStatus as exc:
            self.failures += 1
            log.debug("swarm: %s refused by %s: HTTP %d", trust.host_id, url, exc.response.status_code)
            rejected = exc.response.status_code == 401
            return None, Outcome.AUTH_REJECTED if rejected else Outcome.CONNECT_FAILED
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self.failures += 1
            log.debug("swarm: %s cannot connect to %s: %s", trust.host_id, url, exc)
            return None, Outcome.CONNECT_FAILED
        try:
            hello = dispatch.hello(trust.host_id, CAPABILITIES, trust)
            await ws.send(encode(hello), text=True)
            async with asyncio.timeout(30):
                dispatch.expect_welcome(await ws.recv())
        except ConnectionClosed as exc:
            self.failures += 1
            log.debug("swarm: %s got no welcome: %s", trust.host_id, exc)
            await ws.close()
            return None, outcome_of_close(exc.rcvd.code if exc.rcvd is not None else None)
        except (TimeoutError, ProtocolError) as exc:
            self.failures += 1
            log.debug("swarm: %s got no welcome: %s", trust.host_id, exc)
            await ws.close()
            return None, Outcome.CONNECT_FAILED
        return ws, Outcome.CLOSED

    async def _agent(self, host: HostId, token: str) -> None:
        """One simulated agent: connect, serve, reconnect (to the next URL) forever."""
        trust = AgentTrust(host, swarm_key(token), (), max_ttl=0.0)
        policy = ReconnectPolicy(initial=BACKOFF_INITIAL_S, maximum=BACKOFF_MAX_S)
        loop = asyncio.get_running_loop()
        index = 0
        while True:
            url = self.urls[index % len(self.urls)]
            index += 1
            async with self._gate:
                ws, outcome = await self._open(url, token, trust)
            if ws is None:
                await asyncio.sleep(policy.next_delay(outcome))
                continue
            began = loop.time()
            self.up += 1
            if self.up == len(self.tokens):
                log.info("swarm: %d sessions established (%.2fs after start)", self.up, began - self.started)
            try:
                await self._serve(ws, trust)
            except ConnectionClosed:
                pass
            finally:
                self.up -= 1
                await ws.close()
            rcvd = ws.protocol.close_rcvd
            code = rcvd.code if rcvd is not None else None
            await asyncio.sleep(policy.next_delay(outcome_of_close(code), loop.time() - began))

    async def _serve(self, ws: ClientConnection, trust: AgentTrust) -> None:
        """Answer pings and execs (with a signed canned result) until the connection ends; send samples."""
        sender = asyncio.create_task(self._metrics(ws)) if self.metrics_interval > 0 else None
        try:
            await self._answer(ws, trust)
        finally:
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await sender

    async def _metrics(self, ws: ClientConnection) -> None:
        """Send a synthetic sample every `metrics_interval` seconds, starting at a random phase."""
        rng = random.Random()  # noqa: S311 (simulated load figures, not secrets)
        await asyncio.sleep(rng.uniform(0, self.metrics_interval))
        level = rng.uniform(5, 60)
        while True:
            level = min(100.0, max(0.0, level + rng.uniform(-5, 5)))
            await ws.send(encode(Metrics(sample=synthetic_sample(level, time.time()))), text=True)
            await asyncio.sleep(self.metrics_interval)

    async def _answer(self, ws: ClientConnection, trust: AgentTrust) -> None:
        """Answer pings and execs until the connection ends."""
        async for raw in ws:
            try:
                frame = decode_gateway_frame(raw)
            except ProtocolError as exc:
                await ws.close(exc.close_code, exc.message[:120])
                return
            if isinstance(frame, Ping):
                await ws.send(encode(Pong(id=frame.id)), text=True)
            elif isinstance(frame, Exec):
                started = time.perf_counter()
                result = ExecResult(
                    command_id=frame.command_id,
                    exit_code=0,
                    duration_ms=(time.perf_counter() - started) * 1000,
                )
                await ws.send(encode(trust.seal(result)), text=True)


def synthetic_sample(level: float, now: float) -> MetricsSample:
    """A plausible sample of a 4 GiB host at `level` percent CPU and about as busy in memory and disk."""
    total = 4 << 30
    used = int(total * min(95.0, 20 + level / 2) / 100)
    disk_used = int(50e9 * min(95.0, 30 + level / 4) / 100)
    return MetricsSample(
        timestamp=now,
        cpu_percent=round(level, 1),
        load_1=round(level / 25, 2),
        load_5=round(level / 30, 2),
        load_15=round(level / 35, 2),
        memory_total=total,
        memory_available=total - used,
        memory_used=used,
        memory_percent=round(used * 100 / total, 1),
        swap_total=0,
        swap_used=0,
        swap_percent=0.0,
        disks=(
            DiskUsage(
                mount="/",
                total=int(50e9),
                used=disk_used,
                free=int(50e9) - disk_used,
                percent=round(disk_used * 100 / 50e9, 1),
            ),
        ),
        net_bytes_sent=int(now * 1000) % 2**40,
        net_bytes_recv=int(now * 4000) % 2**40,
        net_packets_sent=0,
        net_packets_recv=0,
        uptime_s=3600.0,
        process_count=100,
    )


async def run_swarm(
    url: str | list[str], tokens: dict[HostId, str], concurrency: int = 100, metrics_interval: float = 0.0
) -> None:
    """Hold one session per token against `url` (one URL, ``A,B`` or a list) until cancelled."""
    await Swarm(url, tokens, concurrency=concurrency, metrics_interval=metrics_interval).run()


async def _until_signal(
    url: str, tokens: dict[HostId, str], concurrency: int, metrics_interval: float
) -> None:
    """Run the swarm until SIGTERM or SIGINT."""
    task = asyncio.create_task(run_swarm(url, tokens, concurrency, metrics_interval))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    """Run the swarm of `args` until a signal, on uvloop when it is installed (the simulator shares the
    machine with the processes the benches measure, and uvloop cuts its CPU); 0 after a clean stop, 2 for
    a bad tokens file or gateway URL."""
    try:
        tokens = load_tokens(args.tokens, args.count)
        gateway_urls(args.gateway)
        interval = float(getattr(args, "metrics_interval", 0.0) or 0.0)
        if not 0 <= interval <= 86_400 or interval != interval:
            raise ConfigError("metrics_interval", "--metrics-interval: seconds between 0 (none) and 86400")
    except ConfigError as exc:
        print(f"warlock: {exc}", file=sys.stderr)
        return 2
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    runner(_until_signal(args.gateway, tokens, args.concurrency, interval))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m services.dev.swarm``: the same as ``warlock swarm``."""
    parser = argparse.ArgumentParser(prog="python -m services.dev.swarm", description="simulated agents")
    parser.add_argument("--gateway", required=True, help="gateway WebSocket URL(s): URL or A,B")
    parser.add_argument("--tokens", type=Path, required=True, help='JSON file {"<host_id>": "<token>", ...}')
    parser.add_argument("--count", type=int, default=None, help="use only the first N tokens")
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight at once")
    parser.add_argument(
        "--metrics-interval", type=float, default=0.0, help="seconds between samples (0: none)"
    )
    args = parser.parse_args(argv)
    setup_logging(os.environ.get("WARLOCK_LOG_LEVEL", "INFO").upper())
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
