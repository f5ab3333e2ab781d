"""Dev token authority: answers ``warlock.auth.verify`` from a JSON file of token hashes.

The file is ``{"hosts": {"<host_id>": "<sha256 hex of the token>"}}``; it is re-read when it changes
(mtime, size or inode), so a regenerated token takes effect at the next upgrade. `make run` starts this
until the API takes the role. No token is ever read or logged here: only hashes, and their fingerprints.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Annotated

import nats
import nats.errors
from nats import micro
from nats.aio.client import Client as NATS
from nats.micro.request import Handler, Request
from nats.micro.service import Service
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared import subjects
from shared.errors import ConfigError, ErrorCode, ProtocolError
from shared.ids import HostId, HostIdField
from shared.natsx import NatsLink, error, respond
from shared.protocol import TokenOk, TokenVerifyRequest, decode_model
from shared.tokens import fingerprint, hashes_equal
from shared.version import __version__

log = logging.getLogger(__name__)
SERVICE_NAME = "warlock-token-authority"
SERVICE_VERSION = __version__

TokenHash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class TokenFileModel(BaseModel):
    """The token file's content."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    hosts: dict[HostIdField, TokenHash] = {}


class TokenFile:
    """Host token hashes from a JSON file, re-read whenever the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._hosts: dict[HostId, str] = {}

    def load(self) -> None:
        """Read the file now; raise ConfigError when it is missing or invalid."""
        try:
            stat = self.path.stat()
            model = TokenFileModel.model_validate_json(self.path.read_bytes())
        except OSError as exc:
            raise ConfigError("token file", f"{self.path}: {exc.strerror or exc}") from exc
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "file"
            raise ConfigError("token file", f"{self.path}: {where}: {first['msg']}") from exc
        self._hosts = dict(model.hosts)
        self._stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        log.info("token file %s: %d hosts", self.path, len(self._hosts))

    def refresh(self) -> None:
        """Re-read the file if it changed; a broken file keeps the previous hosts (logged)."""
        try:
            stat = self.path.stat()
        except OSError as exc:
            log.warning("token file %s unreadable: %s", self.path, exc.strerror or exc)
            return
        if (stat.st_mtime_ns, stat.st_size, stat.st_ino) == self._stamp:
            return
        try:
            self.load()
        except ConfigError as exc:
            log.warning("%s; keeping the previous %d hosts", exc, len(self._hosts))

    def lookup(self, token_hash: str) -> HostId | None:
        """The host whose stored hash equals `token_hash` (every entry compared in constant time)."""
        self.refresh()
        found: HostId | None = None
        for host, stored in self._hosts.items():
            if hashes_equal(stored, token_hash):
                found = host
        return found


def verify_handler(tokens: TokenFile) -> Handler:
    """The micro handler answering TokenVerifyRequest with TokenOk or a typed error."""

    async def handle(request: Request) -> None:
        try:
            query = decode_model(TokenVerifyRequest, request.data)
        except ProtocolError as exc:
            await respond(request, error(ErrorCode.BAD_REQUEST, exc.message))
            return
        host = tokens.lookup(query.token_sha256)
        if host is None:
            log.info("unknown token %s", fingerprint(query.token_sha256))
            await respond(request, error(ErrorCode.UNAUTHORIZED, "unknown token"))
            return
        if log.isEnabledFor(logging.DEBUG):
            log.debug("token %s is host %s", fingerprint(query.token_sha256), host)
        await respond(request, TokenOk(host_id=host))

    return handle


async def serve_token_file(nc: NATS, path: str | os.PathLike[str]) -> Service:
    """Load `path` and answer token checks on NATS; stop with ``await service.stop()``."""
    tokens = TokenFile(path)
    tokens.load()
    service = await micro.add_service(
        nc, name=SERVICE_NAME, version=SERVICE_VERSION, description="dev token authority (token file)"
    )
    await service.add_endpoint(
        name="verify",
        subject=subjects.TOKEN_VERIFY,
        queue_group=subjects.AUTH_QUEUE,
        handler=verify_handler(tokens),
    )
    await nc.flush()
    return service


async def run_token_authority(
    nats_url: str,
    path: str | os.PathLike[str],
    stop: asyncio.Event | None = None,
    *,
    nkey_file: Path | None = None,
    ca_file: Path | None = None,
) -> int:
    """Serve the token file until SIGTERM/SIGINT (or `stop` is set); return the exit code.

    It connects to NATS as the ``api`` role (the only one that may answer ``warlock.auth.verify``), with
    `nkey_file` and, when given, TLS against `ca_file`.
    """
    try:
        TokenFile(path).load()
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    servers = [u.strip() for u in nats_url.split(",") if u.strip()]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link = NatsLink(servers, "warlock-token-authority", log, "api", nkey_file, ca_file)
    try:
        if not await link.connect(stop):
            return 0
        service = await serve_token_file(link.nc, path)
        log.info("token authority ready")
        await stop.wait()
        with contextlib.suppress(nats.errors.Error):
            await service.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await link.close()
    return 0
