"""Probe a new host: fetch its host key (trust on first use), then prove the worker's key logs in."""

from __future__ import annotations

import asyncio
import logging

import asyncssh

from services.fallback_ssh.errors import ConnectFailed, ExecFailed, connect_error
from services.fallback_ssh.pool import dial
from services.fallback_ssh.settings import FallbackSettings
from shared.protocol import SshProbeOk, SshProbeRequest

log = logging.getLogger(__name__)


def key_line(key: asyncssh.SSHKey) -> str:
    """The OpenSSH public key line of `key`: ``<type> <base64>`` (no comment)."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


async def fetch_host_key(address: str, port: int, settings: FallbackSettings) -> asyncssh.SSHKey:
    """The key the server presents in its handshake (no authentication); SshError if unreachable."""
    where = f"{address}:{port}"
    try:
        async with asyncio.timeout(settings.connect_timeout):
            key = await asyncssh.get_server_host_key(address, port, config=[])
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        raise connect_error(exc, where) from exc
    if key is None:
        raise ConnectFailed(f"{where}: server presented no host key")
    return key


async def probe(
    request: SshProbeRequest, client_key: asyncssh.SSHKey, settings: FallbackSettings
) -> SshProbeOk:
    """Fetch the host key, then log in with it pinned and run ``true``; return the key to pin."""
    host_key = await fetch_host_key(request.address, request.port, settings)
    conn = await dial(request.address, request.port, request.username, host_key, client_key, settings)
    try:
        async with asyncio.timeout(settings.connect_timeout):
            result = await conn.run("true", check=False)
    except (TimeoutError, OSError, asyncssh.Error) as exc:
        raise ExecFailed(f"{request.address}:{request.port}: logged in but could not run 'true'") from exc
    finally:
        conn.close()
        await conn.wait_closed()
    if result.exit_status != 0:
        raise ExecFailed(f"{request.address}:{request.port}: 'true' exited with {result.returncode}")
    fingerprint = host_key.get_fingerprint("sha256")
    log.info("probed %s@%s:%s: host key %s", request.username, request.address, request.port, fingerprint)
    return SshProbeOk(host_key=key_line(host_key), fingerprint=fingerprint)
