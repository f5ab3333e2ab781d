"""Sans-I/O pieces of running a command over SSH: the remote wrapper, output caps, exit mapping.

Exec semantics equal the agent's: the command string is the ``-c`` argument of ``/bin/sh``; a timeout
kills the whole process group with SIGKILL (GNU ``timeout`` runs the command in its own process group
and signals that group); at most `max_output_bytes` are kept per stream, with `truncated`.
"""

from __future__ import annotations

import json
import math
import shlex
import signal
from dataclasses import dataclass

from shared.ids import CommandId
from shared.output import OutputCap
from shared.protocol import ExecResult, encode

SHELL = "/bin/sh"
MIN_TIMEOUT_S = 0.001  # GNU timeout treats 0 as "no timeout"; never send it
KILL = int(signal.SIGKILL)


def wrap_command(command: str, timeout_s: float, command_id: str | None = None) -> str:
    """The remote command line: ``exec timeout -s KILL <secs> /bin/sh -c '<command>'``, safely quoted.

    The login shell of the account parses this line; `command` reaches ``/bin/sh -c`` as one argument,
    so nothing in it (``;``, quotes, ``$(...)``, newlines) can run outside the timeout. With `command_id`
    the line starts ``exec env WARLOCK_COMMAND_ID=<id>``: every process of the command inherits the marker,
    so a cancel finds them all (`cancel_script`).
    """
    secs = f"{max(timeout_s, MIN_TIMEOUT_S):.3f}"
    marker = "" if command_id is None else f"env {shlex.quote(f'{MARKER}={command_id}')} "
    return f"exec {marker}timeout -s KILL {secs} {SHELL} -c {shlex.quote(command)}"


MARKER = "WARLOCK_COMMAND_ID"
CANCEL_ROUNDS = 5

# Kill every process whose environment carries WARLOCK_COMMAND_ID=<id>: first their process groups (GNU
# timeout runs the command in a group of its own), then any stragglers one by one, a few rounds (a fork
# made meanwhile inherits the marker and is found next round). Prints how many processes it found. One
# `grep -z` reads every environ where grep has it (GNU, recent busybox); else one `tr | grep` per process.
_CANCEL = r"""
want="$1"; found=0; seen=""; round=0; me=$(ps -o pgid= -p $$ 2>/dev/null | tr -d ' ')
fast=0; printf 'a\0' | grep -qzxF a 2>/dev/null && fast=1  # grep -z: one grep for all of /proc
while [ "$round" -lt {rounds} ]; do
  round=$((round + 1)); pids=""
  if [ "$fast" = 1 ]; then
    for f in $(grep -lzxsF "$want" /proc/[0-9]*/environ); do
      p="${f#/proc/}"; p="${p%/environ}"; [ "$p" = "$$" ] || pids="$pids $p"
    done
  else
    for d in /proc/[0-9]*; do
      p="${d#/proc/}"
      [ "$p" = "$$" ] && continue
      if tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qxF "$want"; then pids="$pids $p"; fi
    done
  fi
  [ -z "$pids" ] && break
  for p in $pids; do
    case " $seen " in *" $p "*) ;; *) found=$((found + 1)); seen="$seen $p" ;; esac
    g=$(ps -o pgid= -p "$p" 2>/dev/null | tr -d ' ')
    [ -n "$g" ] && [ "$g" != "0" ] && [ "$g" != "$me" ] && kill -KILL -- "-$g" 2>/dev/null
    kill -KILL "$p" 2>/dev/null
  done
done
echo "killed $found"
"""


def cancel_script(command_id: str) -> str:
    """The remote command line that kills what runs under `command_id` and prints ``killed <n>``."""
    script = _CANCEL.replace("{rounds}", str(CANCEL_ROUNDS))
    return f"exec {SHELL} -c {shlex.quote(script)} warlock-cancel {shlex.quote(f'{MARKER}={command_id}')}"


def killed_count(stdout: str) -> int | None:
    """The count the cancel script printed (``killed <n>``); None if it printed no such line."""
    for line in reversed(stdout.splitlines()):
        word, _, count = line.strip().partition(" ")
        if word == "killed" and count.isdigit():
            return int(count)
    return None


@dataclass(frozen=True)
class Outcome:
    """How a command ended: exit code, or the signal that ended it, and whether the timeout did."""

    exit_code: int | None
    signal: int | None
    timed_out: bool


def signal_number(name: str) -> int | None:
    """The number of an SSH exit-signal name (``KILL`` → 9); None for a name this OS does not know."""
    try:
        return int(signal.Signals[f"SIG{name.upper().removeprefix('SIG')}"])
    except KeyError:
        return None


def exit_outcome(
    exit_status: int | None,
    exit_signal: str | None,
    elapsed_s: float,
    timeout_s: float,
    client_timed_out: bool = False,
) -> Outcome | None:
    """Map what the SSH channel reported to an Outcome; None when it reported neither status nor signal.

    A SIGKILL (or status 137 from a shell that did not exec) after the timeout elapsed is the remote
    timeout: ``timed_out`` with ``exit_code=None, signal=9``. Elapsed time is measured from before the
    channel opened, so it always covers the remote timer.
    """
    expired = elapsed_s >= timeout_s
    if client_timed_out:
        return Outcome(exit_code=None, signal=KILL, timed_out=True)
    if exit_signal is not None:
        number = signal_number(exit_signal)
        return Outcome(exit_code=None, signal=number, timed_out=number == KILL and expired)
    if exit_status is None or exit_status < 0:
        return None
    if exit_status == 128 + KILL and expired:
        return Outcome(exit_code=None, signal=KILL, timed_out=True)
    return Outcome(exit_code=exit_status, signal=None, timed_out=False)


def build_result(
    command_id: CommandId, outcome: Outcome, out: OutputCap, err: OutputCap, duration_ms: float
) -> ExecResult:
    """The ExecResult of a command that ran over SSH."""
    return ExecResult(
        command_id=command_id,
        exit_code=outcome.exit_code,
        signal=outcome.signal,
        stdout=out.text(),
        stderr=err.text(),
        truncated=bool(out.dropped or err.dropped),
        timed_out=outcome.timed_out,
        duration_ms=max(duration_ms, 0.0),
        via="ssh",
    )


def _json_size(text: str) -> int:
    """Bytes `text` takes as a JSON string."""
    return len(json.dumps(text, ensure_ascii=False).encode())


def fit_result(result: ExecResult, max_bytes: int, slack: int = 1024) -> ExecResult:
    """Shorten the larger output of `result` until its encoding fits in `max_bytes` (sets `truncated`)."""
    budget = max_bytes - slack
    size = len(encode(result))
    while size > budget and (result.stdout or result.stderr):
        sizes = {"stdout": _json_size(result.stdout), "stderr": _json_size(result.stderr)}
        field, other = ("stdout", "stderr") if sizes["stdout"] >= sizes["stderr"] else ("stderr", "stdout")
        excess = size - budget
        # Cut the larger stream down towards the smaller one, and always by at least half the excess.
        cut = max(min(excess, sizes[field] - sizes[other]), math.ceil(excess / 2))
        text: str = getattr(result, field)
        per_char = sizes[field] / max(len(text), 1)  # escapes make some characters several bytes
        keep = max(0, len(text) - math.ceil(cut / per_char) - 1)
        result = result.model_copy(update={field: text[:keep], "truncated": True})
        size = len(encode(result))
    return result
