"""The ``warlock-fallback-ssh`` entrypoint: runs the SSH fallback worker from ``WARLOCK_*`` settings.

``warlock-fallback-ssh [--version]``. Reads ``WARLOCK_NATS_URL``, ``WARLOCK_LOG_LEVEL`` and
``WARLOCK_SSH_*`` (see `settings`). Logs ``ssh fallback worker <worker_id> ready`` once at INFO when it
serves; until NATS answers it retries every 2 s, one log line per failed attempt. Exit codes: 0 after
SIGTERM/SIGINT in any state (requests in flight finish first, up to the drain timeout), 2 for a
configuration error (one line on stderr:
``warlock-fallback-ssh: config error: <field>: <message>``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import asyncssh

from services.fallback_ssh import __version__
from services.fallback_ssh.settings import FallbackSettings, load_client_key
from services.fallback_ssh.worker import Worker
from shared.errors import ConfigError
from shared.logs import setup_logging
from shared.natsx import NatsLink
from shared.settings import load_settings

log = logging.getLogger("services.fallback_ssh")
PROG = "warlock-fallback-ssh"


def _parser() -> argparse.ArgumentParser:
    """The command-line grammar (configuration comes from the environment)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Warlock SSH fallback worker (configured by WARLOCK_SSH_* variables)"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


async def serve(
    settings: FallbackSettings, client_key: asyncssh.SSHKey, stop: asyncio.Event | None = None
) -> None:
    """Wait for NATS, serve until `stop` is set (or forever), then shut down cleanly.

    `stop` ends it in every state: while it still waits for NATS, while serving, and while NATS is down
    (requests in flight get the drain timeout; the NATS drain is bounded too).
    """
    stop = stop or asyncio.Event()
    link = NatsLink.from_settings(settings, f"{PROG}-{settings.worker_id}", log, role="ssh-worker")
    if not await link.connect(stop):
        log.info("ssh fallback worker %s stopped before NATS was reachable", settings.worker_id)
        return
    worker = Worker(link.nc, settings, client_key)
    try:
        await worker.start()
        log.info("ssh fallback worker %s ready", settings.worker_id)
        await stop.wait()
        log.info("stopping: no new requests")
        await worker.stop()
    finally:
        await worker.pool.close()
        await link.close()
    log.info("ssh fallback worker %s stopped", settings.worker_id)


async def _run(settings: FallbackSettings, client_key: asyncssh.SSHKey) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(settings, client_key, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``warlock-fallback-ssh``; returns the process exit code."""
    _parser().parse_args(argv)
    try:
        settings = load_settings(FallbackSettings)
        client_key = load_client_key(settings)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    logging.getLogger("asyncssh").setLevel(max(logging.WARNING, logging.getLogger().level))
    asyncio.run(_run(settings, client_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
