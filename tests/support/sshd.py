"""A real OpenSSH server for tests: throwaway keys, a free loopback port, stopped with its sessions.

    server = Sshd(tmp_path)              # starts /usr/sbin/sshd -D -e -f <tmp>/sshd_config
    server.port, server.username         # 127.0.0.1:<port>, the current user (root here)
    server.client_key_path               # private key authorized for `username`
    server.host_key_line                 # "ssh-ed25519 AAAA..." (what the API pins)
    server.accepted_logins()             # "Accepted publickey" lines so far (one per SSH connection)
    server.replace_host_key()            # new host key, same port, old sessions gone
    server.stop()

Commands run through this server pay the account's shell start-up (root's login shell here); the
helper never touches the account's files. `sshd_fixture()` builds a pytest fixture around the class.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import pytest

from services.dev.procs import Proc, free_port

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
Scope = Literal["function", "class", "module", "package", "session"]


def keygen(path: Path, comment: str) -> str:
    """Write a new ed25519 key pair at `path` (+ ``.pub``) and return the public key line."""
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def key_line(public_line: str) -> str:
    """The ``<type> <base64>`` part of an OpenSSH public key line (comment dropped)."""
    return " ".join(public_line.split()[:2])


def _children() -> dict[int, list[int]]:
    """Map of pid → child pids, read from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first, then theirs)."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def _kill_all(pids: Sequence[int]) -> None:
    """SIGKILL each pid that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class Sshd:
    """One OpenSSH server on 127.0.0.1 with throwaway host and client keys."""

    def __init__(self, root: Path, extra_config: Sequence[str] = (), port: int | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.username = getpass.getuser()
        self.extra_config = list(extra_config)
        self.host_key_path = root / "ssh_host_ed25519_key"
        self.client_key_path = root / "client_ed25519_key"
        self.authorized_keys_path = root / "authorized_keys"
        self.config_path = root / "sshd_config"
        self.host_key_line = key_line(keygen(self.host_key_path, "warlock-test-host"))
        self.client_public_key = key_line(keygen(self.client_key_path, "warlock-test-client"))
        self.authorized_keys_path.write_text(self.client_public_key + "\n")
        self.authorized_keys_path.chmod(0o600)
        self.port = port or 0
        self._generation = 0
        self.proc: Proc | None = None
        self.start()

    def _write_config(self) -> None:
        """Write sshd_config for the current port and keys."""
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key_path}",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            f"PidFile {self.root / 'sshd.pid'}",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "UseDNS no",
            "LogLevel INFO",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, attempts: int = 5) -> None:
        """Start sshd (on a fresh free port unless one is set) and wait until it listens."""
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        fixed = self.port != 0
        for attempt in range(attempts):
            if not fixed:
                self.port = free_port()
            self._write_config()
            self._generation += 1
            proc = Proc(
                f"sshd-{self._generation}",
                [str(SSHD), "-D", "-e", "-f", str(self.config_path)],
                self.root,
            )
            try:
                proc.wait_for(rf"Server listening on 127\.0\.0\.1 port {self.port}", timeout=10)
            except AssertionError:
                proc.kill()
                if attempt == attempts - 1 or "Address already in use" not in proc.log():
                    raise
                time.sleep(0.2)
                continue
            self.proc = proc
            return

    @property
    def log_path(self) -> Path:
        """The current sshd process's log (stderr of ``sshd -e``)."""
        assert self.proc is not None
        return self.proc.log_path

    def log(self) -> str:
        """Everything logged by every sshd process of this server so far."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.root.glob("sshd-*.log")))

    def accepted_logins(self) -> int:
        """How many SSH connections authenticated so far (``Accepted publickey`` lines)."""
        return self.log().count("Accepted publickey for")

    def session_pids(self) -> list[int]:
        """Pids of everything the listener started: per-connection sshd processes and their commands."""
        return descendants(self.proc.pid) if self.proc is not None else []

    def drop_connections(self) -> None:
        """Kill every connection (and what it runs) but keep listening, like a network cut."""
        _kill_all(self.session_pids())

    def stop(self) -> None:
        """Stop the listener and kill every session it started."""
        if self.proc is None:
            return
        sessions = self.session_pids()
        self.proc.stop(timeout=5)
        _kill_all(sessions + [p for pid in sessions for p in descendants(pid)])
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (existing connections are cut)."""
        self.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                self.start(attempts=1)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def replace_host_key(self) -> str:
        """Generate a new host key and restart on the same port; return the new public key line."""
        self.host_key_line = key_line(keygen(self.host_key_path, "warlock-test-host-2"))
        self.restart()
        return self.host_key_line

    def authorize(self, public_key_line: str) -> None:
        """Add a public key to the authorized keys of `username`."""
        with self.authorized_keys_path.open("a") as f:
            f.write(key_line(public_key_line) + "\n")

    def fingerprint(self) -> str:
        """The host key's ``SHA256:...`` fingerprint, as ``ssh-keygen -l`` prints it."""
        out = subprocess.run(
            [
                SSH_KEYGEN,
                "-l",
                "-E",
                "sha256",
                "-f",
                str(self.host_key_path.with_name(self.host_key_path.name + ".pub")),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return out.split()[1]


@contextlib.contextmanager
def running_sshd(root: Path, extra_config: Sequence[str] = ()) -> Iterator[Sshd]:
    """Context manager: an Sshd under `root`, stopped on exit."""
    server = Sshd(root, extra_config)
    try:
        yield server
    finally:
        server.stop()


def sshd_fixture(
    scope: Scope = "function", extra_config: Sequence[str] = ()
) -> Callable[[pytest.TempPathFactory], Iterator[Sshd]]:
    """Build a pytest fixture yielding a running Sshd: ``sshd = sshd_fixture()`` in a conftest or module."""

    @pytest.fixture(scope=scope)
    def _sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
        with running_sshd(tmp_path_factory.mktemp("sshd"), extra_config) as server:
            yield server

    return _sshd
