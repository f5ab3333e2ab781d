"""Helpers for the gateway integration tests: a real nats-server, token authority, gateway and fake agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.micro.service import Service
from websockets.asyncio.client import ClientConnection, connect

from services.dev.token_file import serve_token_file
from services.gateway.server import Gateway
from services.gateway.session import KEEPALIVE_PREFIX
from services.gateway.settings import GatewaySettings
from shared import subjects
from shared.protocol import (
    GatewayFrame,
    Hello,
    Message,
    Ping,
    Pong,
    TokenVerifyRequest,
    Welcome,
    decode_gateway_frame,
    encode,
)
from shared.tokens import generate_token, hash_token
from tests.support import natsserver as ns


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def nats_server(log_dir: Path) -> Iterator[str]:
    """Run a nats-server enforcing the permission matrix on a free loopback port; yield its URL
    (`tests.support.natsserver.connect(url, role)` connects to it as a role)."""
    server = ns.NatsServer(log_dir)
    try:
        yield server.url
    finally:
        server.stop()


class Fleet:
    """Hosts and their tokens, written to a token file the dev authority serves."""

    def __init__(self, path: Path, hosts: tuple[str, ...]) -> None:
        self.path = path
        self.tokens = {host: generate_token() for host in hosts}
        self.write()

    def write(self) -> None:
        """(Re)write the token file atomically."""
        body = {"hosts": {host: hash_token(token) for host, token in self.tokens.items()}}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(self.path)


@contextlib.asynccontextmanager
async def token_authority(nats_url: str, path: Path) -> AsyncIterator[Service]:
    """Serve the token file on NATS (as the ``api`` role) for the duration of the block."""
    nc = await ns.connect(nats_url, "api")
    try:
        service = await serve_token_file(nc, path)
        await answers_token_checks(nats_url)
        yield service
        await service.stop()
    finally:
        await nc.close()


async def answers_token_checks(nats_url: str, within: float = 10.0) -> None:
    """Wait until a token check from another connection (as a gateway asks) gets an answer: the
    authority's subscription is then known to the server for every client, not only its own."""
    probe = await ns.connect(nats_url, "gateway")
    try:
        body = encode(TokenVerifyRequest(token_sha256=hash_token(generate_token())))
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                await probe.request(subjects.TOKEN_VERIFY, body, timeout=1)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.05)
    finally:
        await probe.close()


@contextlib.asynccontextmanager
async def running_gateway(nats_url: str, **overrides: Any) -> AsyncIterator[Gateway]:
    """Run a gateway in-process on an ephemeral port, connected as the ``gateway`` role."""
    values: dict[str, Any] = {"nats_url": nats_url, "port": 0, "drain_timeout": 2.0, "close_timeout": 1.0}
    server = ns.server_at(nats_url)
    if server is not None:
        values["nats_nkey_file"] = server.nkey_file("gateway")
    values.update(overrides)
    settings = GatewaySettings(**values)
    nc = await ns.connect(nats_url, "gateway")
    gateway = Gateway(nc, settings)
    try:
        await gateway.start()
        yield gateway
    finally:
        await gateway.stop()
        await nc.close()


def agent_url(gateway: Gateway, path: str = "/agent") -> str:
    """The WebSocket URL of `gateway`."""
    return f"ws://127.0.0.1:{gateway.port}{path}"


def hello(host: str) -> Hello:
    """A Hello for `host`."""
    return Hello(host_id=host, hostname=f"{host}.test", platform="linux", agent_version="9.9.9")


class FakeAgent:
    """A WebSocket client playing the agent; frames are read with `recv`, keepalive pings answered."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.welcome: Welcome | None = None

    async def send(self, frame: Message) -> None:
        """Send a protocol frame."""
        await self.ws.send(encode(frame), text=True)

    async def recv(self, timeout: float = 5.0) -> GatewayFrame:
        """The next frame that is not a keepalive Ping (those are answered)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = decode_gateway_frame(await self.ws.recv())
                if isinstance(frame, Ping) and (frame.id is None or frame.id.startswith(KEEPALIVE_PREFIX)):
                    await self.send(Pong(id=frame.id))
                    continue
                return frame

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Wait for the connection to close; return the code the gateway sent."""
        async with asyncio.timeout(timeout):
            await self.ws.wait_closed()
        return self.ws.close_code


@contextlib.asynccontextmanager
async def agent(gateway: Gateway, host: str, token: str, say_hello: bool = True) -> AsyncIterator[FakeAgent]:
    """Connect as `host` with `token`; with `say_hello`, send Hello and wait for Welcome."""
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(agent_url(gateway), additional_headers=headers, compression=None) as ws:
        fake = FakeAgent(ws)
        if say_hello:
            await fake.send(hello(host))
            frame = await fake.recv()
            assert isinstance(frame, Welcome), frame
            fake.welcome = frame
        yield fake


async def synced(nc: NATS) -> None:
    """Wait until the server processed everything `nc` sent (nats-py 2.16's PING can overtake a SUB)."""
    await nc.flush()
    await nc.flush()


async def api_client(nats_url: str, role: str = "api") -> NATS:
    """A NATS client playing the API (or another `role`)."""
    return await ns.connect(nats_url, role)
