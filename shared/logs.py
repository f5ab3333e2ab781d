"""Logging setup for entrypoints, and a per-connection context adapter.

Only entrypoints call `setup_logging`; library code takes loggers with `logging.getLogger(__name__)`.
Lifecycle goes to INFO; per-message traffic to DEBUG behind `isEnabledFor`. Never format a token into a
log line: log `shared.tokens.fingerprint` of its hash.

``WARLOCK_LOG_FORMAT=json`` (one setting for every service, `shared.settings.WarlockSettings.log_format`)
turns every line into one JSON object: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
``extra`` fields of the record (the API's access log: method, path, status, duration_ms, key), and
``exception``: the traceback as one string field, never lines of its own. ``text`` (the default) keeps the
plain format.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_FORMATS = ("text", "json")
FORMAT_VARIABLE = "WARLOCK_LOG_FORMAT"

# What every LogRecord has: anything else on a record came in through ``extra=`` and goes into the JSON.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines inside values are escaped by JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as ``{"time", "level", "logger", "message", ...extra, "exception"?}``."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_format_from_env() -> str:
    """``json`` or ``text`` from ``WARLOCK_LOG_FORMAT`` (the settings validate it; anything else: text)."""
    value = os.environ.get(FORMAT_VARIABLE, "text").strip().lower()
    return value if value in LOG_FORMATS else "text"


def formatter_for(fmt: str) -> logging.Formatter:
    """The formatter of `fmt` (``json`` or ``text``)."""
    return JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT)


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Configure the root logger once for a process: one line per record on stderr, as `fmt` (``text`` or
    ``json``; None: ``WARLOCK_LOG_FORMAT``, so entrypoints that set the level only still follow it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(fmt if fmt is not None else log_format_from_env()))
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
