"""The gateway's exec grace covers the agent's worst case after a command's timeout (shared/limits.py)."""

from __future__ import annotations

import pytest

from services.agent import executor
from services.api.settings import ApiSettings
from services.gateway.settings import GatewaySettings
from shared.errors import ConfigError
from shared.limits import AGENT_AFTER_TIMEOUT_S, AGENT_REAP_S, MIN_EXEC_GRACE_S
from shared.settings import load_settings


def test_agent_reap_wait_is_the_shared_constant() -> None:
    """The executor waits exactly the reap time the gateway's bound is built on, and reports after it."""
    assert executor.REAP_TIMEOUT_S == AGENT_REAP_S
    assert AGENT_AFTER_TIMEOUT_S > AGENT_REAP_S


def test_default_grace_covers_the_agent_with_margin() -> None:
    """The gateway's default grace is above the agent's worst case, and the API waits longer still."""
    gateway_grace = GatewaySettings().exec_grace
    assert gateway_grace >= MIN_EXEC_GRACE_S > AGENT_AFTER_TIMEOUT_S
    assert ApiSettings.model_fields["exec_grace"].default > gateway_grace


def test_grace_below_the_agent_worst_case_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """WARLOCK_GATEWAY_EXEC_GRACE under the minimum stops the gateway, naming the field and the variable."""
    monkeypatch.setenv("WARLOCK_GATEWAY_EXEC_GRACE", str(AGENT_AFTER_TIMEOUT_S))
    with pytest.raises(ConfigError) as info:
        load_settings(GatewaySettings)
    assert info.value.field == "exec_grace (WARLOCK_GATEWAY_EXEC_GRACE)"
    assert f"at least {MIN_EXEC_GRACE_S:g}s" in info.value.message
    monkeypatch.setenv("WARLOCK_GATEWAY_EXEC_GRACE", str(MIN_EXEC_GRACE_S))
    assert load_settings(GatewaySettings).exec_grace == MIN_EXEC_GRACE_S
