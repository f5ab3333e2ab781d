"""Helpers for tests of installed agents (always under a scratch prefix)."""

from __future__ import annotations

from pathlib import Path

from shared.install import paths


def agent_pids(prefix: Path) -> list[int]:
    """Pids of agents running from `prefix`'s virtual environment."""
    needle = f"{paths(str(prefix))['AGENT_BIN']} run".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found
