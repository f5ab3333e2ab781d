"""The ``warlock-agent`` entrypoint.

``warlock-agent --version``; ``warlock-agent run [--config PATH]``;
``warlock-agent keygen [--config PATH | --key PATH]`` (make the identity key if absent, print its public key).
(The benchmark swarm of simulated agents is `warlock swarm`, in `services.dev.swarm`.)

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for a configuration error (one line on stderr:
``warlock-agent: config error: <field>: <message>``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from shared import signing
from shared.errors import ConfigError
from shared.logs import setup_logging

from . import __version__
from .client import Agent, open_outbox
from .config import (
    DEFAULT_IDENTITY_KEY_FILE,
    AgentSettings,
    config_file,
    env_name,
    load_agent_config,
    outbox_dir,
    read_toml,
    tls_context,
)
from .ledger import Ledger
from .results import Outbox
from .tokenstore import TokenStore
from .trust import AgentTrust, load_identity

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    """The command-line grammar."""
    parser = argparse.ArgumentParser(prog="warlock-agent", description="Warlock agent")
    parser.add_argument("--version", action="version", version=f"warlock-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="connect to a gateway and serve commands")
    run.add_argument(
        "--config", type=Path, default=None, help="config file (default /etc/warlock/agent.conf)"
    )
    keygen = sub.add_parser(
        "keygen", help="create the agent's identity key if absent and print its public key (ed25519:...)"
    )
    where = keygen.add_mutually_exclusive_group()
    where.add_argument(
        "--config", type=Path, default=None, help="read identity_key_file from this config file"
    )
    where.add_argument("--key", type=Path, default=None, help="the identity key file itself")
    return parser


async def _until_signal(main: Callable[[], Coroutine[Any, Any, None]], on_stop: Callable[[], None]) -> None:
    """Run `main`; SIGTERM or SIGINT calls `on_stop` (which must make `main` return)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    try:
        await main()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _run_agent(settings: AgentSettings, ledger: Ledger, store: TokenStore, outbox: Outbox) -> None:
    """Serve as the agent until a signal stops it; the ledger is compacted and closed on the way out."""
    key = load_identity(settings.identity_key_file)
    trust = AgentTrust(settings.host_id, key, settings.trusted_keys, max_ttl=ledger.retention)
    agent = Agent(settings, ledger, token_store=store, trust=trust, tls=tls_context(settings), outbox=outbox)

    def stop() -> None:
        log.info("signal received; stopping")
        agent.stop()

    try:
        await _until_signal(agent.run, stop)
    finally:
        ledger.close()
    log.info("agent stopped")


def identity_key_path(config: Path | None, key: Path | None) -> Path:
    """Where `keygen` finds the identity key: --key; else the variable; else the config file's key; else
    the default."""
    if key is not None:
        return key
    for name, value in os.environ.items():
        if name.upper() == env_name("identity_key_file"):
            return Path(value)
    file = config_file(config)
    if file is not None:
        configured = read_toml(file).get("identity_key_file")
        if configured is not None:
            return Path(str(configured))
    return DEFAULT_IDENTITY_KEY_FILE


def keygen(config: Path | None, key: Path | None) -> int:
    """Create the identity key if it is absent; print its public key on stdout."""
    path = identity_key_path(config, key)
    print(signing.public_text(load_identity(path)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``warlock-agent``; returns the process exit code."""
    args = _parser().parse_args(argv)
    setup_logging(os.environ.get("WARLOCK_LOG_LEVEL", "INFO").upper())
    try:
        if args.command == "keygen":
            return keygen(args.config, args.key)
        settings, store = load_agent_config(args.config)
        setup_logging(settings.log_level)
        ledger = Ledger(
            settings.ledger_path,
            output_bytes=settings.ledger_output_bytes,
            max_bytes=settings.ledger_max_bytes,
        )
        try:
            ledger.open()
        except OSError as exc:
            raise ConfigError(
                "ledger_path", f"cannot open {settings.ledger_path}: {exc.strerror or exc}"
            ) from exc
        try:
            outbox = open_outbox(settings)
        except OSError as exc:
            ledger.close()
            raise ConfigError(
                f"outbox_path ({env_name('outbox_path')})",
                f"cannot open {outbox_dir(settings)}: {exc.strerror or exc}",
            ) from exc
        asyncio.run(_run_agent(settings, ledger, store, outbox))
    except ConfigError as exc:
        print(f"warlock-agent: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
