"""Warlock API service: REST API, persistence, token authority, hybrid runner; and the `warlock` CLI."""

__version__ = "0.1.0"
