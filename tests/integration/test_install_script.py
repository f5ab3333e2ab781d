"""The install scripts run directly with sh (as a host that pulls GET /agent/install.sh would run them).

Mostly the paths that end before pip runs (fast); one full pull install with enrollment; the full push
install is in test_install_ssh.py.
Everything goes under a prefix in tmp_path; nothing touches the machine's /etc or /opt.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared import signing
from shared.install import paths, script
from shared.version import wheel_name
from tests.integration.test_install_ssh import ArgvWatch, agent_wheel
from tests.support.install import agent_pids

__all__ = ["agent_wheel"]  # the session's wheel, built once (test_install_ssh.py)

TOKEN = "5e" * 32
API_KEY = "ed25519:" + "Q" * 43
HAS_SYSTEMD = Path("/run/systemd/system").is_dir()


def run_script(
    name: str, tmp_path: Path, env: dict[str, str], stdin: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `name` from shared.install with only `env` (plus PATH) and `stdin`."""
    path = tmp_path / name
    path.write_text(script(name))
    return subprocess.run(
        ["sh", str(path)],
        input=stdin,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def fake_wheel(tmp_path: Path) -> tuple[Path, str]:
    """A file named like a wheel and its SHA-256 (enough for the checks that run before pip)."""
    wheel = tmp_path / wheel_name()
    wheel.write_bytes(b"PK\x03\x04 a wheel")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def install_env(prefix: Path, wheel: Path, sha256: str, mode: str) -> dict[str, str]:
    """The install variables for host web1 under `prefix`."""
    return {
        "WARLOCK_PREFIX": str(prefix),
        "WARLOCK_HOST_ID": "web1",
        "WARLOCK_GATEWAY_URLS": "ws://127.0.0.1:9/agent",
        "WARLOCK_WHEEL": str(wheel),
        "WARLOCK_WHEEL_SHA256": sha256,
        "WARLOCK_MODE": mode,
        "WARLOCK_TRUSTED_KEYS": API_KEY,
    }


def test_wrong_sha256_aborts_before_anything_changes(tmp_path: Path) -> None:
    """A wheel that does not match WARLOCK_WHEEL_SHA256 stops the install first: exit 1, prefix untouched."""
    wheel, _ = fake_wheel(tmp_path)
    prefix = tmp_path / "root"
    prefix.mkdir()
    done = run_script("install.sh", tmp_path, install_env(prefix, wheel, "0" * 64, "direct"), TOKEN + "\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "STEP sha256 fail" in done.stdout
    assert "STATE" not in done.stdout
    assert list(prefix.iterdir()) == []
    assert TOKEN not in done.stdout + done.stderr


@pytest.mark.skipif(HAS_SYSTEMD, reason="this machine runs systemd: mode auto would use it")
@pytest.mark.parametrize("mode", ["auto", "systemd"])
def test_no_systemd_reports_and_changes_nothing(tmp_path: Path, mode: str) -> None:
    """Without systemd, modes auto and systemd answer STATE no_systemd (exit 3) and create nothing."""
    wheel, sha256 = fake_wheel(tmp_path)
    prefix = tmp_path / "root"
    done = run_script("install.sh", tmp_path, install_env(prefix, wheel, sha256, mode), TOKEN + "\n")
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "STATE no_systemd systemd=0"
    assert "mode direct" in done.stdout
    assert not prefix.exists()


@pytest.mark.parametrize(
    ("field", "value", "stdin"),
    [
        ("WARLOCK_HOST_ID", "Web 1", TOKEN),
        ("WARLOCK_GATEWAY_URLS", 'ws://a/"x', TOKEN),
        ("WARLOCK_GATEWAY_URLS", "http://a/agent", TOKEN),
        ("WARLOCK_MODE", "docker", TOKEN),
        ("WARLOCK_PREFIX", "relative/path", TOKEN),
        ("WARLOCK_TRUSTED_KEYS", "", TOKEN),
        ("WARLOCK_TRUSTED_KEYS", "ed25519:short", TOKEN),
        ("WARLOCK_TRUSTED_KEYS", 'ed25519:"injected', TOKEN),
        ("WARLOCK_CA_PEM_FILE", "/nonexistent/ca.pem", TOKEN),
        ("WARLOCK_HOST_ID", "web1", "not-a-token"),
        ("WARLOCK_HOST_ID", "web1", ""),
    ],
)
def test_bad_input_exits_2_without_changes(tmp_path: Path, field: str, value: str, stdin: str) -> None:
    """Each bad input is named in a failed `inputs` step; exit 2; nothing created; the input not echoed."""
    wheel, sha256 = fake_wheel(tmp_path)
    prefix = tmp_path / "root"
    env = {**install_env(prefix, wheel, sha256, "direct"), field: value}
    done = run_script("install.sh", tmp_path, env, stdin + "\n")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout.startswith("STEP inputs fail")
    assert not prefix.exists()
    if stdin != TOKEN:
        assert "not-a-token" not in done.stdout


def test_token_from_environment_when_stdin_is_empty(tmp_path: Path) -> None:
    """WARLOCK_TOKEN is used when set (the script itself may be arriving on stdin, as with curl | sh)."""
    wheel, _ = fake_wheel(tmp_path)
    env = {**install_env(tmp_path / "root", wheel, "0" * 64, "direct"), "WARLOCK_TOKEN": TOKEN}
    done = run_script("install.sh", tmp_path, env)
    assert "STEP inputs ok" in done.stdout  # the token was accepted; the (wrong) digest stops it next
    assert "STEP sha256 fail" in done.stdout


def test_push_makes_its_own_token(tmp_path: Path) -> None:
    """WARLOCK_MAKE_TOKEN=1 (the SSH push): no token is read; stdin and WARLOCK_TOKEN are ignored."""
    wheel, _ = fake_wheel(tmp_path)
    env = {**install_env(tmp_path / "root", wheel, "0" * 64, "direct"), "WARLOCK_MAKE_TOKEN": "1"}
    done = run_script("install.sh", tmp_path, env, "not-a-token\n")
    assert "STEP inputs ok" in done.stdout
    assert "token made on this host" in done.stdout
    assert "STEP sha256 fail" in done.stdout


def test_uninstall_and_configure_on_a_clean_prefix(tmp_path: Path) -> None:
    """A clean prefix: uninstall answers not_installed (exit 0), configure changes nothing."""
    prefix = tmp_path / "root"
    prefix.mkdir()
    done = run_script("uninstall.sh", tmp_path, {"WARLOCK_PREFIX": str(prefix)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("STATE not_installed")
    done = run_script("configure.sh", tmp_path, {"WARLOCK_PREFIX": str(prefix)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("STATE not_installed")
    assert list(prefix.iterdir()) == []


class EnrollServer:
    """Plays the API's POST /agent/enroll on a real port: records each request's headers and body."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                outer.requests.append((self.path, dict(self.headers.items()), self.rfile.read(length)))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"host_id": "web1", "key_id": "x"}')

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> EnrollServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(240)
def test_pull_install_with_a_token_on_stdin_enrolls_the_agents_key(tmp_path: Path, agent_wheel: Path) -> None:
    """The pull install (token pasted on stdin) still works: it writes that token and the trusted keys,
    makes the agent's key on the host and enrolls its public key with POST /agent/enroll, the token in
    the Authorization header (curl reads it from stdin: it is in no argv). It prints only the hash."""
    prefix = tmp_path / "root"
    sha256 = hashlib.sha256(agent_wheel.read_bytes()).hexdigest()
    where = paths(str(prefix))
    try:
        with EnrollServer() as api, ArgvWatch() as watch:
            env = {**install_env(prefix, agent_wheel, sha256, "direct"), "WARLOCK_API_URL": api.url + "/"}
            done = run_script("install.sh", tmp_path, env, TOKEN + "\n", timeout=200)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == "STATE running systemd=0"
        assert TOKEN not in done.stdout + done.stderr
        assert f"TOKEN_SHA256 {hashlib.sha256(TOKEN.encode()).hexdigest()}" in done.stdout
        public = signing.public_text(signing.load_private(Path(where["CONF_DIR"]) / "agent.key"))
        assert f"AGENT_PUBLIC_KEY {public}" in done.stdout
        assert "STEP enroll ok" in done.stdout
        (path, headers, body) = api.requests[0]
        assert path == "/agent/enroll"
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert json.loads(body) == {"host_id": "web1", "public_key": public}
        text = Path(where["CONF"]).read_text()
        assert f'token = "{TOKEN}"' in text
        assert f'trusted_keys = ["{API_KEY}"]' in text
        assert watch.holding(TOKEN) == []
    finally:
        for pid in agent_pids(prefix):
            os.kill(pid, signal.SIGKILL)
