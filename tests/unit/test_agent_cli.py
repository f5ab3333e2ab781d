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
    """A swarm tokens file with a malformed token exits 2 naming the tokens file."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"h1": "short"}))
    assert main(["swarm", "--gateway", "ws://127.0.0.1:1/agent", "--tokens", str(tokens)]) == 2
    assert "config error: tokens" in capsys.readouterr().err
