"""Agent configuration: TOML file, environment overrides, errors that name the field."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from services.agent import config
from services.agent.config import AgentSettings, load_config
from shared import signing
from shared.errors import ConfigError

TOKEN = "ab" * 32
API_KEY = signing.public_text(signing.generate())


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No WARLOCK_* variable from the outer environment leaks into these tests; no default file."""
    import os

    for name in list(os.environ):
        if name.startswith("WARLOCK_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.conf")


def write_conf(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    """Write a config file with `mode` and return its path."""
    path = tmp_path / "agent.conf"
    path.write_text(text)
    path.chmod(mode)
    return path


GOOD = (
    f'host_id = "web-1"\ntoken = "{TOKEN}"\ngateway_urls = ["ws://127.0.0.1:1/agent"]\n'
    f'trusted_keys = ["{API_KEY}"]\n'
)


def test_toml_file_is_read(tmp_path: Path) -> None:
    """Values come from the TOML file; unspecified fields keep their defaults."""
    settings = load_config(write_conf(tmp_path, GOOD + "metrics_interval = 5\n"))
    assert settings.host_id == "web-1"
    assert settings.token.get_secret_value() == TOKEN
    assert settings.gateway_urls == ["ws://127.0.0.1:1/agent"]
    assert settings.metrics_interval == 5
    assert settings.max_output_bytes == 1024 * 1024
    assert settings.ledger_path == Path("/var/lib/warlock-agent/ledger.jsonl")
    assert settings.trusted_keys == [API_KEY]
    assert settings.identity_key_file == Path("/etc/warlock/agent.key")
    assert (settings.ca_file, settings.insecure) == (None, False)


def test_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A WARLOCK_AGENT_* variable overrides the same key in the file; URLs may be comma-separated."""
    monkeypatch.setenv("WARLOCK_AGENT_METRICS_INTERVAL", "7.5")
    monkeypatch.setenv("WARLOCK_AGENT_GATEWAY_URLS", "ws://localhost:1/agent, wss://b:2/agent")
    settings = load_config(write_conf(tmp_path, GOOD + "metrics_interval = 5\n"))
    assert settings.metrics_interval == 7.5
    assert settings.gateway_urls == ["ws://localhost:1/agent", "wss://b:2/agent"]


def test_environment_alone_without_default_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no file at the default path, the environment is enough."""
    monkeypatch.setenv("WARLOCK_AGENT_HOST_ID", "db-2")
    monkeypatch.setenv("WARLOCK_AGENT_TOKEN", TOKEN)
    monkeypatch.setenv("WARLOCK_AGENT_GATEWAY_URLS", '["wss://gw:8765/agent"]')
    monkeypatch.setenv("WARLOCK_AGENT_TRUSTED_KEYS", f'["{API_KEY}"]')
    settings = load_config(None)
    assert settings.host_id == "db-2"
    assert settings.gateway_urls == ["wss://gw:8765/agent"]
    assert settings.trusted_keys == [API_KEY]


def test_bad_value_names_the_field(tmp_path: Path) -> None:
    """A bad value raises ConfigError naming the field and its environment variable."""
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, GOOD + 'ping_interval = "soon"\n'))
    assert info.value.field.startswith("ping_interval")
    assert "WARLOCK_AGENT_PING_INTERVAL" in info.value.field


def test_bad_url_scheme_names_the_field(tmp_path: Path) -> None:
    """An http:// gateway URL is refused, naming gateway_urls."""
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, GOOD.replace("ws://", "http://")))
    assert info.value.field.startswith("gateway_urls")


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    """A misspelt key in the file is an error naming it."""
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, GOOD + "metrics_intreval = 5\n"))
    assert "metrics_intreval" in info.value.field


def test_missing_explicit_file(tmp_path: Path) -> None:
    """An explicitly given config path that does not exist is an error."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.conf")
    assert info.value.field == "config"
    assert "nope.conf" in info.value.message


def test_toml_syntax_error(tmp_path: Path) -> None:
    """Broken TOML is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, "host_id = \n"))
    assert "invalid TOML" in info.value.message


@pytest.mark.parametrize("token", ["AB" * 32, "ab" * 31, "zz" * 32, ""])
def test_bad_token_shape_is_refused_without_echo(tmp_path: Path, token: str) -> None:
    """A token that is not 64 lowercase hex is refused, and the message does not contain it."""
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, GOOD.replace(TOKEN, token)))
    assert info.value.field.startswith("token")
    assert not token or token not in str(info.value)


def test_readable_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A config file readable by others is accepted with a warning (it holds the token)."""
    with caplog.at_level(logging.WARNING, logger="services.agent.config"):
        load_config(write_conf(tmp_path, GOOD, mode=0o644))
    assert any("readable by group or others" in r.getMessage() for r in caplog.records)


def test_private_file_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 0600 config file loads without the permission warning."""
    with caplog.at_level(logging.WARNING, logger="services.agent.config"):
        load_config(write_conf(tmp_path, GOOD, mode=0o600))
    assert not caplog.records


def test_repr_hides_token() -> None:
    """The token never shows in the settings' repr."""
    settings = AgentSettings(
        host_id="h", token=TOKEN, gateway_urls=["wss://x:1/agent"], trusted_keys=[API_KEY]
    )
    assert TOKEN not in repr(settings)


def test_log_level_and_variable_names_in_any_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WARLOCK_LOG_LEVEL sets the log level; agent variables match whatever their case."""
    monkeypatch.setenv("WARLOCK_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("warlock_agent_ping_interval", "3")
    settings = load_config(write_conf(tmp_path, GOOD + 'log_level = "ERROR"\n'))
    assert (settings.log_level, settings.ping_interval) == ("DEBUG", 3)
    monkeypatch.setenv("WARLOCK_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, GOOD))
    assert info.value.field == "log_level (WARLOCK_LOG_LEVEL)"


def test_agent_does_not_import_pydantic_settings() -> None:
    """The agent's entrypoint loads without pydantic-settings (its import alone costs ~3.5 MiB of RSS)."""
    code = "import sys, services.agent.cli; print('pydantic_settings' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_trusted_keys_are_required(tmp_path: Path) -> None:
    """No trusted_keys (or an empty list) is a config error naming the field and its variable."""
    without = GOOD.replace(f'trusted_keys = ["{API_KEY}"]\n', "")
    for text in (without, without + "trusted_keys = []\n"):
        with pytest.raises(ConfigError) as info:
            load_config(write_conf(tmp_path, text))
        assert info.value.field == "trusted_keys (WARLOCK_AGENT_TRUSTED_KEYS)"


@pytest.mark.parametrize("bad", ["ed25519:AAAA", "rsa:abc", "ed25519:" + "!" * 43])
def test_a_trusted_key_that_does_not_parse_is_named(tmp_path: Path, bad: str) -> None:
    """Each trusted key must parse; the error says which one."""
    text = GOOD.replace(f'trusted_keys = ["{API_KEY}"]', f'trusted_keys = ["{API_KEY}", "{bad}"]')
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, text))
    assert info.value.field.startswith("trusted_keys")
    assert "key 2" in info.value.message
    assert bad[:20] in info.value.message


@pytest.mark.parametrize(
    "url", ["ws://127.0.0.1:1/agent", "ws://127.9.9.9:1/agent", "ws://[::1]:1/agent", "ws://localhost/agent"]
)
def test_plain_ws_to_loopback_is_allowed(tmp_path: Path, url: str) -> None:
    """ws:// to a loopback address needs no `insecure`."""
    text = GOOD.replace("ws://127.0.0.1:1/agent", url)
    assert load_config(write_conf(tmp_path, text)).gateway_urls == [url]


@pytest.mark.parametrize("url", ["ws://10.0.0.5:8765/agent", "ws://gw.example/agent", "ws://0.0.0.0:1/agent"])
def test_plain_ws_elsewhere_needs_insecure(tmp_path: Path, url: str) -> None:
    """ws:// to anything but loopback is a config error naming gateway_urls, unless insecure = true."""
    text = GOOD.replace("ws://127.0.0.1:1/agent", url)
    with pytest.raises(ConfigError) as info:
        load_config(write_conf(tmp_path, text))
    assert info.value.field.startswith("gateway_urls")
    assert "insecure" in info.value.message
    assert "wss://" in info.value.message
    settings = load_config(write_conf(tmp_path, text + "insecure = true\n"))
    assert settings.gateway_urls == [url]
    assert settings.insecure


def test_ca_file_is_pinned_and_a_bad_one_is_a_config_error(tmp_path: Path) -> None:
    """tls_context trusts exactly the CA in ca_file; an unreadable or non-PEM file is a config error."""
    import ssl

    import trustme

    ca = trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    settings = load_config(write_conf(tmp_path, GOOD + f'ca_file = "{pem}"\n'))
    context = config.tls_context(settings)
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1
    assert config.tls_context(load_config(write_conf(tmp_path, GOOD))) is None
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    for path in (junk, tmp_path / "missing.pem"):
        settings = load_config(write_conf(tmp_path, GOOD + f'ca_file = "{path}"\n'))
        with pytest.raises(ConfigError) as info:
            config.tls_context(settings)
        assert info.value.field == "ca_file (WARLOCK_AGENT_CA_FILE)"
