"""Jobs through REST against a real NATS server and database (both backends): selection by host list,
labels and all; batch sizes observed on the hosts; a partly unreachable fleet; stop_on_failure; cancel;
async exec; the host list's label filter.

Gateways and the SSH worker are played by nats-py responders with their real NATS identities, one
subscription per host that is "up" (a host with no subscriber gets *no responders*, as a host whose agent
is down): they check the API's signature as a real agent or worker does and answer with a result signed by
the host's agent key (`tests.support.fakeagent`), after `DELAY` seconds, counting how many requests they
hold at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import subjects
from shared.protocol import ExecResult, encode
from tests.support.db import RunningApi, api_settings, eventually, running_api
from tests.support.fakeagent import AgentKey, checked_request, register_agent_key
from tests.support.natsserver import NatsServer

DELAY = 0.15
LABELS = {
    "web-1": {"role": "web", "env": "prod"},
    "web-2": {"role": "web", "env": "prod"},
    "web-3": {"role": "web", "env": "test"},
    "db-1": {"role": "db", "env": "prod"},
    "db-2": {"role": "db"},
    "lb-1": {},
}


@dataclass
class Fleet:
    """Fake agents and SSH worker: what they received, and the most requests held at once."""

    api: RunningApi
    server: NatsServer
    keys: dict[str, AgentKey] = field(default_factory=dict)
    peers: list[NATS] = field(default_factory=list)
    answering: set[asyncio.Task[None]] = field(default_factory=set)
    received: list[tuple[str, str]] = field(default_factory=list)  # (host, via)
    exit_codes: dict[str, int] = field(default_factory=dict)
    silent: set[str] = field(default_factory=set)  # hosts that receive and never answer
    holding: int = 0
    most: int = 0

    async def _peer(self, role: str) -> NATS:
        peer = await self.server.connect(role)
        self.peers.append(peer)
        return peer

    async def _answer(self, peer: NATS, msg: Msg, host: str, via: str) -> None:
        request = checked_request(self.api, host, msg.data)  # raises (no answer) unless signed for host
        self.received.append((host, via))
        if host in self.silent:
            return
        self.holding += 1
        self.most = max(self.most, self.holding)
        try:
            await asyncio.sleep(DELAY)
        finally:
            self.holding -= 1
        code = self.exit_codes.get(host, 0)
        result = self.keys[host].result(host, command_id=request.command_id, exit_code=code)
        if via == "ssh":
            result = ExecResult.model_validate({**result.model_dump(), "signature": None})
        await peer.publish(msg.reply, encode(result))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)  # answer from a task: a subscription's callbacks run one by one
        self.answering.add(task)
        task.add_done_callback(self.answering.discard)

    async def agent_up(self, host: str) -> None:
        """Serve `host`'s agent subject as its gateway would."""
        peer = await self._peer("gateway")

        async def handler(msg: Msg) -> None:
            self._spawn(self._answer(peer, msg, host, "agent"))

        await peer.subscribe(subjects.agent_exec(host), cb=handler)
        await peer.flush()

    async def ssh_up(self, host: str) -> None:
        """Serve `host`'s SSH subject as the SSH worker would."""
        peer = await self._peer("ssh-worker")

        async def handler(msg: Msg) -> None:
            self._spawn(self._answer(peer, msg, host, "ssh"))

        await peer.subscribe(subjects.ssh_exec(host), cb=handler)
        await peer.flush()

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close()


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer, database: str) -> AsyncIterator[RunningApi]:
    settings = api_settings(tmp_path, nats_server.url, database, exec_grace=0.5, ssh_grace=0.5)
    async with running_api(settings) as running:
        yield running


@pytest.fixture
async def fleet(api: RunningApi, nats_server: NatsServer) -> AsyncIterator[Fleet]:
    """Six hosts with labels and agent keys; every agent up unless a test says otherwise."""
    fleet = Fleet(api, nats_server)
    for host, labels in LABELS.items():
        body = {"id": host, "address": f"10.0.0.{len(fleet.keys) + 1}", "ssh_check": False, "labels": labels}
        answer = await api.client.post("/api/hosts", json=body, headers=api.auth)
        assert answer.status_code == 201, answer.text
        fleet.keys[host] = AgentKey()
        await register_agent_key(api, host, fleet.keys[host].public_key)
    yield fleet
    await fleet.close()


async def _submit(api: RunningApi, **body: Any) -> dict[str, Any]:
    body.setdefault("command", "uptime")
    answer = await api.client.post("/api/jobs", json=body, headers=api.auth)
    assert answer.status_code == 202, answer.text
    data: dict[str, Any] = answer.json()
    assert answer.headers["location"] == f"/api/jobs/{data['job_id']}"
    return data


async def _finished(api: RunningApi, job_id: str, timeout: float = 15) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        answer = await api.client.get(f"/api/jobs/{job_id}", headers=api.auth)
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()
        return job if job["finished_at"] is not None and job["counts"]["pending"] == 0 else None

    return await eventually(done, timeout)


def _by_host(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    outcomes = {o["host_id"]: o for o in job["outcomes"]}
    assert len(outcomes) == len(job["outcomes"]) == job["targets"]  # one outcome per host, none missing
    return outcomes


async def test_selection_by_list_label_and_all(api: RunningApi, fleet: Fleet) -> None:
    """Each selection runs on exactly the hosts it names, once each, recorded per host with job_id and
    requested_by; the runs are ordinary commands."""
    for host in LABELS:
        await fleet.agent_up(host)
    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"hosts": ["web-1", "10.0.0.4"]}, {"web-1", "db-1"}),  # an id and an address
        ({"labels": {"role": "web", "env": "prod"}}, {"web-1", "web-2"}),
        ({"all": True}, set(LABELS)),
    ]
    for targets, expected in cases:
        fleet.received.clear()
        created = await _submit(api, targets=targets)
        assert created["targets"] == len(expected)
        assert created["state"] == "running"
        job = await _finished(api, created["job_id"])
        assert job["state"] == "finished"
        assert sorted(h for h, _ in fleet.received) == sorted(expected)
        outcomes = _by_host(job)
        assert set(outcomes) == expected
        assert job["counts"]["succeeded"] == len(expected)
        assert job["requested_by"] == "api-key:bootstrap"
        for outcome in outcomes.values():
            assert (outcome["status"], outcome["via"], outcome["exit_code"]) == ("succeeded", "agent", 0)
            run = (await api.client.get(f"/api/commands/{outcome['command_id']}", headers=api.auth)).json()
            assert run["job_id"] == job["job_id"]
            assert run["requested_by"] == "api-key:bootstrap"
            assert run["status"] == "succeeded"
    listed = (await api.client.get("/api/jobs?limit=2", headers=api.auth)).json()
    assert [j["targets"] for j in listed] == [6, 2]  # most recent first
    assert listed[0]["counts"]["succeeded"] == 6


async def test_batches_respect_their_size(api: RunningApi, fleet: Fleet) -> None:
    """batch 2 of 6 hosts: never more than 2 held by the hosts at once, three batches; 50% likewise 3."""
    for host in LABELS:
        await fleet.agent_up(host)
    job = await _submit(api, targets={"all": True}, batch=2)
    assert job["batch_size"] == 2
    done = await _finished(api, job["job_id"])
    assert fleet.most == 2
    assert done["counts"]["succeeded"] == 6
    created = sorted(o["created_at"] for o in done["outcomes"])
    assert len(set(created)) == 3  # each batch recorded pending when it started
    fleet.most = 0
    job = await _submit(api, targets={"all": True}, batch="50%")
    assert job["batch_size"] == 3
    await _finished(api, job["job_id"])
    assert fleet.most == 3


async def test_partly_unreachable_fleet(api: RunningApi, fleet: Fleet) -> None:
    """Agent up → via agent; agent down, SSH up → via ssh; both down → unreachable, with why; a failing
    command → failed with its exit code; an agent that never answers → timed_out (may have run, not
    re-sent). Every host has its outcome."""
    await fleet.agent_up("lb-1")
    fleet.silent.add("lb-1")
    await fleet.agent_up("web-1")
    await fleet.agent_up("web-2")
    fleet.exit_codes["web-2"] = 3
    await fleet.ssh_up("db-1")
    job = await _submit(api, targets={"hosts": ["web-1", "web-2", "db-1", "db-2", "lb-1"]}, timeout=0.5)
    done = await _finished(api, job["job_id"])
    outcomes = _by_host(done)
    assert (outcomes["web-1"]["status"], outcomes["web-1"]["via"]) == ("succeeded", "agent")
    assert (outcomes["web-2"]["status"], outcomes["web-2"]["exit_code"]) == ("failed", 3)
    assert (outcomes["db-1"]["status"], outcomes["db-1"]["via"]) == ("succeeded", "ssh")
    down = outcomes["db-2"]
    assert (down["status"], down["via"], down["error_code"]) == ("undeliverable", None, "unavailable")
    assert "no agent session and no SSH worker" in down["error_description"]
    silent = outcomes["lb-1"]
    assert (silent["status"], silent["via"], silent["error_code"]) == ("timed_out", "agent", "timeout")
    counts = done["counts"]
    assert (counts["succeeded"], counts["failed"], counts["unreachable"], counts["timed_out"]) == (2, 1, 1, 1)
    assert counts["pending"] == 0
    received = [("db-1", "ssh"), ("lb-1", "agent"), ("web-1", "agent"), ("web-2", "agent")]
    assert sorted(fleet.received) == received  # once each: nothing re-sent


async def test_stop_on_failure_skips_later_batches(api: RunningApi, fleet: Fleet) -> None:
    """A failure in the first batch: no later batch is sent; those hosts are skipped (nothing ran)."""
    for host in LABELS:
        await fleet.agent_up(host)
    fleet.exit_codes["db-1"] = 1  # db-1, db-2 sort first: the first batch
    job = await _submit(api, targets={"all": True}, batch=2, stop_on_failure=True)
    done = await _finished(api, job["job_id"])
    outcomes = _by_host(done)
    assert outcomes["db-1"]["status"] == "failed"
    assert outcomes["db-2"]["status"] == "succeeded"
    skipped = {h for h, o in outcomes.items() if o["status"] == "skipped"}
    assert skipped == {"lb-1", "web-1", "web-2", "web-3"}
    assert all(outcomes[h]["error_code"] == "skipped" for h in skipped)
    assert sorted(h for h, _ in fleet.received) == ["db-1", "db-2"]
    assert done["counts"]["skipped"] == 4
    # without stop_on_failure every batch runs
    fleet.received.clear()
    job = await _submit(api, targets={"all": True}, batch=2)
    done = await _finished(api, job["job_id"])
    assert len(fleet.received) == 6


async def test_cancel_starts_no_further_batch(api: RunningApi, fleet: Fleet) -> None:
    """Cancelling during the first batch: it finishes; the rest are cancelled and never sent."""
    for host in LABELS:
        await fleet.agent_up(host)
    job = await _submit(api, targets={"all": True}, batch=1)
    await eventually(lambda: asyncio.sleep(0, result=bool(fleet.received)), timeout=5)
    answer = await api.client.post(f"/api/jobs/{job['job_id']}/cancel", headers=api.auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "cancelled"
    done = await _finished(api, job["job_id"])
    assert done["state"] == "cancelled"
    outcomes = _by_host(done)
    sent = {h for h, _ in fleet.received}
    assert len(sent) <= 2
    assert all(outcomes[h]["status"] == "succeeded" for h in sent)
    assert {h for h, o in outcomes.items() if o["status"] == "cancelled"} == set(LABELS) - sent
    missing = await api.client.post("/api/jobs/job-nope/cancel", headers=api.auth)
    assert missing.status_code == 404


async def test_bad_job_bodies_are_422_and_record_nothing(api: RunningApi, fleet: Fleet) -> None:
    """Unknown hosts (listed), an empty selection, two selections, a bad batch → 422; no job recorded."""
    bad: list[tuple[dict[str, Any], str]] = [
        ({"command": "true", "targets": {"hosts": ["web-1", "nope", "nada"]}}, "unknown hosts"),
        ({"command": "true", "targets": {"labels": {"role": "cache"}}}, "matches no host"),
        ({"command": "true", "targets": {"all": True, "hosts": ["web-1"]}}, "exactly one"),
        ({"command": "true", "targets": {}}, "exactly one"),
        ({"command": "true", "targets": {"all": False}}, "all"),
        ({"command": "true", "targets": {"all": True}, "batch": 0}, "batch"),
        ({"command": "true", "targets": {"all": True}, "batch": "0%"}, "batch"),
        ({"command": "true", "targets": {"all": True}, "batch": "5"}, "batch"),
        ({"command": "true", "targets": {"all": True}, "stop_on_failure": "yes"}, "stop_on_failure"),
        ({"command": "true", "targets": {"all": True}, "extra": 1}, "extra"),
    ]
    for body, expected in bad:
        answer = await api.client.post("/api/jobs", json=body, headers=api.auth)
        assert answer.status_code == 422, (body, answer.text)
        assert expected in answer.text, answer.text
    unknown = (await api.client.post("/api/jobs", json=bad[0][0], headers=api.auth)).json()
    assert unknown["detail"][0]["input"] == ["nope", "nada"]
    assert unknown["detail"][0]["loc"] == ["body", "targets", "hosts"]
    assert (await api.client.get("/api/jobs", headers=api.auth)).json() == []
    assert (await api.client.get("/api/jobs/job-nope", headers=api.auth)).status_code == 404


async def test_async_exec_answers_202_with_location(api: RunningApi, fleet: Fleet) -> None:
    """?async=true: 202 with the command id and Location at once; the outcome is recorded later."""
    await fleet.agent_up("web-1")
    answer = await api.client.post(
        "/api/hosts/web-1/exec?async=true", json={"command": "uptime"}, headers=api.auth
    )
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["status"] == "pending"
    assert answer.headers["location"] == f"/api/commands/{body['command_id']}"
    first = (await api.client.get(answer.headers["location"], headers=api.auth)).json()
    assert first["status"] == "pending"  # the fake agent holds it for DELAY

    async def settled() -> dict[str, Any] | None:
        run: dict[str, Any] = (await api.client.get(answer.headers["location"], headers=api.auth)).json()
        return run if run["status"] != "pending" else None

    run = await eventually(settled)
    assert (run["status"], run["via"], run["requested_by"]) == ("succeeded", "agent", "api-key:bootstrap")
    sync = await api.client.post("/api/hosts/web-1/exec?async=false", json={"command": "x"}, headers=api.auth)
    assert sync.status_code == 200
    assert sync.json()["status"] == "succeeded"
    auth = api.auth
    for query in ("async=yes", "async=1", "async=true&async=true"):
        wrong = await api.client.post(f"/api/hosts/web-1/exec?{query}", json={"command": "x"}, headers=auth)
        assert wrong.status_code == 422, wrong.text
        assert "async" in wrong.text
    unknown = await api.client.post("/api/hosts/nope/exec?async=true", json={"command": "x"}, headers=auth)
    assert unknown.status_code == 404


async def test_host_list_label_filter(api: RunningApi, fleet: Fleet) -> None:
    """label=k=v (repeatable, all must match) and label=k (has the key); malformed → 422 naming it."""

    async def ids(query: str) -> list[str]:
        answer = await api.client.get(f"/api/hosts?{query}", headers=api.auth)
        assert answer.status_code == 200, answer.text
        return [h["id"] for h in answer.json()]

    assert await ids("label=role=web") == ["web-1", "web-2", "web-3"]
    assert await ids("label=role=web&label=env=prod") == ["web-1", "web-2"]
    assert await ids("label=env") == ["db-1", "web-1", "web-2", "web-3"]
    assert await ids("label=role=cache") == []
    assert await ids("label=role%3Dweb") == ["web-1", "web-2", "web-3"]
    assert len(await ids("")) == 6
    for bad in ("label=", "label==web", f"label={'k' * 64}=v"):
        answer = await api.client.get(f"/api/hosts?{bad}", headers=api.auth)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["detail"][0]["loc"] == ["query", "label"]


async def test_a_dead_apis_job_gets_its_queued_hosts_skipped(api: RunningApi, fleet: Fleet) -> None:
    """A job whose API stopped (heartbeat STALE_S old): its queued runs (never sent) → skipped with why,
    the job finished; its pending runs are left to the reconciler (they may have been sent)."""
    from datetime import timedelta

    from services.api.fleet.jobs import STALE_S, JobRunner
    from services.api.store import jobs as store
    from services.api.store.models import Job, JobState, utcnow

    old = utcnow() - timedelta(seconds=STALE_S + 5)
    job = Job(job_id="job-dead", command="true", targets=3, batch_size=1, state=JobState.RUNNING)
    job.created_at = job.heartbeat_at = old
    runs = [store.JobRun(f"dead-{i}", host, i == 0) for i, host in enumerate(["db-1", "db-2", "lb-1"])]
    await store.create_job(api.state.engine, job, runs)
    fresh = Job(job_id="job-alive", command="true", targets=1, batch_size=1, state=JobState.RUNNING)
    await store.create_job(api.state.engine, fresh, [store.JobRun("alive-0", "db-1", False)])
    jobs: JobRunner = api.app.state.jobs
    assert await jobs.settle_stale() == 1
    done = (await api.client.get("/api/jobs/job-dead", headers=api.auth)).json()
    assert done["state"] == "finished"
    assert done["finished_at"] is not None
    outcomes = _by_host(done)
    assert outcomes["db-1"]["status"] == "pending"  # sent or not: the reconciler asks the agent
    for host in ("db-2", "lb-1"):
        assert (outcomes[host]["status"], outcomes[host]["error_code"]) == ("skipped", "not_sent")
        assert "never sent" in outcomes[host]["error_description"]
    alive = (await api.client.get("/api/jobs/job-alive", headers=api.auth)).json()
    assert alive["finished_at"] is None
    assert alive["outcomes"][0]["status"] == "queued"
    assert await jobs.settle_stale() == 0


async def test_a_job_stopped_with_its_api_skips_what_it_never_sent(api: RunningApi, fleet: Fleet) -> None:
    """The job's task is cancelled (the API shutting down past its grace): the batch in flight stays
    pending for the reconciler (it may have run); hosts never sent are skipped; the job ends."""
    from services.api.fleet.jobs import JobRunner

    for host in LABELS:
        await fleet.agent_up(host)
    job = await _submit(api, targets={"all": True}, batch=2)
    await eventually(lambda: asyncio.sleep(0, result=bool(fleet.received)), timeout=5)
    jobs: JobRunner = api.app.state.jobs
    task = jobs.running[job["job_id"]]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    done = (await api.client.get(f"/api/jobs/{job['job_id']}", headers=api.auth)).json()
    assert done["state"] == "finished"
    outcomes = _by_host(done)
    statuses = sorted(o["status"] for o in outcomes.values())
    assert statuses == ["pending", "pending", "skipped", "skipped", "skipped", "skipped"]
    assert {h for h, _ in fleet.received} == {h for h, o in outcomes.items() if o["status"] == "pending"}


async def test_long_host_lists_and_big_batches(
    api: RunningApi, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_IN values a host list is matched in Python and a batch promoted in chunks (drivers cap
    bound parameters): the same hosts, the same outcomes, an unknown one still refused."""
    from services.api.store import jobs as store

    monkeypatch.setattr(store, "MAX_IN", 2)
    for host in LABELS:
        await fleet.agent_up(host)
    refused = await api.client.post(
        "/api/jobs", json={"command": "x", "targets": {"hosts": ["web-1", "db-1", "nope"]}}, headers=api.auth
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["input"] == ["nope"]
    hosts = ["web-1", "web-2", "web-3", "10.0.0.4", "db-2", "lb-1"]  # 10.0.0.4: db-1's address
    job = await _submit(api, targets={"hosts": hosts}, batch=3)
    done = await _finished(api, job["job_id"])
    assert set(_by_host(done)) == set(LABELS)
    assert done["counts"]["succeeded"] == 6
    assert fleet.most == 3
