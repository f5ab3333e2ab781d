"""The warlock-agent command line: version, config errors as one line and exit code 2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.agent import __version__
from services.agent.cli import main
from services.ctl.cli import main as warlock_main
from shared import signing

BIN = Path(sys.executable).parent / "warlock-agent"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`main()` configures the root logger; put it back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_version() -> None:
    """`warlock-agent --version` prints the version and exits 0."""
    out = subprocess.run([str(BIN), "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0
    assert out.stdout.strip() == f"warlock-agent {__version__}"


def test_config_error_is_one_line_exit_2(tmp_path: Path) -> None:
    """A bad config file exits 2 with `warlock-agent: config error: <field>: ...` and no traceback."""
    conf = tmp_path / "agent.conf"
    conf.write_text('host_id = "UPPER"\ntoken = "x"\ngateway_urls = ["ws://h:1/agent"]\n')
    conf.chmod(0o600)
    out = subprocess.run(
        [str(BIN), "run", "--config", str(conf)], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 2
    assert out.stderr.startswith("warlock-agent: config error: host_id")
    assert "Traceback" not in out.stderr


def test_missing_config_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An explicit --config that does not exist exits 2."""
    assert main(["run", "--config", str(tmp_path / "none.conf")]) == 2
    assert "config error: config: no such file" in capsys.readouterr().err


def test_swarm_bad_tokens_file_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`warlock swarm` (services.dev.swarm): a tokens file with a malformed token exits 2 naming it."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"h1": "short"}))
    assert warlock_main(["swarm", "--gateway", "ws://127.0.0.1:1/agent", "--tokens", str(tokens)]) == 2
    assert "config error: tokens" in capsys.readouterr().err


def test_keygen_creates_the_key_once_and_prints_its_public_key(tmp_path: Path) -> None:
    """`keygen --key PATH` makes a 0600 key and prints ed25519:...; again, it prints the same key."""
    key = tmp_path / "sub" / "agent.key"
    first = subprocess.run(
        [str(BIN), "keygen", "--key", str(key)], capture_output=True, text=True, timeout=30, check=False
    )
    assert first.returncode == 0, first.stderr
    public = first.stdout.strip()
    assert public.startswith("ed25519:")
    assert len(first.stdout.splitlines()) == 1
    assert key.stat().st_mode & 0o777 == 0o600
    assert signing.public_text(signing.load_private(key)) == public
    assert "the API must know it" in first.stderr
    assert "PRIVATE" not in first.stderr + first.stdout
    again = subprocess.run(
        [str(BIN), "keygen", "--key", str(key)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (again.returncode, again.stdout.strip()) == (0, public)


def test_keygen_reads_the_key_path_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keygen --config PATH` uses the file's identity_key_file; a group-readable key is a config error."""
    key = tmp_path / "id.key"
    conf = tmp_path / "agent.conf"
    conf.write_text(f'identity_key_file = "{key}"\n')
    conf.chmod(0o600)
    assert main(["keygen", "--config", str(conf)]) == 0
    public = capsys.readouterr().out.strip()
    assert public == signing.public_text(signing.load_private(key))
    key.chmod(0o640)
    assert main(["keygen", "--config", str(conf)]) == 2
    assert "config error: identity_key_file" in capsys.readouterr().err


def test_keygen_help() -> None:
    """`warlock-agent keygen --help` exits 0 and names both options."""
    out = subprocess.run(
        [str(BIN), "keygen", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0
    assert "--config" in out.stdout
    assert "--key" in out.stdout
