"""Sans-I/O logic of the SSH fallback worker: command wrapping, output caps, exit mapping, reply fitting."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from services.fallback_ssh.execution import (
    KILL,
    Outcome,
    build_result,
    exit_outcome,
    fit_result,
    signal_number,
    wrap_command,
)
from shared.ids import CommandId
from shared.output import OutputCap
from shared.protocol import encode

NASTY = [
    "echo hi",
    "echo 'single' \"double\" $HOME `id -u` $(echo sub)",
    "true; touch {marker}",
    "true' ; touch {marker}; echo '",
    'true" ; touch {marker}; echo "',
    "true\ntouch {marker}",
    "exit 0 && touch {marker} || touch {marker}",
    "echo \\'; touch {marker} #",
    "x=$'\\''; touch {marker}",
]


@pytest.mark.parametrize("command", NASTY)
def test_wrapped_command_is_one_sh_argument(command: str) -> None:
    """The login shell sees exec timeout -s KILL <secs> /bin/sh -c followed by exactly the command."""
    argv = shlex.split(wrap_command(command, 5))
    assert argv == ["exec", "timeout", "-s", "KILL", "5.000", "/bin/sh", "-c", command]


@pytest.mark.parametrize("command", NASTY[2:])
def test_metacharacters_cannot_run_outside_the_wrapper(command: str, tmp_path: Path) -> None:
    """Run by a real shell, the wrapped line runs only /bin/sh -c '<command>': the injected part is data."""
    marker = tmp_path / "escaped"
    probe = tmp_path / "argv"
    # A fake `timeout` records its arguments instead of running them, so nothing inside runs.
    fake = tmp_path / "timeout"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > {probe}\n')
    fake.chmod(0o755)
    line = wrap_command(command.format(marker=marker), 2)
    subprocess.run(["/bin/bash", "-c", line], check=True, env={"PATH": f"{tmp_path}:/usr/bin:/bin"})
    assert not marker.exists()
    assert probe.read_bytes().split(b"\0")[:-1][-1].decode() == command.format(marker=marker)


def test_timeout_seconds_never_zero() -> None:
    """GNU timeout reads 0 as 'no timeout'; tiny timeouts are sent as at least 1 ms."""
    assert " 0.001 " in wrap_command("true", 1e-9)
    assert " 86400.000 " in wrap_command("true", 86400)


def test_output_cap_keeps_prefix_and_counts_rest() -> None:
    """The cap keeps the first bytes and counts what it drops, across chunks."""
    cap = OutputCap(5)
    for chunk in (b"abc", b"def", b"gh"):
        cap.feed(chunk)
    assert cap.text() == "abcde"
    assert cap.dropped == 3


def test_output_cap_replaces_invalid_utf8() -> None:
    """Bytes that are not UTF-8 become replacement characters, never an exception."""
    cap = OutputCap(10)
    cap.feed(b"ok\xff")
    assert cap.text() == "ok\ufffd"


@pytest.mark.parametrize(
    ("status", "sig", "elapsed", "client", "expected"),
    [
        (0, None, 0.1, False, Outcome(0, None, False)),
        (3, None, 0.1, False, Outcome(3, None, False)),
        (-1, "KILL", 5.2, False, Outcome(None, KILL, True)),  # the remote timeout fired
        (-1, "KILL", 0.2, False, Outcome(None, KILL, False)),  # killed by someone else, early
        (-1, "TERM", 9.0, False, Outcome(None, 15, False)),
        (137, None, 5.3, False, Outcome(None, KILL, True)),  # a shell that did not exec reports 128+9
        (137, None, 0.3, False, Outcome(137, None, False)),  # the command itself exited 137
        (None, None, 6.0, True, Outcome(None, KILL, True)),  # channel closed by the client-side timeout
        (None, "NOSUCHSIG", 1.0, False, Outcome(None, None, False)),
    ],
)
def test_exit_outcome(
    status: int | None, sig: str | None, elapsed: float, client: bool, expected: Outcome
) -> None:
    """Exit status and exit signal from SSH map to the agent's exit_code / signal / timed_out."""
    assert exit_outcome(status, sig, elapsed, 5.0, client) == expected


def test_exit_outcome_none_without_status_or_signal() -> None:
    """A channel that closed without status or signal has no outcome (the worker reports disconnected)."""
    assert exit_outcome(None, None, 1.0, 5.0) is None


def test_signal_number_accepts_both_spellings() -> None:
    """SSH sends 'KILL'; 'SIGKILL' is accepted too."""
    assert signal_number("KILL") == signal_number("SIGKILL") == 9


def test_fit_result_shrinks_to_max_payload() -> None:
    """A result larger than the NATS max payload is cut (longest stream first) and marked truncated."""
    out, err = OutputCap(10**6), OutputCap(10**6)
    out.feed(b"a" * 600_000)
    err.feed(b"\x01" * 100_000)  # six bytes each once JSON-escaped
    result = build_result(CommandId("c1"), Outcome(0, None, False), out, err, 1.0)
    fitted = fit_result(result, 256 * 1024)
    assert len(encode(fitted)) <= 256 * 1024
    assert fitted.truncated
    assert fitted.stdout.startswith("aaa")
    assert result.via == fitted.via == "ssh"


def test_fit_result_leaves_small_results_alone() -> None:
    """A result that fits is returned unchanged."""
    out, err = OutputCap(100), OutputCap(100)
    out.feed(b"hello")
    result = build_result(CommandId("c1"), Outcome(0, None, False), out, err, 1.0)
    assert fit_result(result, 1024 * 1024) is result
