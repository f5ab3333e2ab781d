"""Subjects, tokens and settings from shared/."""

from __future__ import annotations

import pytest
from pydantic_settings import SettingsConfigDict

from shared import subjects
from shared.errors import ConfigError, InvalidIdError
from shared.settings import NatsSettings, load_settings
from shared.tokens import fingerprint, generate_token, hash_token, is_well_formed, verify_token


def test_subject_scheme() -> None:
    """Subjects follow warlock.<kind>.<host>.<verb>."""
    assert subjects.agent_exec("web-1") == "warlock.agent.web-1.exec"
    assert subjects.agent_ping("web-1") == "warlock.agent.web-1.ping"
    assert subjects.agent_requests("web-1") == "warlock.agent.web-1.*"
    assert subjects.ssh_exec("db_2") == "warlock.ssh.db_2.exec"
    assert subjects.metrics("a") == "warlock.metrics.a"
    assert subjects.presence("a") == "warlock.presence.a"
    assert subjects.result("a") == "warlock.result.a"
    assert subjects.session_claim("a") == "warlock.session.a.claim"
    assert subjects.parse_agent_request("warlock.agent.web-1.exec") == ("web-1", "exec")
    assert subjects.parse_session_claim("warlock.session.h.claim") == "h"


@pytest.mark.parametrize("bad", ["", "Web", "a.b", "a*", "a>", "x" * 64, "a b", "é"])
def test_bad_host_ids_never_reach_a_subject(bad: str) -> None:
    """A host id outside [a-z0-9_-]{1,63} raises instead of building a subject."""
    with pytest.raises(InvalidIdError):
        subjects.agent_exec(bad)


@pytest.mark.parametrize(
    "bad", ["warlock.agent.x", "warlock.ssh.x.exec", "nats.agent.x.exec", "warlock.agent.X.exec"]
)
def test_parse_rejects_foreign_subjects(bad: str) -> None:
    """Parsing refuses subjects that are not agent requests."""
    with pytest.raises(InvalidIdError):
        subjects.parse_agent_request(bad)


def test_tokens() -> None:
    """Tokens are 64 hex chars, verified against their hash, fingerprinted without leaking a prefix."""
    token = generate_token()
    assert is_well_formed(token)
    assert len(token) == 64
    stored = hash_token(token)
    assert verify_token(token, stored)
    assert not verify_token(generate_token(), stored)
    fp = fingerprint(stored)
    assert len(fp) == 8
    assert fp not in token
    assert fp not in stored
    assert not is_well_formed(token.upper())


class _Demo(NatsSettings):
    model_config = SettingsConfigDict(env_prefix="WARLOCK_DEMO_")
    port: int = 1


def test_settings_env_and_shared_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Service fields use the service prefix; NATS URL keeps the plain WARLOCK_ prefix."""
    monkeypatch.setenv("WARLOCK_DEMO_PORT", "99")
    monkeypatch.setenv("WARLOCK_NATS_URL", "nats://a:1,nats://b:2")
    monkeypatch.setenv("NATS_URL", "nats://must-not-be-used:3")
    s = load_settings(_Demo)
    assert s.port == 99
    assert s.nats_servers() == ["nats://a:1", "nats://b:2"]


def test_settings_error_names_field_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value raises ConfigError naming the field and its environment variable."""
    monkeypatch.setenv("WARLOCK_DEMO_PORT", "eighty")
    with pytest.raises(ConfigError) as info:
        load_settings(_Demo)
    assert info.value.field == "port (WARLOCK_DEMO_PORT)"
