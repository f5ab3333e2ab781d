"""Agent operations, sans-I/O: plans from requests, the remote command line, the scripts' report, the unit."""

from __future__ import annotations

import base64
import hashlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from services.fallback_ssh.agent_ops import OpPlan, parse_report, plan
from services.fallback_ssh.errors import InvalidRequest, ScriptFailed
from shared.errors import ErrorCode
from shared.install import SCRIPTS, paths, script, unit_text
from shared.protocol import (
    AgentConfigureRequest,
    AgentInstallRequest,
    AgentUninstallRequest,
    SshTarget,
)

API_KEY = "ed25519:" + "A" * 43
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
WHEEL = b"PK\x03\x04 not really a wheel"
TARGET = SshTarget(address="127.0.0.1", port=2222, username="root", host_key="ssh-ed25519 AAAA")


def install_request(**fields: object) -> AgentInstallRequest:
    """An install request for host web1 with a matching wheel digest unless overridden."""
    values: dict[str, object] = {
        "target": TARGET,
        "command_id": "c-install",
        "host_id": "web1",
        "trusted_keys": (API_KEY,),
        "gateway_urls": ("ws://gw1:8765/agent", "wss://gw2/agent"),
        "wheel_name": "warlock-0.1.0-py3-none-any.whl",
        "wheel_b64": base64.b64encode(WHEEL).decode(),
        "wheel_sha256": hashlib.sha256(WHEEL).hexdigest(),
        "prefix": "/tmp/p",
        "mode": "direct",
        **fields,
    }
    return AgentInstallRequest.model_validate(values)


def test_install_plan_copies_wheel_and_script_and_sends_no_token() -> None:
    """The install plan uploads the wheel and install.sh; the host makes the token (nothing on stdin)."""
    p = plan(install_request())
    assert [u.name for u in p.uploads] == ["warlock-0.1.0-py3-none-any.whl", "install.sh"]
    assert p.uploads[0].data == WHEEL
    command = p.command("/tmp/warlock-agent-op.abc", 300)
    assert p.stdin() == b""
    words = shlex.split(command)
    assert "WARLOCK_WHEEL=/tmp/warlock-agent-op.abc/warlock-0.1.0-py3-none-any.whl" in words
    assert "WARLOCK_GATEWAY_URLS=ws://gw1:8765/agent,wss://gw2/agent" in words
    assert "WARLOCK_MODE=direct" in words
    assert f"WARLOCK_TRUSTED_KEYS={API_KEY}" in words
    assert "WARLOCK_MAKE_TOKEN=1" in words
    assert not any(w.startswith(("WARLOCK_TOKEN", "WARLOCK_CA_PEM_FILE")) for w in words)
    assert words[-4:] == ["KILL", "300", "/bin/sh", "/tmp/warlock-agent-op.abc/install.sh"]


def test_ca_pem_is_uploaded_next_to_the_script() -> None:
    """With ca_pem the CA travels as a file; its path is named by WARLOCK_CA_PEM_FILE. Not PEM: refused."""
    p = plan(install_request(ca_pem=CA_PEM))
    assert [u.name for u in p.uploads][-1] == "ca.pem"
    assert p.uploads[-1].data == CA_PEM.encode()
    assert "WARLOCK_CA_PEM_FILE=/tmp/warlock-agent-op.x/ca.pem" in shlex.split(
        p.command("/tmp/warlock-agent-op.x", 60)
    )
    with pytest.raises(InvalidRequest, match="ca_pem"):
        plan(install_request(ca_pem="hello"))


def test_wheel_digest_mismatch_is_a_bad_request() -> None:
    """A wheel whose SHA-256 is not the announced one is refused before anything is sent."""
    with pytest.raises(InvalidRequest, match="nothing was sent") as caught:
        plan(install_request(wheel_sha256="0" * 64))
    assert caught.value.code == ErrorCode.BAD_REQUEST


def test_wheel_that_is_not_base64_is_a_bad_request() -> None:
    """Garbage in wheel_b64 is refused."""
    with pytest.raises(InvalidRequest, match="base64"):
        plan(install_request(wheel_b64="***"))


def test_configure_and_uninstall_plans() -> None:
    """Configure sends its script, the trusted keys and CA, and asks for a token made on the host;
    neither sends a secret."""
    configure = plan(
        AgentConfigureRequest(
            command_id="c-conf",
            target=TARGET,
            host_id="web1",
            gateway_urls=("ws://g/agent",),
            trusted_keys=(API_KEY,),
            ca_pem=CA_PEM,
        )
    )
    assert [u.name for u in configure.uploads] == ["configure.sh", "ca.pem"]
    assert configure.stdin() == b""
    words = shlex.split(configure.command("/tmp/warlock-agent-op.c", 60))
    assert {"WARLOCK_MAKE_TOKEN=1", f"WARLOCK_TRUSTED_KEYS={API_KEY}"} <= set(words)
    uninstall = plan(AgentUninstallRequest(command_id="c-un", target=TARGET, prefix="/srv/x"))
    assert uninstall.stdin() == b""
    assert "WARLOCK_PREFIX=/srv/x" in shlex.split(uninstall.command("/tmp/warlock-agent-op.q", 60))


def test_command_refuses_a_strange_temp_dir() -> None:
    """A temporary directory name with shell syntax in it is refused, not quoted and run."""
    with pytest.raises(ScriptFailed):
        plan(install_request()).command("/tmp/x; rm -rf /", 60)


def test_report_with_state_is_a_result_even_on_nonzero_exit() -> None:
    """STEP lines become steps and STATE the final state; no_systemd exits 3 and is still an answer."""
    p = plan(install_request(mode="auto"))
    out = "noise\nSTEP sha256 ok abc\nSTEP systemd fail no systemd here\nSTATE no_systemd systemd=0\n"
    result = parse_report(p, out, "", 3)
    assert result.state == "no_systemd"
    assert result.systemd is False
    assert [(s.name, s.ok) for s in result.steps] == [("sha256", True), ("systemd", False)]


def test_report_without_state_is_a_script_failure_naming_the_step() -> None:
    """A run that ends without STATE is a typed exec_failed error naming the failed step."""
    p = plan(install_request())
    with pytest.raises(ScriptFailed, match="step pip failed: pip install failed") as caught:
        parse_report(p, "STEP sha256 ok x\nSTEP pip fail pip install failed: no network\n", "", 1)
    assert caught.value.code == ErrorCode.EXEC_FAILED


def test_report_failure_shows_the_last_lines() -> None:
    """Without a failed step the error carries stderr's last lines and the exit status."""
    p = plan(install_request())
    with pytest.raises(ScriptFailed) as caught:
        parse_report(p, "", "line 1\nsh: oops\n", 127)
    assert "sh: oops" in caught.value.description
    assert "exit status 127" in caught.value.description


def test_report_carries_public_key_and_token_hash() -> None:
    """AGENT_PUBLIC_KEY and TOKEN_SHA256 lines become the result's agent_public_key and token_sha256;
    malformed ones are ignored."""
    p = plan(install_request())
    key = "ed25519:" + "b" * 43
    out = f"STEP config ok x\nAGENT_PUBLIC_KEY {key}\nTOKEN_SHA256 {'c' * 64}\nSTATE running systemd=0\n"
    result = parse_report(p, out, "", 0)
    assert (result.agent_public_key, result.token_sha256) == (key, "c" * 64)
    bad = "AGENT_PUBLIC_KEY ed25519:short\nTOKEN_SHA256 nothex\nSTATE running systemd=0\n"
    result = parse_report(p, bad, "", 0)
    assert (result.agent_public_key, result.token_sha256) == (None, None)


def test_report_ignores_unknown_states() -> None:
    """A STATE line with a state outside the protocol is not trusted."""
    p = OpPlan(op="uninstall", script_name="uninstall.sh", uploads=(), env=())
    with pytest.raises(ScriptFailed):
        parse_report(p, "STATE exploded systemd=0\n", "", 0)


def test_scripts_are_self_contained() -> None:
    """Every script has common.sh inlined (no include marker left) and parses with sh -n."""
    for name in SCRIPTS:
        text = script(name)
        assert "# @include" not in text
        assert "make_token()" in text
        assert "make_identity" in text or name == "uninstall.sh"
        subprocess.run(["sh", "-n"], input=text.encode(), check=True)
    with pytest.raises(ValueError, match="unknown install script"):
        script("evil.sh")


def test_unit_is_hardened_without_stopping_host_management() -> None:
    """The unit restarts on failure and sets the hardening that leaves host management possible."""
    unit = unit_text("/")
    lines = set(unit.splitlines())
    for directive in (
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectControlGroups=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "ExecStart=/opt/warlock-agent/bin/warlock-agent run --config /etc/warlock/agent.conf",
        "WantedBy=multi-user.target",
    ):
        assert directive in lines, directive
    # each of these would stop the agent's commands managing the host as root over SSH would
    for absent in (
        "ProtectSystem=",
        "PrivateTmp=",
        "UMask=",
        "ProtectHome=",
        "ProtectKernelTunables=",
        "ProtectKernelModules=",
    ):
        assert absent not in unit
    assert "/tmp/p/opt/warlock-agent/bin/warlock-agent" in unit_text("/tmp/p/")
    assert paths("/tmp/p")["CONF"] == "/tmp/p/etc/warlock/agent.conf"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit and reports nothing about it."""
    agent = Path(paths(str(tmp_path))["AGENT_BIN"])
    agent.parent.mkdir(parents=True)
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    unit = tmp_path / "warlock-agent.service"
    unit.write_text(unit_text(str(tmp_path)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "warlock-agent.service" not in done.stdout + done.stderr, done.stdout + done.stderr
