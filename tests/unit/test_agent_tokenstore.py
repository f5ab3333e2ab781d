"""Storing a rotated token: the config rewrite, where the token came from, and the dispatch decision."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from services.agent import config, dispatch
from services.agent.config import load_agent_config
from services.agent.tokenstore import (
    ENV_REFUSAL,
    NO_FILE_REFUSAL,
    TokenStore,
    replace_token_line,
    token_from_env,
)
from shared import signing
from shared.protocol import RotateToken, Welcome, encode
from shared.tokens import generate_token

OLD, NEW = "ab" * 32, generate_token()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No WARLOCK_* variable from the outer environment leaks in; no default config file."""
    for name in list(os.environ):
        if name.startswith("WARLOCK_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", tmp_path / "absent.conf")


def test_token_line_replaced_everything_else_kept() -> None:
    """Only the token line changes: comments, spacing, order, other keys and line endings stay."""
    before = (
        f'# managed by warlock\nhost_id = "web-1"\n  token   =  "{OLD}"  \n'
        'gateway_urls = ["ws://a:1/agent"]   # two\n\nmetrics_interval = 5.0\n'
    ).encode()
    after = replace_token_line(before, NEW)
    assert after == before.replace(f'token   =  "{OLD}"  '.encode(), f'token = "{NEW}"'.encode())
    crlf = f'host_id = "web-1"\r\ntoken = "{OLD}"\r\nx = 1\r\n'.encode()
    assert replace_token_line(crlf, NEW) == crlf.replace(OLD.encode(), NEW.encode())
    quoted = f"\"token\" = '{OLD}'\n".encode()
    assert replace_token_line(quoted, NEW) == f'token = "{NEW}"\n'.encode()


def test_token_line_added_when_absent() -> None:
    """No token line: one is appended (after a missing final newline) or put before the first table."""
    assert replace_token_line(b'host_id = "h"', NEW) == f'host_id = "h"\ntoken = "{NEW}"\n'.encode()
    assert replace_token_line(b"", NEW) == f'token = "{NEW}"\n'.encode()
    tabled = b'host_id = "h"\n[extra]\nkey = 1\n'
    assert replace_token_line(tabled, NEW) == f'host_id = "h"\ntoken = "{NEW}"\n[extra]\nkey = 1\n'.encode()


def test_token_line_refuses_what_it_cannot_rewrite() -> None:
    """A file that is not TOML, or whose top-level token would not become the new one, raises ValueError."""
    with pytest.raises(ValueError, match="TOML"):
        replace_token_line(b"not = = toml\n", NEW)
    with pytest.raises(ValueError, match="TOML"):
        replace_token_line(f'token = """\n{OLD}\n"""\n'.encode(), NEW)


def test_store_rewrites_file_atomically_with_mode_0600(tmp_path: Path) -> None:
    """store() replaces the file (new inode, mode 0600, no temp file left); other lines are unchanged."""
    path = tmp_path / "agent.conf"
    path.write_text(f'host_id = "web-1"\ntoken = "{OLD}"\ngateway_urls = ["ws://a:1/agent"]\n')
    path.chmod(0o644)
    inode = path.stat().st_ino
    assert TokenStore(config_path=path, from_env=False).store(NEW) is None
    assert path.read_text() == f'host_id = "web-1"\ntoken = "{NEW}"\ngateway_urls = ["ws://a:1/agent"]\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.conf"]


def test_store_through_symlink_keeps_the_link(tmp_path: Path) -> None:
    """A symlinked config file: its target is rewritten, the link stays a link."""
    target = tmp_path / "real.conf"
    target.write_text(f'token = "{OLD}"\n')
    link = tmp_path / "agent.conf"
    link.symlink_to(target)
    assert TokenStore(config_path=link, from_env=False).store(NEW) is None
    assert link.is_symlink()
    assert target.read_text() == f'token = "{NEW}"\n'


def test_store_refusals(tmp_path: Path) -> None:
    """Environment token, no config file, a missing file: a reason is returned, the file is untouched."""
    path = tmp_path / "agent.conf"
    path.write_text(f'token = "{OLD}"\n')
    assert TokenStore(config_path=path, from_env=True).store(NEW) == ENV_REFUSAL
    assert TokenStore(config_path=None, from_env=False).store(NEW) == NO_FILE_REFUSAL
    assert TokenStore(config_path=tmp_path / "gone.conf", from_env=False).store(NEW) is not None
    assert path.read_text() == f'token = "{OLD}"\n'


def test_load_agent_config_knows_where_the_token_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store names the file that was read, and notices WARLOCK_AGENT_TOKEN in any letter case."""
    path = tmp_path / "agent.conf"
    key = signing.public_text(signing.generate())
    path.write_text(
        f'host_id = "web-1"\ntoken = "{OLD}"\ngateway_urls = ["ws://127.0.0.1:1/agent"]\n'
        f'trusted_keys = ["{key}"]\n'
    )
    path.chmod(0o600)
    settings, store = load_agent_config(path)
    assert settings.token.get_secret_value() == OLD
    assert store == TokenStore(config_path=path, from_env=False)
    monkeypatch.setenv("WARLOCK_AGENT_TOKEN", NEW)
    settings, store = load_agent_config(path)
    assert settings.token.get_secret_value() == NEW
    assert store.from_env
    assert token_from_env({"warlock_agent_token": "x"})
    assert not token_from_env({"WARLOCK_AGENT_TOKENS": "x"})


def test_dispatch_turns_rotate_token_into_a_rotate_action() -> None:
    """A RotateToken frame from the gateway becomes a Rotate action carrying it."""
    welcome = Welcome(session_id="s1", gateway_id="gw1", ping_interval=20, max_result_bytes=65536)
    state = dispatch.SessionState(welcome=welcome, last_received=0.0)
    frame = RotateToken(rotation_id="r1")
    assert dispatch.on_frame(state, encode(frame), 5.0) == [dispatch.Rotate(frame)]
    assert state.last_received == 5.0
