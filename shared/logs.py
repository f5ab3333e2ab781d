"""Logging setup for entrypoints, and a per-connection context adapter.

Only entrypoints call `setup_logging`; library code takes loggers with `logging.getLogger(__name__)`.
Lifecycle goes to INFO; per-message traffic to DEBUG behind `isEnabledFor`. Never format a token into a
log line: log `shared.tokens.fingerprint` of its hash.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a process: one line per record on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party per-frame chatter stays at WARNING unless we ask for DEBUG explicitly.
    for noisy in ("websockets", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """Prefix every message with ``[key=value ...]`` of the connection it is about."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Prepend the context to `msg`."""
        extra = self.extra or {}
        context = " ".join(f"{k}={v}" for k, v in extra.items())
        return f"[{context}] {msg}", kwargs
