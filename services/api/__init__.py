"""Warlock API service: REST API, persistence, token authority, hybrid runner; and the `warlock` CLI."""

from shared.version import __version__

__all__ = ["__version__"]
