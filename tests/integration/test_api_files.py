"""The SQLite database holds command output: the API creates it (and SQLite its -wal / -shm) 0600."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import httpx
import pytest

from services.api.store.db import make_engine
from services.dev.procs import BIN, Proc
from tests.support.natsserver import NatsServer


def mode(path: Path) -> int:
    """The permission bits of `path`."""
    return stat.S_IMODE(path.stat().st_mode)


async def test_fresh_api_start_creates_the_database_0600(tmp_path: Path, nats_server: NatsServer) -> None:
    """A real `warlock-api` started with umask 022 leaves warlock.db, -wal and -shm 0600 after a command."""
    db = tmp_path / "state" / "warlock.db"
    env = {
        **nats_server.env("api"),
        "WARLOCK_API_PORT": "0",
        "WARLOCK_API_DATABASE_URL": f"sqlite+aiosqlite:///{db}",
        "WARLOCK_API_API_KEY_FILE": str(tmp_path / "state" / "api-key"),
    }
    previous = os.umask(0o022)  # what most shells have: files 0644 unless the API says otherwise
    try:
        proc = Proc("api", [str(BIN / "warlock-api")], tmp_path, env=env)
    finally:
        os.umask(previous)
    try:
        url = proc.wait_for(r"api listening on (http://\S+)", timeout=60).group(1)
        key = (tmp_path / "state" / "api-key").read_text().strip()
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            host = {"id": "h1", "address": "10.0.0.1", "ssh_check": False}
            added = await http.post("/api/hosts", json=host)
            assert added.status_code == 201
            ran = await http.post("/api/hosts/h1/exec", json={"command": "true"})
            assert ran.status_code == 200
        files = {p.name: mode(p) for p in db.parent.glob("warlock.db*")}
    finally:
        proc.stop()
    assert files["warlock.db"] == 0o600, files
    assert {"warlock.db-wal", "warlock.db-shm"} <= set(files), files
    assert set(files.values()) == {0o600}, files
    assert mode(db.parent) == 0o700


def test_readable_database_is_tightened_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An existing database (and -wal) readable by others is set to 0600 before use, and the API says so."""
    db = tmp_path / "old.db"
    for path in (db, tmp_path / "old.db-wal"):
        path.write_bytes(b"")
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="services.api.store.db"):
        make_engine(f"sqlite+aiosqlite:///{db}").sync_engine.dispose()
    assert mode(db) == 0o600
    assert mode(tmp_path / "old.db-wal") == 0o600
    assert f"{db} was readable by others (mode 0644): tightened to 0600" in caplog.text
