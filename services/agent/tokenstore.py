"""Storing a rotated token: where the agent's token came from, and rewriting the config file safely.

A token read from the config file is replaced there: the ``token = "..."`` line is rewritten (added if
absent) and every other byte is kept; the new file is written next to the old one (mode 0600, fsynced)
and moved over it with ``os.replace``, so a crash leaves either the old or the new file, never half of
one. A token set by the environment (``WARLOCK_AGENT_TOKEN``) cannot be stored by the agent: the
rotation is refused and whoever sets the variable must update it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "WARLOCK_AGENT_TOKEN"  # noqa: S105  (a variable name, not a secret)
ENV_REFUSAL = "token is set by the environment; update it there"
NO_FILE_REFUSAL = "the agent has no config file to store the token in"

# A top-level ``token = ...`` line (bare or quoted key), up to the end of the line.
_TOKEN_LINE = re.compile(rb"""^([ \t]*)(?:token|"token"|'token')[ \t]*=[^\r\n]*""", re.MULTILINE)
_TABLE_HEADER = re.compile(rb"^[ \t]*\[", re.MULTILINE)


def token_from_env(environ: Mapping[str, str]) -> bool:
    """Whether the environment sets the token (pydantic-settings matches variable names ignoring case)."""
    return any(name.upper() == TOKEN_ENV for name in environ)


def replace_token_line(text: bytes, token: str) -> bytes:
    """`text` with its ``token = "..."`` line set to `token` (a line added when absent); nothing else moves.

    The added line goes before the first ``[table]`` header (top-level keys must precede tables), or at
    the end. Raises ValueError if the result would not be TOML whose top-level ``token`` is `token`.
    """
    line = f'token = "{token}"'.encode()
    match = _TOKEN_LINE.search(text)
    if match is not None:
        result = text[: match.start()] + match.group(1) + line + text[match.end() :]
    else:
        newline = b"\r\n" if b"\r\n" in text else b"\n"
        header = _TABLE_HEADER.search(text)
        if header is not None:
            result = text[: header.start()] + line + newline + text[header.start() :]
        else:
            sep = newline if text and not text.endswith(b"\n") else b""
            result = text + sep + line + newline
    try:
        parsed = tomllib.loads(result.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"the rewritten config would not be valid TOML: {type(exc).__name__}") from None
    if parsed.get("token") != token:
        raise ValueError("the config file's token line could not be rewritten")
    return result


def write_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` by `data`: a temporary file in the same directory (`mode`, fsynced), then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass(frozen=True)
class TokenStore:
    """Where the agent's current token came from, and so where a rotated token must be written."""

    config_path: Path | None  # the config file that was read, if any
    from_env: bool  # WARLOCK_AGENT_TOKEN was set (it wins over the file)

    def store(self, token: str) -> str | None:
        """Persist `token`; return None on success, or why it was not stored (safe to log and send)."""
        if self.from_env:
            return ENV_REFUSAL
        if self.config_path is None:
            return NO_FILE_REFUSAL
        path = self.config_path.resolve()  # a symlinked config: rewrite its target, keep the link
        try:
            write_atomically(path, replace_token_line(path.read_bytes(), token))
        except ValueError as exc:
            return f"{path}: {exc}"
        except OSError as exc:
            return f"cannot write {path}: {exc.strerror or type(exc).__name__}"
        return None
