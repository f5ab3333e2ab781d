"""Swarm mode: many simulated agent sessions in one process, for the gateway memory benchmark.

Each simulated agent connects with its own token, says hello, answers pings with pongs and execs with a
canned successful result (nothing is spawned), sends no metrics and stays connected, reconnecting with
backoff if it is dropped. Connects go through a gate of bounded concurrency.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from shared.errors import ConfigError, ProtocolError
from shared.ids import HostId, is_host_id
from shared.protocol import Exec, ExecResult, Ping, Pong, decode_gateway_frame, encode
from shared.tokens import is_well_formed

from . import dispatch
from .backoff import ReconnectPolicy

log = logging.getLogger(__name__)

REPORT_EVERY_S = 10.0
MAX_FRAME_BYTES = 1024 * 1024


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
    """Holds one simulated session per token against one gateway URL."""

    def __init__(self, url: str, tokens: dict[HostId, str], *, concurrency: int = 100) -> None:
        self.url = url
        self.tokens = tokens
        self.up = 0
        self.failures = 0
        self._gate = asyncio.Semaphore(concurrency)
        self._hostname = socket.gethostname()[:255]

    async def run(self) -> None:
        """Run every simulated agent (and a reporter) until cancelled."""
        raise_nofile_limit()
        log.info("swarm: starting %d sessions against %s", len(self.tokens), self.url)
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

    async def _open(self, host: HostId, token: str) -> ClientConnection | None:
        """Connect, say hello and wait for the welcome; None (counted as a failure) if that fails."""
        try:
            ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                ping_interval=None,
                max_size=MAX_FRAME_BYTES,
                open_timeout=30,
                proxy=None,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self.failures += 1
            log.debug("swarm: %s cannot connect: %s", host, exc)
            return None
        try:
            hello = dispatch.hello(host, ("exec",))
            await ws.send(encode(hello), text=True)
            async with asyncio.timeout(30):
                dispatch.expect_welcome(await ws.recv())
        except (ConnectionClosed, TimeoutError, ProtocolError) as exc:
            self.failures += 1
            log.debug("swarm: %s got no welcome: %s", host, exc)
            await ws.close()
            return None
        return ws

    async def _agent(self, host: HostId, token: str) -> None:
        """One simulated agent: connect, serve, reconnect forever."""
        policy = ReconnectPolicy(initial=1.0, maximum=30.0)
        while True:
            async with self._gate:
                ws = await self._open(host, token)
            if ws is None:
                await asyncio.sleep(policy.backoff())
                continue
            policy.reset()
            self.up += 1
            if self.up == len(self.tokens):
                log.info("swarm: %d sessions established", self.up)
            try:
                await self._serve(ws)
            except ConnectionClosed:
                pass
            finally:
                self.up -= 1
                await ws.close()
            await asyncio.sleep(policy.backoff())

    async def _serve(self, ws: ClientConnection) -> None:
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
                await ws.send(encode(result), text=True)


async def run_swarm(url: str, tokens: dict[HostId, str], concurrency: int = 100) -> None:
    """Hold one session per token against `url` until cancelled."""
    await Swarm(url, tokens, concurrency=concurrency).run()
