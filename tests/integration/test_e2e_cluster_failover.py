"""Gateway failover in `warlock run --cluster`: SIGKILL the gateway the agent is on, under a steady stream
of commands through both APIs to the real agent and to 200 simulated agents (`services.dev.swarm`, signed
with per-agent keys; hosts provisioned with `tests.support.fleet`), half of them dialling each gateway first.

Asserted: the real agent and every swarm agent are back through the surviving gateway within 15 s; both
APIs show them connected via it within the bound, and still so after the silence bound has passed for the
dead gateway; no command ran twice (the real agent's: each appends its own marker to a file on the host;
the swarm's: each command id a swarm agent received is counted); every accepted command ends in a final
state, and one reported succeeded ran exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection

from services.dev.swarm import Swarm
from shared.ids import HostId
from shared.protocol import Exec, decode_gateway_frame
from tests.support.cluster import HOST, ClusterRun, cluster_run
from tests.support.fleet import provision

pytestmark = pytest.mark.e2e

SWARM = 200
BACK_WITHIN_S = 15.0
SILENCE_S = 4.0  # WARLOCK_API_GATEWAY_SILENCE for the test (default 15 s); heartbeats every 1 s
TICK_S = 0.15
COMMAND_TIMEOUT_S = 5.0
EXEC_GRACE_S = 3.0
FINAL = {"succeeded", "failed", "timed_out", "undeliverable"}


class CountingSwarm(Swarm):
    """A swarm that counts every exec each of its agents receives, by command id."""

    def __init__(self, urls: list[str], tokens: dict[HostId, str], received: Counter[str]) -> None:
        super().__init__(urls, tokens, concurrency=50)
        self.received = received

    async def _serve(self, ws: ClientConnection, trust: Any) -> None:
        counted = _Counting(ws, self.received)
        await super()._serve(counted, trust)  # type: ignore[arg-type]


class _Counting:
    """A connection whose incoming exec frames are counted before the swarm agent answers them."""

    def __init__(self, ws: ClientConnection, received: Counter[str]) -> None:
        self.ws = ws
        self.received = received

    def __aiter__(self) -> _Counting:
        self._frames = self.ws.__aiter__()
        return self

    async def __anext__(self) -> str | bytes:
        raw = await self._frames.__anext__()
        with contextlib.suppress(Exception):
            frame = decode_gateway_frame(raw)
            if isinstance(frame, Exec):
                self.received[frame.command_id] += 1
        return raw

    async def send(self, message: str, text: bool = True) -> None:
        await self.ws.send(message, text=text)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)


async def _agents(http: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    answer = await http.get("/api/agents")
    assert answer.status_code == 200, answer.text
    return {a["host_id"]: a for a in answer.json()}


async def _all_on(
    apis: list[httpx.AsyncClient], hosts: set[str], gateway_ids: set[str], timeout: float
) -> float:
    """Seconds until every API shows every one of `hosts` connected via one of `gateway_ids`."""
    began = time.monotonic()
    while True:
        views = [await _agents(http) for http in apis]
        if all(
            view[h]["connected"] and view[h]["gateway_id"] in gateway_ids for view in views for h in hosts
        ):
            return time.monotonic() - began
        if time.monotonic() - began > timeout:
            off = sorted(
                h
                for view in views
                for h in hosts
                if not (view[h]["connected"] and view[h]["gateway_id"] in gateway_ids)
            )
            raise AssertionError(
                f"not connected via {gateway_ids} after {timeout}s: {len(off)}, e.g. {off[:5]}"
            )
        await asyncio.sleep(0.2)


async def _command(
    http: httpx.AsyncClient, host: str, command: str, sent: list[tuple[str, str, httpx.Response | None]]
) -> None:
    body = {"command": command, "timeout": COMMAND_TIMEOUT_S}
    try:
        answer: httpx.Response | None = await http.post(f"/api/hosts/{host}/exec", json=body)
    except httpx.HTTPError:
        answer = None
    sent.append((host, command, answer))


async def test_gateway_sigkill_under_a_stream_of_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill the real agent's gateway mid-stream: all back via the other within 15 s, nothing ran twice,
    every command final, presence right in both APIs."""
    env = {
        "WARLOCK_API_GATEWAY_SILENCE": str(SILENCE_S),
        "WARLOCK_GATEWAY_HEARTBEAT_INTERVAL": "1",
        "WARLOCK_API_EXEC_GRACE": str(EXEC_GRACE_S),
    }
    async with cluster_run(tmp_path, **env) as run:
        await _failover(run, tmp_path, monkeypatch)


async def _failover(run: ClusterRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = run.info
    gw_urls: list[str] = info["gateway_urls"]
    tokens = await provision(run.env["WARLOCK_DATABASE_URL"], SWARM, tmp_path / "swarm.json")
    monkeypatch.setenv("SSL_CERT_FILE", info["ca_file"])  # the swarm's wss:// verifies the local CA
    received: Counter[str] = Counter()
    hosts = sorted(tokens)
    halves = [
        {HostId(h): tokens[h] for h in hosts[: SWARM // 2]},
        {HostId(h): tokens[h] for h in hosts[SWARM // 2 :]},
    ]
    swarms = [CountingSwarm(gw_urls, halves[0], received), CountingSwarm(gw_urls[::-1], halves[1], received)]
    swarm_tasks = [asyncio.create_task(s.run()) for s in swarms]
    marker_file = tmp_path / "markers.txt"
    apis = [httpx.AsyncClient(base_url=url, headers=run.auth, timeout=60) for url in info["api_urls"]]
    sent: list[tuple[str, str, httpx.Response | None]] = []
    commands: list[asyncio.Task[None]] = []
    stop_stream = asyncio.Event()

    async def stream(index: int, http: httpx.AsyncClient) -> None:
        tick = 0
        while not stop_stream.is_set():
            marker = f"m-{index}-{tick}"
            commands.append(
                asyncio.create_task(_command(http, HOST, f"echo {marker} >> {marker_file}", sent))
            )
            swarm_host = hosts[(tick * 7 + index * 101) % SWARM]
            commands.append(asyncio.create_task(_command(http, swarm_host, f"echo {marker}", sent)))
            tick += 1
            await asyncio.sleep(TICK_S)

    try:
        everyone = {HOST, *hosts}
        gateway_ids = {"dev-gw1", "dev-gw2"}
        await _all_on(apis, everyone, gateway_ids, 30)
        streams = [asyncio.create_task(stream(i, http)) for i, http in enumerate(apis)]
        await asyncio.sleep(2)

        on = (await _agents(apis[0]))[HOST]["gateway_id"]
        victim = run.part(f"gateway-{on.removeprefix('dev-gw')}")
        survivor_id = next(g for g in gateway_ids if g != on)
        survivor_url = gw_urls[int(survivor_id.removeprefix("dev-gw")) - 1]
        moved = {h for h, a in (await _agents(apis[0])).items() if a["gateway_id"] == on}
        assert HOST in moved
        assert len(moved) > SWARM // 3  # half the swarm dialled this gateway first
        # one command still running on the agent when its gateway dies: answered late or "may have run"
        slow = f"sleep 2; echo slow-marker >> {marker_file}"
        commands.append(asyncio.create_task(_command(apis[0], HOST, slow, sent)))
        await asyncio.sleep(0.7)
        agent_log = Path(run.part("agent")["log"])
        log_offset = agent_log.stat().st_size
        killed_at = time.monotonic()
        os.kill(victim["pid"], signal.SIGKILL)

        # the real agent: a new session through the survivor (its own log)
        established = re.compile(rf"session \S+ established with {re.escape(survivor_url)}")
        while not established.search(agent_log.read_bytes()[log_offset:].decode(errors="replace")):
            assert time.monotonic() - killed_at < BACK_WITHIN_S, agent_log.read_text()[-2000:]
            await asyncio.sleep(0.05)
        agent_back_s = time.monotonic() - killed_at
        # the swarm: every session up again
        while sum(s.up for s in swarms) < SWARM:
            assert time.monotonic() - killed_at < BACK_WITHIN_S, [s.up for s in swarms]
            await asyncio.sleep(0.05)
        swarm_back_s = time.monotonic() - killed_at
        # both APIs: everyone that was on the dead gateway connected via the survivor
        presence_s = (
            time.monotonic()
            - killed_at
            + await _all_on(apis, moved, {survivor_id}, BACK_WITHIN_S - (time.monotonic() - killed_at))
        )
        await asyncio.sleep(3)  # the stream keeps going through the survivor
        stop_stream.set()
        await asyncio.gather(*streams)
        await asyncio.gather(*commands)

        # after the dead gateway's silence bound: nobody wrongly marked disconnected
        await asyncio.sleep(max(0.0, SILENCE_S + 1.5 - (time.monotonic() - killed_at)))
        await _all_on(apis, everyone, {survivor_id}, 0.5)
        print(
            f"\nfailover: agent back in {agent_back_s:.2f}s, {SWARM} swarm agents in {swarm_back_s:.2f}s, "
            f"both APIs show all {len(moved)} moved agents via {survivor_id} at {presence_s:.2f}s"
        )
    finally:
        stop_stream.set()
        for task in swarm_tasks:
            task.cancel()
        for task in swarm_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # every accepted command final; one answered by an agent ran exactly once, nothing ran twice
    markers = Counter(marker_file.read_text().split()) if marker_file.exists() else Counter()
    assert all(n == 1 for n in markers.values()), [m for m, n in markers.items() if n > 1]
    assert all(n == 1 for n in received.values()), [c for c, n in received.items() if n > 1]
    statuses: Counter[str] = Counter()
    ids: list[str] = []
    for host, command, answer in sent:
        assert answer is not None, f"no answer for {command} to {host}"
        assert answer.status_code == 200, answer.text
        body = answer.json()
        ids.append(body["command_id"])
        outcome = (
            body["status"] if body["status"] == "succeeded" else f"{body['status']}/{body['error_code']}"
        )
        statuses[f"{'agent' if host == HOST else 'swarm'}:{outcome}"] += 1
        assert body["status"] in FINAL, body
        # how often it ran: the real agent's marker in the file, the swarm's command id received
        marker = re.search(r"echo (\S+)", command)
        assert marker is not None
        ran = markers[marker.group(1)] if host == HOST else received[body["command_id"]]
        if body["status"] == "timed_out":
            assert ran <= 1, body  # may have run, once at most
        else:  # by agent it ran exactly once; otherwise (no session: the SSH fallback refused) never
            assert ran == (1 if body["via"] == "agent" else 0), body
    assert len(set(ids)) == len(ids)
    for http in apis:  # the stored rows agree: none left pending or running
        rows = (await http.get(f"/api/hosts/{HOST}/commands", params={"limit": 1000})).json()
        assert {r["command_id"] for r in rows} >= {
            i for (h, _, _), i in zip(sent, ids, strict=True) if h == HOST
        }
        assert all(r["status"] in FINAL for r in rows), [r for r in rows if r["status"] not in FINAL]
    for command_id in ids[:: max(1, len(ids) // 40)]:
        stored = (await apis[1].get(f"/api/commands/{command_id}")).json()
        assert stored["status"] in FINAL, stored
    assert statuses["agent:succeeded"] > 10
    assert statuses["swarm:succeeded"] > 10
    slow_body = next(a.json() for h, c, a in sent if c == slow and a is not None)
    print(f"commands: {len(sent)} sent, {dict(statuses)}; the one running at the kill: {slow_body['status']}")
    for http in apis:
        await http.aclose()
