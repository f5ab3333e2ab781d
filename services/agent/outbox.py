"""The outbox on disk: un-acked results survive an agent restart (a directory of one file per result).

Layout: ``<outbox_path>/<command id>.json``, 0600, in a 0700 directory (default: ``<ledger stem>.outbox``
next to the ledger, so two agents sharing a directory never share an outbox). Each file is one JSON
object::

    {"v": 1, "seq": <order kept>, "host": "<host id>", "result": {...ExecResult or ExecError...}}

A result is kept with the agent's signature when it has one; a result that lost its output to the bound
has none and is signed again when it is sent (`AgentTrust.seal`).

Why one file per result rather than an append log: a file is written to ``.<id>.tmp`` and renamed over
its name (`os.replace`), so a crash mid-write leaves at worst a stray temp file and never touches any
other entry; an ack is one ``unlink`` and dropping an old result's output rewrites only that result,
where a log would need an ack record per result and a periodic rewrite of every un-acked byte. Ids are
``[A-Za-z0-9_-]{1,64}`` (`shared.ids`), so they are safe file names. Like the ledger, files are not
fsynced: the outbox survives an agent crash (SIGKILL, OOM), not a power loss; a file torn by a power
loss is a corrupt entry.

At start (`OutboxStore.load`): stray temp files are removed; an entry that does not parse, names
another host or another id than its file name is skipped with one log line and removed (the ledger still
knows its id); the rest come back oldest first. A failed write or unlink after start is logged and the
result stays in memory: the agent never stops over its outbox.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

from shared.ids import is_command_id

from .results import Result

log = logging.getLogger(__name__)

VERSION = 1
SUFFIX = ".json"
TMP_SUFFIX = ".tmp"
_results: TypeAdapter[Result] = TypeAdapter(Annotated[Result, Field(discriminator="type")])


class OutboxStore:
    """The files of one agent's outbox: `load` at start, then `put` and `remove` as results come and go."""

    def __init__(self, path: Path, host_id: str) -> None:
        self.path = path
        self.host_id = host_id

    def load(self) -> list[tuple[int, Result]]:
        """Create the directory (0700) if needed; return every readable entry as (seq, result), oldest first.

        Raises OSError only when the directory cannot be created or listed (a configuration problem).
        """
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        entries: list[tuple[int, Result]] = []
        for item in sorted(os.scandir(self.path), key=lambda e: e.name):
            name = item.name
            if name.endswith(TMP_SUFFIX):  # a write cut short by a crash: the entry it replaced is intact
                self._unlink(Path(item.path))
            elif name.endswith(SUFFIX) and item.is_file(follow_symlinks=False):
                entry = self._read(Path(item.path))
                if entry is not None:
                    entries.append(entry)
        entries.sort(key=lambda entry: entry[0])
        return entries

    def _read(self, file: Path) -> tuple[int, Result] | None:
        """One entry, or None (logged once, file removed) if it is corrupt or not this agent's."""
        try:
            record = json.loads(file.read_bytes().decode("utf-8"))
            if not isinstance(record, dict) or record.get("v") != VERSION:
                raise ValueError("not an outbox entry of version 1")
            seq = record["seq"]
            if not isinstance(seq, int):
                raise ValueError("seq is not an integer")
            if record.get("host") != self.host_id:
                raise ValueError(f"entry of another host ({str(record.get('host'))[:64]!r})")
            result = _results.validate_python(record["result"])
            if result.command_id + SUFFIX != file.name:
                raise ValueError("command id does not match the file name")
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as exc:
            log.warning(
                "outbox %s: skipping corrupt entry %s (removed): %s", self.path, file.name, str(exc)[:200]
            )
            self._unlink(file)
            return None
        return seq, result

    def put(self, seq: int, result: Result) -> None:
        """Write `result`'s entry atomically (temp file, then rename over the old one); log a failure."""
        command_id = result.command_id
        if not is_command_id(command_id):
            log.warning(
                "outbox: command id %r is not a file name; result kept in memory only", command_id[:80]
            )
            return
        record: dict[str, Any] = {
            "v": VERSION,
            "seq": seq,
            "host": self.host_id,
            "result": result.model_dump(mode="json"),
        }
        data = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
        tmp = self.path / f".{command_id}{TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path / f"{command_id}{SUFFIX}")
        except OSError as exc:
            log.warning(
                "outbox %s: cannot keep the result of %s on disk (%s); kept in memory only",
                self.path,
                command_id,
                exc.strerror or exc,
            )
            self._unlink(tmp)

    def remove(self, command_id: str) -> None:
        """Delete the entry of `command_id` (acked or dropped), if it is there."""
        if is_command_id(command_id):
            self._unlink(self.path / f"{command_id}{SUFFIX}")

    def _unlink(self, file: Path) -> None:
        """Remove `file`; a missing file is fine, another failure is logged."""
        try:
            file.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("outbox %s: cannot remove %s: %s", self.path, file.name, exc.strerror or exc)

    def size(self) -> int:
        """Bytes the entries take on disk (for tests and the bound)."""
        return sum(f.stat().st_size for f in self.path.glob(f"*{SUFFIX}"))
