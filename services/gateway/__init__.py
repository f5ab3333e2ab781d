"""Warlock gateway: a stateless WebSocket server that bridges each connected agent into NATS."""

from __future__ import annotations

from shared.version import __version__


def gateway_version() -> str:
    """This build's version (`shared.version`, which the package metadata is made from)."""
    return __version__
