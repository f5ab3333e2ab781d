"""Every console script answers --help and --version at once: exit 0, nothing started, no file written."""

from __future__ import annotations

import socket
import subprocess
import tomllib
from pathlib import Path

import pytest

from services.dev.procs import BIN
from shared.version import __version__

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])
SUBCOMMANDS = [
    ["warlock", "run"],
    ["warlock", "req"],
    ["warlock", "agent"],
    ["warlock", "api-key", "create"],
    ["warlock", "agent-token"],
    ["warlock", "signing-keys", "create"],
    ["warlock", "signing-keys", "list"],
    ["warlock", "signing-keys", "revoke"],
    ["warlock", "token-authority"],
    ["warlock", "nats-config"],
    ["warlock", "swarm"],
    ["warlock-agent", "run"],
    ["warlock-gateway", "run"],
]


def run_in_empty_dir(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run `argv` (a script of this venv) in an empty directory with an empty environment."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )
    assert list(cwd.iterdir()) == [], f"{argv} wrote {list(cwd.iterdir())}"
    assert not (tmp_path / "home").exists(), f"{argv} wrote into HOME"
    return done


def test_every_script_is_covered() -> None:
    """The scripts tested here are the ones pyproject.toml installs."""
    assert {"warlock", "warlock-agent", "warlock-api", "warlock-gateway", "warlock-fallback-ssh"} <= set(
        SCRIPTS
    )


@pytest.mark.parametrize("argv", [[s] for s in SCRIPTS] + SUBCOMMANDS, ids=" ".join)
def test_help_exits_0_and_starts_nothing(argv: list[str], tmp_path: Path) -> None:
    """`--help` prints usage and exits 0 without starting a server or writing a file."""
    done = run_in_empty_dir([*argv, "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: "), done.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_version_exits_0_with_the_distribution_version(script: str, tmp_path: Path) -> None:
    """`--version` prints `<script> <version>` (the package's version) and exits 0."""
    done = run_in_empty_dir([script, "--version"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{script} {__version__}"


def test_req_without_nats_says_so_in_one_line(tmp_path: Path) -> None:
    """`warlock req` to a NATS that is not there: exit 1 and one line naming the server, no traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"nats://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        done = run_in_empty_dir(["warlock", "req", "--server", url, "warlock.agent.h1.ping", ""], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"warlock: cannot reach NATS at {url}: ConnectionRefusedError: "
        f"[Errno 111] Connect call failed ('127.0.0.1', {url.rsplit(':', 1)[1]})"
    ]
