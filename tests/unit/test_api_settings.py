"""API settings: gateway URLs for installed agents, the database URL."""

from __future__ import annotations

import pytest

from services.api.settings import ApiSettings
from shared.errors import ConfigError
from shared.settings import load_settings


def test_gateway_urls_are_comma_separated_ws_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """WARLOCK_API_GATEWAY_URLS splits on commas; the default is the local gateway."""
    assert ApiSettings().gateway_url_list() == ["ws://127.0.0.1:8765/agent"]
    monkeypatch.setenv("WARLOCK_API_GATEWAY_URLS", "ws://a:8765/agent, wss://b/agent")
    assert load_settings(ApiSettings).gateway_url_list() == ["ws://a:8765/agent", "wss://b/agent"]


@pytest.mark.parametrize("value", ["http://a/agent", "", " , ", "ws://a b"])
def test_bad_gateway_urls_are_a_config_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """Anything but ws:// or wss:// URLs stops the API at start, naming the variable."""
    monkeypatch.setenv("WARLOCK_API_GATEWAY_URLS", value)
    with pytest.raises(ConfigError, match="WARLOCK_API_GATEWAY_URLS"):
        load_settings(ApiSettings)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("sqlite+aiosqlite:///:memory:", "file path"),
        ("sqlite+aiosqlite://", "file path"),
        ("sqlite:///x.db", "unsupported driver"),
        ("postgresql+psycopg2://db/warlock", "unsupported driver"),
        ("not a url", "not a database URL"),
    ],
)
def test_bad_database_urls_are_a_config_error(
    monkeypatch: pytest.MonkeyPatch, value: str, reason: str
) -> None:
    """Only a SQLite file or PostgreSQL with the async drivers; the error names the variable and why."""
    monkeypatch.setenv("WARLOCK_DATABASE_URL", value)
    with pytest.raises(ConfigError, match="WARLOCK_DATABASE_URL") as caught:
        load_settings(ApiSettings)
    assert reason in str(caught.value)


def test_good_database_urls_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default SQLite file and a PostgreSQL URL with asyncpg load as given."""
    assert ApiSettings().database_url.startswith("sqlite+aiosqlite:///")
    monkeypatch.setenv("WARLOCK_DATABASE_URL", "postgresql+asyncpg://warlock:pw@db:5432/warlock")
    assert load_settings(ApiSettings).database_url == "postgresql+asyncpg://warlock:pw@db:5432/warlock"
