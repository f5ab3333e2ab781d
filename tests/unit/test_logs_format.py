"""WARLOCK_LOG_FORMAT: one JSON object per line (exception as a field), or the plain text lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from services.api.settings import ApiSettings
from services.fallback_ssh.settings import FallbackSettings
from services.gateway.settings import GatewaySettings
from shared.errors import ConfigError
from shared.logs import FORMAT, JsonFormatter, setup_logging
from shared.settings import NatsSettings, load_settings


@pytest.fixture
def restore_root() -> Iterator[None]:
    """Put the root logger back as it was (setup_logging replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("services.test")
    info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            import sys

            info = sys.exc_info()
    return logger.makeRecord("services.test", logging.WARNING, __file__, 1, msg, args, info, extra=extra)


def test_json_line_has_time_level_logger_message_and_extras() -> None:
    line = JsonFormatter().format(record("ran %s in %d ms", "x\ny", 5, method="GET", status=200))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "services.test"
    assert entry["message"] == "ran x\ny in 5 ms"  # a newline in a value is escaped, not a line break
    assert entry["time"].endswith("+00:00")
    assert (entry["method"], entry["status"]) == ("GET", 200)
    assert "exception" not in entry
    assert "args" not in entry
    assert "msg" not in entry


def test_exception_is_one_field_never_lines_of_its_own() -> None:
    line = JsonFormatter().format(record("failed", exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert "Traceback (most recent call last)" in entry["exception"]
    assert "ValueError: boom\nsecond line" in entry["exception"]


def test_unserialisable_extra_is_written_as_text() -> None:
    entry = json.loads(JsonFormatter().format(record("x", thing=object())))
    assert entry["thing"].startswith("<object object")


@pytest.mark.usefixtures("restore_root")
@pytest.mark.parametrize(
    ("fmt", "env", "is_json"), [("json", None, True), (None, "json", True), (None, None, False)]
)
def test_setup_logging_takes_the_format_or_the_variable(
    fmt: str | None, env: str | None, is_json: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv("WARLOCK_LOG_FORMAT", raising=False)
    else:
        monkeypatch.setenv("WARLOCK_LOG_FORMAT", env)
    setup_logging("INFO", fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler.formatter, JsonFormatter) is is_json
    if not is_json:
        assert handler.formatter is not None
        assert handler.formatter._fmt == FORMAT


@pytest.mark.usefixtures("restore_root")
def test_a_json_process_writes_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    setup_logging("INFO", "json")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    monkeypatch.setattr(handler, "stream", stream)
    log = logging.getLogger("services.x")
    log.info("one")
    try:
        raise RuntimeError("two")
    except RuntimeError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    entries = [json.loads(line) for line in lines]
    assert [e["message"] for e in entries] == ["one", "failed"]
    assert "RuntimeError: two" in entries[1]["exception"]


@pytest.mark.parametrize("cls", [NatsSettings, ApiSettings, GatewaySettings])
def test_one_setting_for_every_service(cls: type[NatsSettings], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARLOCK_LOG_FORMAT", "json")
    assert load_settings(cls).log_format == "json"
    monkeypatch.setenv("WARLOCK_LOG_FORMAT", "yaml")
    with pytest.raises(ConfigError, match="WARLOCK_LOG_FORMAT"):
        load_settings(cls)


def test_ssh_worker_takes_it_too(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "log_format" in FallbackSettings.model_fields
    assert FallbackSettings.model_fields["log_format"].default == "text"
