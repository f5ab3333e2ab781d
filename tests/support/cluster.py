"""Drive `warlock run --cluster` as a user would: the launcher as a subprocess with its own state directory
(WARLOCK_DEV_DIR), free ports and a fresh PostgreSQL database; read its dev.json; kill parts by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from services.dev.procs import BIN
from tests.support.db import create_pg_database, drop_pg_database, pg_url

HOST = "devbox"
START_TIMEOUT_S = 90


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class ClusterRun:
    """One `warlock run --cluster` in `tmp_path / "state"`, its output in `tmp_path / "cluster.log"`."""

    def __init__(self, tmp_path: Path, database_url: str, **env: str) -> None:
        self.state = tmp_path / "state"
        self.log_path = tmp_path / "cluster.log"
        self.env = {
            **os.environ,
            "WARLOCK_DEV_DIR": str(self.state),
            "WARLOCK_DEV_NATS_PORT": "0",
            "WARLOCK_DEV_GATEWAY_PORT": "0",
            "WARLOCK_DEV_API_PORT": "0",
            "WARLOCK_DEV_HOST_ID": HOST,
            "WARLOCK_DATABASE_URL": database_url,
            **env,
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "warlock"), "run", "--cluster"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self.info: dict[str, Any] = {}

    def wait_started(self) -> dict[str, Any]:
        """dev.json of this run, once the launcher wrote it."""
        dev_json = self.state / "dev.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            if dev_json.exists():
                info: dict[str, Any] = json.loads(dev_json.read_text())
                if info["pid"] == self.proc.pid and info.get("parts"):
                    self.info = info
                    return info
            time.sleep(0.1)

    def log(self) -> str:
        """What the launcher printed so far."""
        return self.log_path.read_text(errors="replace")

    def part(self, name: str) -> dict[str, Any]:
        """The dev.json entry of part `name` (``nats-1``, ``api-2``, ``gateway-1``, ``agent`` ...)."""
        found: dict[str, Any] = next(p for p in self.info["parts"] if p["name"] == name)
        return found

    def pids(self) -> list[int]:
        """Every part's pid, from dev.json as read last."""
        return [int(p["pid"]) for p in self.info["parts"]]

    @property
    def key(self) -> str:
        """The API key of this cluster."""
        return Path(self.info["api_key_file"]).read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """Headers carrying the API key."""
        return {"Authorization": f"Bearer {self.key}"}

    async def exec(self, api_url: str, command: str, timeout: float = 30) -> httpx.Response:
        """POST an exec of `command` on the dev host to the API at `api_url`."""
        async with httpx.AsyncClient(base_url=api_url, timeout=timeout + 30) as http:
            return await http.post(
                f"/api/hosts/{HOST}/exec", json={"command": command, "timeout": timeout}, headers=self.auth
            )

    def stop(self, sig: int = signal.SIGINT, timeout: float = 45) -> int:
        """Send `sig` to the launcher and wait for it; its exit code."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def close(self) -> None:
        """Stop a launcher a test left running (SIGINT: it stops its parts), and any part it left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.pids() if self.info else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@contextlib.asynccontextmanager
async def cluster_run(tmp_path: Path, **env: str) -> AsyncIterator[ClusterRun]:
    """A started `warlock run --cluster` on a fresh PostgreSQL database; stopped and dropped after."""
    name = await create_pg_database()
    run = ClusterRun(tmp_path, pg_url(name), **env)
    try:
        run.wait_started()
        yield run
    finally:
        run.close()
        await drop_pg_database(name)
