"""Warlock gateway: a stateless WebSocket server that bridges each connected agent into NATS."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def gateway_version() -> str:
    """The installed Warlock version (``0.0.0`` when running from an uninstalled tree)."""
    try:
        return version("warlock")
    except PackageNotFoundError:
        return "0.0.0"
