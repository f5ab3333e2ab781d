"""The outbox on disk: un-acked results survive a restart, bounded, corrupt entries skipped."""

from __future__ import annotations

import json
import logging
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from services.agent.cli import main
from services.agent.commands import Commands
from services.agent.config import AgentSettings, outbox_dir
from services.agent.ledger import Ledger
from services.agent.outbox import OutboxStore
from services.agent.results import Outbox, Result
from shared import signing
from shared.errors import ErrorCode
from shared.ids import CommandId
from shared.protocol import ExecError, ExecResult
from tests.support.agent_trust import HOST, agent_trust, signed_exec
from tests.support.trust import TestSigner


def result(command_id: str, stdout: str = "hi\n", exit_code: int = 0) -> ExecResult:
    """A finished command's result (unsigned)."""
    return ExecResult(
        command_id=CommandId(command_id),
        exit_code=exit_code,
        stdout=stdout,
        stderr="",
        duration_ms=3,
    )


def box(path: Path, max_bytes: int = 1 << 20, limit: int = 100, host: str = HOST) -> Outbox:
    """A durable outbox in `path`, opened."""
    outbox = Outbox(limit=limit, max_bytes=max_bytes, store=OutboxStore(path, host))
    outbox.open()
    return outbox


def test_unacked_results_come_back_in_order_with_their_signature(tmp_path: Path) -> None:
    """Three results kept, one acked: a new outbox on the same directory has the other two, oldest first,
    each byte for byte what was kept (the agent's signature still verifies). Files 0600, directory 0700."""
    trust = agent_trust(tmp_path)
    public = signing.parse_public(trust.public_key)
    path = tmp_path / "state" / "ledger.outbox"
    first = box(path)
    sealed = [trust.seal(result(f"c{i}", f"out {i} é\n")) for i in range(3)]
    for r in sealed:
        first.add(r)
    assert first.ack("c1")
    assert sorted(p.name for p in path.iterdir()) == ["c0.json", "c2.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in path.iterdir())

    again = box(path)
    pending = again.pending()
    assert pending == [sealed[0], sealed[2]]
    assert all(isinstance(r, ExecResult) and signing.verify_result(public, HOST, r) for r in pending)
    again.add(result("c3"))  # newer than what was loaded
    assert [r.command_id for r in box(path).pending()] == ["c0", "c2", "c3"]


def test_an_acked_result_is_gone_from_disk(tmp_path: Path) -> None:
    """Ack removes the file; an ack for an unknown id changes nothing."""
    outbox = box(tmp_path / "o")
    outbox.add(result("c1"))
    assert outbox.ack("c1")
    assert not outbox.ack("c1")
    assert list((tmp_path / "o").iterdir()) == []
    assert box(tmp_path / "o").pending() == []


def test_corrupt_entries_are_skipped_with_one_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, a torn file, another host's entry, a file named for another id, an old version: each is
    skipped with one warning and removed (so the next start is quiet); the good entry loads; a temp file
    left by a crash mid-write is removed and the entry it was replacing is intact."""
    path = tmp_path / "o"
    outbox = box(path)
    outbox.add(result("good"))
    good = (path / "good.json").read_bytes()
    (path / "garbage.json").write_bytes(b"\x00\xff not json")
    (path / "torn.json").write_bytes(good[: len(good) // 2])
    record = json.loads(good)
    (path / "other.json").write_text(json.dumps({**record, "host": "web-2"}))
    (path / "renamed.json").write_bytes(good)
    (path / "old.json").write_text(json.dumps({**record, "v": 0}))
    (path / ".good.tmp").write_bytes(good[:10])  # a rewrite of `good` cut short
    (path / "README").write_text("not an entry")
    caplog.set_level(logging.INFO, logger="services.agent")

    loaded = box(path)
    assert [r.command_id for r in loaded.pending()] == ["good"]
    skipped = [r.getMessage() for r in caplog.records if "skipping corrupt entry" in r.getMessage()]
    assert len(skipped) == 5
    for name in ("garbage", "torn", "other", "renamed", "old"):
        assert sum(f"{name}.json" in line for line in skipped) == 1
    assert sorted(p.name for p in path.iterdir()) == ["README", "good.json"]
    caplog.clear()
    assert [r.command_id for r in box(path).pending()] == ["good"]
    assert not [r for r in caplog.records if "corrupt" in r.getMessage()]


def test_the_bound_holds_on_disk_and_after_a_restart(tmp_path: Path) -> None:
    """Past `max_bytes` the oldest lose their output on disk too (outcome kept, `truncated`, no stale
    signature); past `limit` the oldest file is removed. A restart with a smaller bound applies it."""
    trust = agent_trust(tmp_path)
    path = tmp_path / "o"
    outbox = box(path, max_bytes=5000, limit=4)
    for i in range(5):
        outbox.add(trust.seal(result(f"c{i}", "x" * 2000, exit_code=i)))
    assert outbox.output_bytes() <= 5000
    assert sorted(p.name for p in path.iterdir()) == [f"c{i}.json" for i in range(1, 5)]  # limit 4
    store = OutboxStore(path, HOST)
    assert store.size() < 5000 + 4 * 512
    loaded = box(path, max_bytes=5000, limit=4).pending()
    assert [r.command_id for r in loaded] == ["c1", "c2", "c3", "c4"]
    kept = [r for r in loaded if isinstance(r, ExecResult)]
    assert [r.exit_code for r in kept] == [1, 2, 3, 4]
    assert [bool(r.stdout) for r in kept] == [False, False, True, True]
    assert all(r.truncated and r.signature is None for r in kept[:2])

    smaller = box(path, max_bytes=2000, limit=4)
    assert smaller.output_bytes() <= 2000
    assert store.size() < 2000 + 4 * 512
    assert [bool(r.stdout) for r in box(path, max_bytes=2000).pending() if isinstance(r, ExecResult)] == [
        False,
        False,
        False,
        True,
    ]


def test_a_failed_write_keeps_the_result_in_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The directory vanished under the agent: one warning per result, no exception, still re-sent."""
    path = tmp_path / "o"
    outbox = box(path)
    path.rmdir()
    caplog.set_level(logging.WARNING, logger="services.agent")
    outbox.add(result("c1"))
    assert [r.command_id for r in outbox.pending()] == ["c1"]
    assert sum("cannot keep the result of c1" in r.getMessage() for r in caplog.records) == 1
    assert outbox.ack("c1")


def test_default_path_is_beside_the_ledger(tmp_path: Path) -> None:
    """`outbox_path` defaults to ``<ledger stem>.outbox`` next to the ledger; set, it is used as is."""
    base: dict[str, Any] = {
        "host_id": "web-1",
        "token": "ab" * 32,
        "gateway_urls": ["ws://127.0.0.1:1/agent"],
        "trusted_keys": [TestSigner(tmp_path).public_key],
        "ledger_path": tmp_path / "a-ledger.jsonl",
    }
    assert outbox_dir(AgentSettings(**base)) == tmp_path / "a-ledger.outbox"
    assert outbox_dir(AgentSettings(**base, outbox_path=tmp_path / "x")) == tmp_path / "x"
    assert AgentSettings(**{k: v for k, v in base.items() if k != "ledger_path"}).outbox_path is None
    assert outbox_dir(AgentSettings(**{k: v for k, v in base.items() if k != "ledger_path"})) == Path(
        "/var/lib/warlock-agent/ledger.outbox"
    )


# ----------------------------------------------------------------------------- with the ledger


def test_ledger_learns_a_result_that_reached_only_the_outbox(tmp_path: Path) -> None:
    """A crash after the outbox kept a result and before the ledger recorded it done: the ledger has the
    id as started; learning the outbox's result makes a repeat `replay` (re-sent, not run), not
    `unknown_result`. Errors and ids the ledger does not hold are not learned."""
    now = time.time()
    lines = [{"id": c, "at": now, "state": "started"} for c in ("c1", "c2")]  # as the crash left it
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.open()
    unknown = ledger.replay("c1")
    assert unknown is not None
    assert unknown.code is ErrorCode.UNKNOWN_RESULT
    assert ledger.learn(result("c1"))
    assert not ledger.learn(result("c1"))  # already done
    assert not ledger.learn(result("c9"))  # not started here (or forgotten): nothing to settle
    busy = ExecError(command_id=CommandId("c2"), code=ErrorCode.BUSY, description="no slot")
    assert not ledger.learn(busy)
    refused = ledger.replay("c1")
    assert refused is not None
    assert refused.code is ErrorCode.REPLAY
    ledger.close()
    reopened = Ledger(tmp_path / "ledger.jsonl")
    reopened.open()
    assert reopened.lookup("c1") == result("c1")
    still = reopened.replay("c2")
    assert still is not None
    assert still.code is ErrorCode.UNKNOWN_RESULT
    reopened.close()


async def test_a_result_is_on_disk_before_the_ledger_records_it_done(tmp_path: Path) -> None:
    """The ordering that makes `Ledger.learn` enough: when the ledger appends "done", the signed result
    is already in the outbox directory; delivering it does not write it twice."""
    signer = TestSigner(tmp_path)
    trust = agent_trust(tmp_path, signer=signer)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.open()
    path = tmp_path / "o"
    outbox = box(path)
    seen: list[tuple[str, bool]] = []
    append = ledger._append

    def spy(record: dict[str, Any]) -> None:
        seen.append((record["state"], (path / f"{record['id']}.json").exists()))
        append(record)

    ledger._append = spy  # type: ignore[method-assign]
    writes: list[str] = []
    put = outbox.store.put if outbox.store is not None else None
    assert put is not None

    def count(seq: int, r: Result) -> None:
        writes.append(r.command_id)
        put(seq, r)

    assert outbox.store is not None
    outbox.store.put = count  # type: ignore[method-assign,assignment]
    delivered: list[Result] = []

    async def deliver(r: Result) -> None:
        delivered.append(r)

    commands = Commands(ledger, outbox, deliver, trust=trust, limit=1, max_output=1024)
    commands.start(signed_exec(signer, "c1", "echo hi"))
    await commands.wait(10)
    assert seen == [("started", False), ("done", True)]
    assert writes == ["c1"]
    assert isinstance(delivered[0], ExecResult)
    on_disk = box(path).pending()
    assert on_disk == delivered
    assert signing.verify_result(signing.parse_public(trust.public_key), HOST, delivered[0])
    ledger.close()


def test_an_unusable_outbox_path_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`outbox_path` under a regular file: `warlock-agent run` exits 2 with one line naming the field."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    conf = tmp_path / "agent.conf"
    conf.write_text(
        'host_id = "web-1"\n'
        f'token = "{"ab" * 32}"\n'
        'gateway_urls = ["ws://127.0.0.1:1/agent"]\n'
        f'trusted_keys = ["{TestSigner(tmp_path).public_key}"]\n'
        f'identity_key_file = "{tmp_path / "agent.key"}"\n'
        f'ledger_path = "{tmp_path / "ledger.jsonl"}"\n'
        f'outbox_path = "{blocker / "outbox"}"\n'
    )
    conf.chmod(0o600)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["run", "--config", str(conf)]) == 2
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "config error: outbox_path (WARLOCK_AGENT_OUTBOX_PATH): cannot open" in err
    assert "Traceback" not in err
