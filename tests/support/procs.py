"""Real processes for tests: start with a log file, wait for a log line, stop with a signal."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process whose stdout and stderr go to a log file the test can search."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env
        )

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.popen.pid

    def log(self) -> str:
        """Everything the process has logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 15.0, after: int = 0) -> re.Match[str]:
        """Wait until `pattern` appears in the log (from character `after`), or fail with the log."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(self.log(), after)
            if match:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.popen.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} in {timeout}s:\n{self.log()[-4000:]}")
            time.sleep(0.02)

    def count(self, pattern: str) -> int:
        """How many times `pattern` occurs in the log."""
        return len(re.findall(pattern, self.log()))

    def signal(self, sig: int) -> None:
        """Send `sig` to the process if it is still running."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; return the exit code."""
        self.signal(signal.SIGTERM)
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._log.close()


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
