"""The control socket of `warlock run`: `warlock agent stop|start|status` talk to the running launcher.

One Unix socket in the state directory (``control.sock``, 0600 in a 0700 directory, so only this user can
use it). A client sends one JSON line ``{"agent": "stop"}`` and reads one JSON line back
``{"ok": true, "message": "..."}``. The launcher serves it from its main loop, one request at a time.

Used to watch the SSH fallback: stop the dev agent and the same REST command answers ``"via": "ssh"``,
start it again and it answers ``"via": "agent"``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

AgentAction = Literal["stop", "start", "status"]
ACTIONS: tuple[AgentAction, ...] = ("stop", "start", "status")
SOCKET_NAME = "control.sock"
REQUEST_TIMEOUT_S = 5.0  # a client must send its request within this
ANSWER_TIMEOUT_S = 60.0  # starting the agent waits for its session
MAX_LINE = 4096


class ControlServer:
    """The launcher's end: accept a request when one is waiting, answer it with `handle`."""

    def __init__(self, path: Path, handle: Callable[[AgentAction], tuple[bool, str]]) -> None:
        self.path = path
        self.handle = handle
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket left by a launcher that was killed
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old_umask)
        self.sock.listen(4)

    def serve(self, wait_s: float) -> None:
        """Answer one request if one arrives within `wait_s` seconds."""
        self.sock.settimeout(wait_s)
        try:
            conn, _ = self.sock.accept()
        except (TimeoutError, InterruptedError):
            return
        with conn:
            conn.settimeout(REQUEST_TIMEOUT_S)
            try:
                ok, message = self._answer(_read_line(conn))
            except (OSError, ValueError) as exc:
                ok, message = False, f"bad request: {exc}"
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"ok": ok, "message": message}).encode() + b"\n")

    def _answer(self, line: bytes) -> tuple[bool, str]:
        request = json.loads(line)
        action = request.get("agent") if isinstance(request, dict) else None
        if action not in ACTIONS:
            return False, f'unknown request; send {{"agent": one of {", ".join(ACTIONS)}}}'
        return self.handle(action)

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _read_line(conn: socket.socket) -> bytes:
    """One line (without its newline) of at most MAX_LINE bytes."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_LINE)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_LINE:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


def ask(path: Path, action: AgentAction) -> tuple[bool, str]:
    """Send `action` to the launcher listening on `path`; (False, why) when none is listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(ANSWER_TIMEOUT_S)
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps({"agent": action}).encode() + b"\n")
        answer: Any = json.loads(_read_line(sock) or b"{}")
    except (FileNotFoundError, ConnectionRefusedError):
        return False, f"no `warlock run` is running with state directory {path.parent}"
    except (OSError, ValueError) as exc:
        return False, f"the launcher did not answer: {exc}"
    finally:
        sock.close()
    if not isinstance(answer, dict):
        return False, "the launcher sent a bad answer"
    return bool(answer.get("ok")), str(answer.get("message", ""))
