"""`PresenceRecorder`'s batching, per-host order, key wait, retries and bound, on a scripted store (no I/O).

The store applies writes with the guards the SQL has (`crud.record_presence_batch`), so the end states
checked here are those the database would reach."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from services.api.fleet.presence import PresenceRecorder
from services.api.fleet.verify import Rejections
from services.api.store.crud import PresenceRow, presence_time
from shared import signing
from shared.protocol import PresenceConnected, PresenceDisconnected
from tests.support.fakeagent import AgentKey

KEYS = {f"h{i}": AgentKey() for i in range(1, 4)}


class Store:
    """Rows in memory; every call recorded; the next `fail` calls raise `error`."""

    def __init__(self, hosts: dict[str, str | None]) -> None:
        self.table = {host: PresenceRow(key, None, None) for host, key in hosts.items()}
        self.status: dict[str, str] = dict.fromkeys(hosts, "disconnected")
        self.reads: list[list[str]] = []
        self.writes: list[tuple[list[str], list[str]]] = []
        self.fail = 0  # reads and writes
        self.fail_writes = 0
        self.error: Exception = OSError("connection refused")

    def _maybe_fail(self) -> None:
        if self.fail:
            self.fail -= 1
            raise self.error

    async def rows(self, host_ids: Sequence[str]) -> dict[str, PresenceRow]:
        self._maybe_fail()
        self.reads.append(list(host_ids))
        return {h: self.table[h] for h in host_ids if h in self.table}

    async def write(
        self, connected: Sequence[PresenceConnected], disconnected: Sequence[PresenceDisconnected]
    ) -> None:
        self._maybe_fail()
        if self.fail_writes:
            self.fail_writes -= 1
            raise self.error
        hosts = [e.host_id for e in connected] + [e.host_id for e in disconnected]
        assert len(hosts) == len(set(hosts)), "one event per host per batch"
        self.writes.append(([e.session_id for e in connected], [e.session_id for e in disconnected]))
        for c in connected:
            row = self.table[c.host_id]
            at = presence_time(c.at)
            if row.session_id == c.session_id or row.connected_at is None or row.connected_at <= at:
                self.table[c.host_id] = PresenceRow(row.public_key, c.session_id, at)
                self.status[c.host_id] = "connected"
        for d in disconnected:
            if self.table[d.host_id].session_id == d.session_id:
                self.status[d.host_id] = "disconnected"


def connected(host: str, session: str, at: float | None = None, **fields: object) -> PresenceConnected:
    return KEYS.get(host, KEYS["h1"]).connected(host, session, time.time() if at is None else at, **fields)


def disconnected(host: str, session: str) -> PresenceDisconnected:
    values = {
        "host_id": host,
        "session_id": session,
        "gateway_id": "gw-1",
        "reason": "bye",
        "at": time.time(),
    }
    return PresenceDisconnected.model_validate(values)


def recorder(store: Store, **kw: object) -> PresenceRecorder:
    return PresenceRecorder(store, Rejections(), backoff=(0.01, 0.05), **kw)  # type: ignore[arg-type]


async def drained(rec: PresenceRecorder, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        await rec.drained()


async def test_a_burst_is_recorded_in_a_few_batches() -> None:
    """1,200 connects of 1,200 hosts: 3 reads and 3 writes (batches of 500), every one recorded."""
    agent = AgentKey()
    hosts = [f"s{i}" for i in range(1200)]
    store = Store(dict.fromkeys(hosts, agent.public_key))
    rec = recorder(store, max_batch=500)
    for host in hosts:
        rec.submit(agent.connected(host, f"sess-{host}", time.time()))
    await drained(rec)
    assert [len(r) for r in store.reads] == [500, 500, 200]
    assert len(store.writes) == 3
    assert set(store.status.values()) == {"connected"}
    assert (rec.recorded, rec.batches, rec.queued) == (1200, 3, 0)


async def test_a_hosts_events_are_applied_in_arrival_order_one_per_batch() -> None:
    """connect s1, disconnect s1, connect s2 (newer) of one host while another host's event rides along:
    three batches, and the host ends connected with s2; then a stale connect of s1 changes nothing."""
    store = Store({"h1": KEYS["h1"].public_key, "h2": KEYS["h2"].public_key})
    rec = recorder(store)
    now = time.time()
    rec.submit(connected("h1", "s1", now - 2))
    rec.submit(disconnected("h1", "s1"))
    rec.submit(connected("h2", "t1", now))
    rec.submit(connected("h1", "s2", now))
    await drained(rec)
    assert store.writes == [(["s1", "t1"], []), ([], ["s1"]), (["s2"], [])]
    assert (store.status["h1"], store.table["h1"].session_id) == ("connected", "s2")
    rec.submit(connected("h1", "s1", now - 5))  # a late connect of the older session
    rec.submit(disconnected("h1", "s1"))  # and its disconnect: neither touches s2
    await drained(rec)
    assert (store.status["h1"], store.table["h1"].session_id) == ("connected", "s2")
    assert rec.ignored == 2


@pytest.mark.parametrize("error", [OSError("refused"), TimeoutError()])
async def test_a_database_error_is_retried_and_drops_nothing(error: Exception) -> None:
    """The first 5 attempts fail (reads and writes): the events wait and are recorded once, in order."""
    store = Store({"h1": KEYS["h1"].public_key, "h2": KEYS["h2"].public_key})
    store.fail, store.error = 5, error
    rec = recorder(store)
    rec.submit(connected("h1", "s1"))
    rec.submit(connected("h2", "t1"))
    rec.submit(disconnected("h1", "s1"))
    await drained(rec)
    assert rec.failures == 5
    assert store.writes == [(["s1", "t1"], []), ([], ["s1"])]
    assert store.status == {"h1": "disconnected", "h2": "connected"}
    assert rec.recorded == 3


async def test_a_write_that_fails_is_not_counted_twice() -> None:
    """A forged hello in a batch whose write fails is rejected (and counted) once, after the retry."""
    store = Store({"h1": KEYS["h1"].public_key, "h2": KEYS["h2"].public_key})
    store.fail_writes = 2
    rec = recorder(store)
    rec.submit(connected("h2", "t1"))
    rec.submit(AgentKey().connected("h1", "forged", time.time()))  # signed by another key
    await drained(rec)
    assert rec.failures == 2
    assert rec.rejections.count("presence connected") == 1
    assert rec.rejected == 1
    assert store.status == {"h1": "disconnected", "h2": "connected"}


async def test_a_hello_fresh_when_it_arrived_still_counts_after_an_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Freshness is judged at arrival: the database is back after the hello's age bound passed."""
    store = Store({"h1": KEYS["h1"].public_key})
    store.fail = 3
    rec = recorder(store)
    signed = time.time() - signing.HELLO_MAX_AGE_S + 0.3  # fresh now, stale in 0.3 s
    rec.submit(connected("h1", "s1", signed_at=signed))
    store_rows = store.rows

    async def slow(host_ids: Sequence[str]) -> dict[str, PresenceRow]:
        await asyncio.sleep(0.5)  # the outage outlasts the hello's freshness
        return await store_rows(host_ids)

    monkeypatch.setattr(store, "rows", slow)
    await drained(rec)
    assert (store.status["h1"], rec.rejected) == ("connected", 0)


async def test_a_host_without_a_key_yet_waits_alone() -> None:
    """A host whose key is not recorded: its connect (and its later events) wait, polled; another host's
    events do not; once the key is there the connect counts. A host that never gets a key is rejected."""
    store = Store({"h1": None, "h2": KEYS["h2"].public_key, "h3": None})
    rec = recorder(store, key_wait_s=0.6, key_poll_s=0.05)
    rec.submit(connected("h1", "s1"))
    rec.submit(disconnected("h1", "s1"))
    rec.submit(connected("h3", "u1"))
    rec.submit(connected("h2", "t1"))
    rec.submit(disconnected("h2", "t1"))
    rec.submit(connected("h2", "t2"))
    await asyncio.sleep(0.2)
    assert store.status["h2"] == "connected"
    assert store.table["h2"].session_id == "t2"  # h2 went through three batches meanwhile
    assert store.status["h1"] == "disconnected"
    assert rec.queued == 3  # h1's two, h3's one
    store.table["h1"] = PresenceRow(KEYS["h1"].public_key, None, None)  # the install stored the key
    await drained(rec)
    assert [w for w in store.writes if "s1" in w[0] or "s1" in w[1]] == [(["s1"], []), ([], ["s1"])]
    assert store.status["h1"] == "disconnected"  # connect, then its disconnect, in order
    assert store.status["h3"] == "disconnected"
    assert rec.rejections.count("presence connected") == 1  # h3: no key after the wait


async def test_unknown_hosts_and_forged_hellos_are_rejected_and_counted() -> None:
    store = Store({"h1": KEYS["h1"].public_key})
    rec = recorder(store)
    rec.submit(connected("ghost", "g1"))
    rec.submit(AgentKey().connected("h1", "forged", time.time()))
    rec.submit(connected("h1", "ok", time.time()).model_copy(update={"agent_version": "6.6.6"}))  # altered
    await drained(rec)
    assert rec.rejections.count("presence connected") == 3
    assert store.writes == []
    assert store.status["h1"] == "disconnected"


async def test_an_over_long_queue_keeps_each_hosts_latest_state() -> None:
    """While the database is out, 3 hosts send 40 events each past a bound of 30: each host keeps its last
    connect and what followed; the end state is what all the events would have made it."""
    store = Store({h: k.public_key for h, k in KEYS.items()})
    store.fail = 10**6
    rec = recorder(store, max_queued=30)
    now = time.time()
    for i in range(20):
        for host in KEYS:
            rec.submit(connected(host, f"{host}-{i}", now - 20 + i))
            rec.submit(disconnected(host, f"{host}-{i}"))
    rec.submit(connected("h2", "h2-last", now))
    await asyncio.sleep(0.2)
    assert rec.queued <= 7  # (connect, disconnect) per host, and h2's last connect
    assert rec.superseded >= 120 - 7
    store.fail = 0
    await drained(rec)
    assert store.status == {"h1": "disconnected", "h2": "connected", "h3": "disconnected"}
    assert store.table["h2"].session_id == "h2-last"


async def test_stop_gives_the_queue_a_grace_and_says_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    store = Store({"h1": KEYS["h1"].public_key})
    store.fail = 10**6
    rec = recorder(store)
    rec.submit(connected("h1", "s1"))
    await rec.stop(grace=0.2)
    assert "stopping with 1 presence events of 1 hosts not recorded" in caplog.text
