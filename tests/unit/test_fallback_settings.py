"""Fallback worker settings, key loading and pool-key rules (no network)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh
import pytest

from services.fallback_ssh.errors import TargetRefused
from services.fallback_ssh.pool import host_key_algs, pinned_key, pool_key
from services.fallback_ssh.settings import FallbackSettings, default_worker_id, load_client_key
from shared import signing
from shared.errors import ConfigError
from shared.protocol import SshTarget
from shared.settings import load_settings

API_KEYS = [signing.public_text(signing.generate()) for _ in range(2)]


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    """A fresh passphrase-less ed25519 private key."""
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_defaults_and_env(monkeypatch: pytest.MonkeyPatch, key_file: Path) -> None:
    """WARLOCK_SSH_* variables configure the worker; documented defaults apply otherwise."""
    monkeypatch.setenv("WARLOCK_SSH_KEY_FILE", str(key_file))
    monkeypatch.setenv("WARLOCK_SSH_TRUSTED_KEYS", API_KEYS[0])
    monkeypatch.setenv("WARLOCK_SSH_MAX_CHANNELS_PER_HOST", "3")
    monkeypatch.setenv("WARLOCK_NATS_URL", "nats://127.0.0.1:4999")
    settings = load_settings(FallbackSettings)
    assert settings.key_file == key_file
    assert settings.max_channels_per_host == 3
    assert settings.nats_servers() == ["nats://127.0.0.1:4999"]
    assert (settings.connect_timeout, settings.idle_timeout) == (10.0, 60.0)
    assert settings.max_output_bytes == 1024 * 1024
    assert settings.trusted_keys == [API_KEYS[0]]
    assert (settings.max_command_ttl, settings.replay_capacity) == (600.0, 200_000)


@pytest.mark.parametrize(
    "value", [",".join(API_KEYS), f" {API_KEYS[0]} , {API_KEYS[1]} ", f'["{API_KEYS[0]}", "{API_KEYS[1]}"]']
)
def test_trusted_keys_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch, key_file: Path, value: str
) -> None:
    """WARLOCK_SSH_TRUSTED_KEYS: comma-separated or a JSON list."""
    monkeypatch.setenv("WARLOCK_SSH_TRUSTED_KEYS", value)
    assert load_settings(FallbackSettings, key_file=key_file).trusted_keys == API_KEYS


@pytest.mark.parametrize("value", [None, "", " , ", "[]", "[not json", "ed25519:AAAA", "ssh-ed25519 AAAA"])
def test_a_worker_that_trusts_nobody_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, key_file: Path, value: str | None
) -> None:
    """No key, an empty list, or a key that does not parse: ConfigError naming WARLOCK_SSH_TRUSTED_KEYS."""
    monkeypatch.delenv("WARLOCK_SSH_TRUSTED_KEYS", raising=False)
    if value is not None:
        monkeypatch.setenv("WARLOCK_SSH_TRUSTED_KEYS", value)
    with pytest.raises(ConfigError, match=r"trusted_keys \(WARLOCK_SSH_TRUSTED_KEYS\)"):
        load_settings(FallbackSettings, key_file=key_file)


def test_key_file_required_and_readable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No key file, or a missing one, is a config error naming WARLOCK_SSH_KEY_FILE."""
    monkeypatch.delenv("WARLOCK_SSH_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match=r"key_file \(WARLOCK_SSH_KEY_FILE\)"):
        load_settings(FallbackSettings)
    monkeypatch.setenv("WARLOCK_SSH_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(FallbackSettings)


def test_unusable_key_is_config_error_without_content(tmp_path: Path) -> None:
    """A file that is not a private key is refused at start, and its content is not echoed."""
    bad = tmp_path / "key"
    bad.write_text("SECRET-NOT-A-KEY\n")
    settings = load_settings(FallbackSettings, key_file=bad, trusted_keys=API_KEYS)
    with pytest.raises(ConfigError, match="not a usable private key") as info:
        load_client_key(settings)
    assert "SECRET" not in str(info.value)


def test_load_client_key(key_file: Path) -> None:
    """A passphrase-less OpenSSH key loads."""
    key = load_client_key(load_settings(FallbackSettings, key_file=key_file, trusted_keys=API_KEYS))
    assert key.algorithm == b"ssh-ed25519"


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [("Web-01.Example.COM", "web-01-example-com"), ("...", "ssh-worker"), ("a" * 80, "a" * 63)],
)
def test_default_worker_id(hostname: str, expected: str) -> None:
    """The default worker id is the hostname sanitized to [a-z0-9_-]{1,63}."""
    assert default_worker_id(hostname) == expected


def _target(host_key: str | None) -> SshTarget:
    """A target on 127.0.0.1:22 with `host_key` pinned."""
    return SshTarget(address="127.0.0.1", port=22, username="root", host_key=host_key)


def test_target_without_pinned_key_is_refused() -> None:
    """No pinned key (None or blank) is refused; the worker never connects unverified."""
    for missing in (None, "", "   "):
        with pytest.raises(TargetRefused, match="no pinned host key"):
            pinned_key(_target(missing))
    with pytest.raises(TargetRefused, match="does not parse"):
        pinned_key(_target("ssh-ed25519 AAAAbogus"))


def test_pool_key_normalises_the_pinned_key(key_file: Path) -> None:
    """A trailing comment or whitespace on the pinned key line does not make a second pool entry."""
    line = Path(f"{key_file}.pub").read_text().strip()
    bare = " ".join(line.split()[:2])
    assert pool_key(_target(line + "  ")) == pool_key(_target(bare))
    assert pool_key(_target(bare)).host_key == bare


def test_host_key_algs_put_pinned_type_first() -> None:
    """The pinned key's algorithms are offered first, the defaults after, without repeats."""
    key = asyncssh.generate_private_key("ecdsa-sha2-nistp256").convert_to_public()
    algs = host_key_algs(key)
    assert algs[0] == "ecdsa-sha2-nistp256"
    assert "ssh-ed25519" in algs
    assert len(algs) == len(set(algs))
