"""Unit tests of the gateway settings added for failover: accept backlog and send timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.gateway.session import Pending
from services.gateway.settings import GatewaySettings, somaxconn
from shared.errors import ConfigError
from shared.ids import CommandId
from shared.settings import load_settings


def test_defaults() -> None:
    """A bigger accept queue than asyncio's 100, and a send timeout of a few seconds."""
    settings = GatewaySettings()
    assert settings.backlog == 1024
    assert settings.send_timeout == 5.0


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("WARLOCK_GATEWAY_BACKLOG", "0", "backlog"),
        ("WARLOCK_GATEWAY_BACKLOG", "65536", "backlog"),
        ("WARLOCK_GATEWAY_BACKLOG", "many", "backlog"),
        ("WARLOCK_GATEWAY_SEND_TIMEOUT", "0", "send_timeout"),
        ("WARLOCK_GATEWAY_SEND_TIMEOUT", "-1", "send_timeout"),
        ("WARLOCK_GATEWAY_SEND_TIMEOUT", "301", "send_timeout"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str
) -> None:
    """A bad value is a ConfigError naming the field and its environment variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings(GatewaySettings)
    assert info.value.field == f"{field} ({variable})"


def test_good_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both settings are read from their variables."""
    monkeypatch.setenv("WARLOCK_GATEWAY_BACKLOG", "4096")
    monkeypatch.setenv("WARLOCK_GATEWAY_SEND_TIMEOUT", "2.5")
    settings = load_settings(GatewaySettings)
    assert (settings.backlog, settings.send_timeout) == (4096, 2.5)


def test_somaxconn(tmp_path: Path) -> None:
    """The kernel's cap is read from procfs; unreadable or garbage is unknown (None)."""
    cap = tmp_path / "somaxconn"
    cap.write_text("4096\n")
    assert somaxconn(cap) == 4096
    cap.write_text("lots")
    assert somaxconn(cap) is None
    assert somaxconn(tmp_path / "missing") is None


async def test_a_pending_command_starts_unsent() -> None:
    """Until its Exec frame is handed to the connection a command cannot have run (`unavailable` if its
    session ends then)."""
    pending = Pending(CommandId("c-1"), asyncio.get_running_loop().create_future())
    assert pending.sent is False
