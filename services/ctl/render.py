"""How the operator CLI shows things: tables, per-host outcomes, the job summary, and the three ways
`warlock exec` reports as it goes — a rich progress bar on a terminal (`TerminalSink`), plain lines when
piped (`PlainSink`), one JSON object per line for scripts (`JsonSink`). No HTTP here (`client` does it)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from services.ctl.client import HOST_ACTIVE_STATUSES as ACTIVE_STATUSES

COUNT_KEYS = ("succeeded", "failed", "timed_out", "unreachable", "cancelled", "skipped", "pending")
STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timed_out": "yellow",
    "unreachable": "magenta",
    "undeliverable": "magenta",
    "cancelled": "yellow",
    "skipped": "yellow",
}


def labels_text(labels: Mapping[str, Any] | None) -> str:
    """``k=v,k2=v2`` (sorted), or ``-``."""
    return ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or "-"


def outcomes_of(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The job's per-host outcomes (``outcomes``; ``hosts`` accepted too)."""
    found = job.get("outcomes")
    if found is None:
        found = job.get("hosts")
    return list(found) if isinstance(found, list) else []


def targets_of(job: Mapping[str, Any]) -> int:
    """How many hosts the job targets (``targets``, else the outcomes listed)."""
    given = job.get("targets")
    return given if isinstance(given, int) and not isinstance(given, bool) else len(outcomes_of(job))


def host_id(entry: Mapping[str, Any]) -> str:
    """The host of a job's per-host entry (``host_id``; ``host`` accepted too)."""
    return str(entry.get("host_id") or entry.get("host") or "?")


def counts_of(job: Mapping[str, Any]) -> dict[str, int]:
    """The job's counts; counted from its hosts where the API gave none."""
    given = job.get("counts")
    if isinstance(given, dict) and given:
        return {k: int(v) for k, v in given.items() if isinstance(v, int)}
    counts: dict[str, int] = {}
    for entry in outcomes_of(job):
        status = str(entry.get("status") or "pending")
        counts[status] = counts.get(status, 0) + 1
    return counts


def counts_text(counts: Mapping[str, int]) -> str:
    """``2 succeeded, 1 failed, 1 unreachable`` (succeeded always; the rest when not 0)."""
    keys = [*COUNT_KEYS, *sorted(k for k in counts if k not in COUNT_KEYS)]
    parts = [
        f"{counts.get(k, 0)} {k.replace('_', ' ')}" for k in keys if k == "succeeded" or counts.get(k, 0)
    ]
    return ", ".join(parts)


def why(entry: Mapping[str, Any]) -> str:
    """Why a host did not succeed, in a few words: the API's description, else its code, else the exit
    status; with the path (``via``) when known."""
    parts: list[str] = []
    if entry.get("exit_code") is not None:
        parts.append(f"exit {entry['exit_code']}")
    if entry.get("signal") is not None:
        parts.append(f"signal {entry['signal']}")
    if entry.get("error_code"):
        parts.append(str(entry["error_code"]))
    if entry.get("via"):
        parts.append(f"via {entry['via']}")
    text = ", ".join(parts)
    if entry.get("error_description"):
        text = f"{text}: {entry['error_description']}" if text else str(entry["error_description"])
    return text or "no detail"


def outcome_line(entry: Mapping[str, Any]) -> str:
    """``web1 => failed (exit 2, via agent)``."""
    return f"{host_id(entry)} => {entry.get('status') or 'pending'} ({why(entry)})"


def summary_lines(job: Mapping[str, Any]) -> list[str]:
    """The final summary: the job, its counts, and one line per host that did not succeed."""
    hosts = outcomes_of(job)
    counts = counts_of(job)
    total = targets_of(job)
    lines = [f"job {job.get('job_id', '?')} {job.get('state', '?')}: {total} hosts: {counts_text(counts)}"]
    failed = [h for h in hosts if h.get("status") != "succeeded"]
    width = max((len(host_id(h)) for h in failed), default=0)
    status_width = max((len(str(h.get("status") or "pending")) for h in failed), default=0)
    for entry in sorted(failed, key=host_id):
        status = str(entry.get("status") or "pending")
        lines.append(f"  {host_id(entry):<{width}}  {status:<{status_width}}  {why(entry)}")
    return lines


def plain_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns aligned with spaces (for pipes: `awk`, `cut`); the last column is not padded."""
    rows = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    out = []
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)] + [row[-1]]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def print_table(
    console: Console | None, title: str | None, header: Sequence[str], rows: list[list[str]]
) -> None:
    """A rich table on a terminal (`console` given), else `plain_table` on stdout."""
    if console is None:
        print(plain_table(header, rows))
        return
    table = Table(title=title, title_justify="left", header_style="bold")
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*[Text(c) for c in row])  # Text: remote data is never read as rich markup
    console.print(table)


class Sink(Protocol):
    """Where `warlock exec` reports: the job, output chunks, each host's outcome, progress, the end."""

    def start(self, job: Mapping[str, Any]) -> None: ...
    def output(self, host: str, command_id: str, stream: str, data: str) -> None: ...
    def host_done(self, entry: Mapping[str, Any]) -> None: ...
    def progress(self, job: Mapping[str, Any]) -> None: ...
    def finish(self, job: Mapping[str, Any], status: int) -> None: ...
    def note(self, message: str) -> None: ...
    def stop(self) -> None: ...


class _Lines:
    """Output chunks cut into lines per (host, stream): a line is shown once it is complete."""

    def __init__(self) -> None:
        self.partial: dict[tuple[str, str], str] = {}

    def feed(self, host: str, stream: str, data: str) -> list[str]:
        text = self.partial.pop((host, stream), "") + data
        *lines, rest = text.split("\n")
        if rest:
            self.partial[(host, stream)] = rest
        return [line.removesuffix("\r") for line in lines]

    def flush(self, host: str) -> list[tuple[str, str]]:
        """The unfinished last line of each of `host`'s streams."""
        done = [(s, t) for (h, s), t in self.partial.items() if h == host]
        for stream, _ in done:
            del self.partial[(host, stream)]
        return done


def _prefix(host: str, stream: str) -> str:
    return f"{host}: " if stream == "stdout" else f"{host} [{stream}]: "


class PlainSink:
    """Plain lines on stdout: ``host: line`` (``host [stderr]: line``), ``host => outcome``, the summary."""

    def __init__(self, out: IO[str] | None = None, *, show_outcomes: bool = True) -> None:
        self.out = out or sys.stdout
        self.lines = _Lines()
        self.show_outcomes = show_outcomes

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start(self, job: Mapping[str, Any]) -> None:
        total = targets_of(job)
        size = f" on {total} hosts" if total else ""
        self._print(f"job {job.get('job_id')}{size}")

    def output(self, host: str, command_id: str, stream: str, data: str) -> None:
        for line in self.lines.feed(host, stream, data):
            self._print(_prefix(host, stream) + line)

    def host_done(self, entry: Mapping[str, Any]) -> None:
        for stream, rest in self.lines.flush(host_id(entry)):
            self._print(_prefix(host_id(entry), stream) + rest)
        if self.show_outcomes:
            self._print(outcome_line(entry))

    def progress(self, job: Mapping[str, Any]) -> None:
        pass  # plain output shows outcomes as they come, no bar

    def finish(self, job: Mapping[str, Any], status: int) -> None:
        for line in summary_lines(job):
            self._print(line)

    def note(self, message: str) -> None:
        print(f"warlock: {message}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        pass


class TerminalSink(PlainSink):
    """On a terminal: output lines above a live progress bar (done/total, counts so far), coloured
    outcomes, then the summary."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.bar.add_task("starting", total=None)

    def _print(self, text: str) -> None:
        self.console.print(Text(text), highlight=False, soft_wrap=True)

    def start(self, job: Mapping[str, Any]) -> None:
        self.bar.start()
        self.console.print(Text(f"job {job.get('job_id')}", style="bold"))
        self.progress(job)

    def output(self, host: str, command_id: str, stream: str, data: str) -> None:
        for line in self.lines.feed(host, stream, data):
            self._line(host, stream, line)

    def _line(self, host: str, stream: str, line: str) -> None:
        tag = (
            Text(f"{host} ", style="cyan") if stream == "stdout" else Text(f"{host} [{stream}] ", style="red")
        )
        self.console.print(Text.assemble(tag, "| ", line), highlight=False, soft_wrap=True)

    def host_done(self, entry: Mapping[str, Any]) -> None:
        host = host_id(entry)
        for stream, rest in self.lines.flush(host):
            self._line(host, stream, rest)
        status = str(entry.get("status") or "pending")
        self.console.print(
            Text.assemble(
                (f"{host} ", "cyan"),
                ("=> ", "dim"),
                (status, STATUS_STYLE.get(status, "")),
                f" ({why(entry)})",
            ),
            highlight=False,
        )

    def progress(self, job: Mapping[str, Any]) -> None:
        hosts = outcomes_of(job)
        counts = counts_of(job)
        total = targets_of(job) or None
        done = sum(1 for h in hosts if h.get("status") is not None and h.get("status") not in ACTIVE_STATUSES)
        shown = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v and k != "pending")
        self.bar.update(self.task, total=total, completed=done, description=shown or "running")

    def stop(self) -> None:
        self.bar.stop()  # the cursor back, whatever happened

    def finish(self, job: Mapping[str, Any], status: int) -> None:
        self.bar.stop()
        first, *rest = summary_lines(job)
        self.console.print(Text(first, style="bold green" if status == 0 else "bold red"), highlight=False)
        for line in rest:
            self.console.print(Text(line), highlight=False)

    def note(self, message: str) -> None:
        self.console.print(Text(f"warlock: {message}", style="yellow"), highlight=False)


class JsonSink:
    """One JSON object per line on stdout, each with an ``event``: ``job`` (the job as created),
    ``output`` (a chunk: host, command_id, stream, data), ``host`` (a host's outcome), ``summary`` (last:
    the job's final document plus ``exit_status``). Notes go to stderr."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self.out = out or sys.stdout

    def _emit(self, event: str, body: Mapping[str, Any]) -> None:
        print(json.dumps({"event": event, **body}, separators=(",", ":")), file=self.out, flush=True)

    def start(self, job: Mapping[str, Any]) -> None:
        self._emit("job", job)

    def output(self, host: str, command_id: str, stream: str, data: str) -> None:
        self._emit("output", {"host_id": host, "command_id": command_id, "stream": stream, "data": data})

    def host_done(self, entry: Mapping[str, Any]) -> None:
        self._emit("host", entry)

    def progress(self, job: Mapping[str, Any]) -> None:
        pass

    def finish(self, job: Mapping[str, Any], status: int) -> None:
        self._emit("summary", {**job, "exit_status": status})

    def note(self, message: str) -> None:
        print(f"warlock: {message}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        pass
